"""Timing primitives: wall and CPU seconds with CUDA synchronized, alternating rounds, median ratios with their
per-round range, peak memory of a stretch of work, and forward-call counts.

Compare settings as ratios measured in one run with alternating rounds (A, B, A, B, ...): on a shared machine a
load change between two back-to-back timings turns into a fake ratio.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from gex.utils import peak_mem_mb

__all__ = ["MemoryProbe", "sync", "timed", "ForwardCounter", "stats", "Timer", "alternate", "median_ratios"]


class MemoryProbe:
    """Peak memory of a stretch of work: CUDA max allocated, or on Linux the RSS high-water mark (``VmHWM``),
    reset at ``start`` through ``/proc/self/clear_refs`` so that earlier work in the process does not count.

    Without the reset (not Linux) the process peak is all there is: ``rise_mb`` is then NaN unless the process is
    fresh (did nothing heavier before).
    """

    def __init__(self, device: torch.device, fresh_process: bool = True):
        self.device, self.fresh, self.base, self.reset = device, fresh_process, 0.0, False

    @staticmethod
    def _status_mb(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
        return None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.reset = True
        except OSError:
            self.reset = False
        self.base = self._status_mb("VmRSS") or 0.0

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return peak_mem_mb(self.device)
        hwm = self._status_mb("VmHWM") if self.reset else None
        return hwm if hwm is not None else peak_mem_mb()

    def rise_mb(self) -> float:
        if self.device.type != "cuda" and not self.reset and not self.fresh:
            return float("nan")
        return self.peak_mb() - self.base



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Wall and process-CPU seconds of ``fn()`` (CUDA synchronized on both ends), and its result.

    CPU seconds (all threads) are the steadier number on a shared machine, where wall time also counts waiting.
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out



class ForwardCounter:
    """Counts forward calls of a module and of its deep copies (which inherit the hook: a plain closure, which
    ``copy.deepcopy`` shares instead of copying as it would a bound method's instance)."""

    def __init__(self, module: nn.Module):
        counts = self.counts = {"forwards": 0, "grad_forwards": 0, "forward_rows": 0}

        def hook(_module: nn.Module, args: tuple) -> None:
            counts["forwards"] += 1
            counts["grad_forwards"] += int(torch.is_grad_enabled())
            if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
                counts["forward_rows"] += int(args[0].shape[0])  # logical rows: a vmap-ed call sees one sample

        self.handle = module.register_forward_pre_hook(hook)

    def reset(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.update(dict.fromkeys(self.counts, 0))
        return out

    def close(self) -> None:
        self.handle.remove()



def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}



Timer = Callable[[Callable[[], Any]], tuple]  # runs one call; its result's first item is the seconds



def alternate(fns: dict[str, Callable[[], Any]], repeats: int, timer: Timer,
              warmups: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[tuple]]:
    """Time the functions of a comparison in alternation (A, B, A, B, ...) so that drifting load hits them alike.

    Timing each setting once, one after the other, turns a load change between them into a fake ratio (the
    reference run's channels_last 1.67x was 1.00-1.02x in an alternating check).

    Args:
        fns: name -> work, in the order called within each round.
        repeats: timed rounds (each calls every function once).
        timer: times one call, e.g. ``lambda fn: timed(fn, device)``.
        warmups: untimed calls made first, in order (compilation, first vmap, allocator); None = each of ``fns``
            once; {} = none.

    Returns:
        name -> the timer's results, one per round, in round order.

    Raises:
        ValueError: ``repeats < 1`` or no functions.
    """
    if repeats < 1 or not fns:
        raise ValueError(f"alternate needs repeats >= 1 and at least one function, got repeats={repeats}, "
                         f"functions={list(fns)}")
    for warm in (fns if warmups is None else warmups).values():
        warm()
    out: dict[str, list[tuple]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(timer(fn))
    return out



def median_ratios(seconds: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Per name: the median seconds, ``ratio`` = base's median / this median (> 1: faster than ``base``), and the
    min and max of the per-round ratios ``base_r / seconds_r`` (a wide range shows drift or noise).

    Args:
        seconds: name -> seconds per round (rounds aligned across names, as ``alternate`` gives them).
        base: the reference name.
    """
    ref = seconds[base]
    out = {}
    for name, values in seconds.items():
        rounds = [b / t for b, t in zip(ref, values)]
        out[name] = {"median": statistics.median(values), "ratio": statistics.median(ref) / statistics.median(values),
                     "ratio_min": min(rounds), "ratio_max": max(rounds)}
    return out
