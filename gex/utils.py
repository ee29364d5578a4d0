"""Small shared helpers: device choice, seeding, quiet progress bars, stage timing and peak memory."""
from __future__ import annotations

import os
import random
import resource
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["resolve_device", "seed_everything", "progress", "stage_timer", "peak_mem_mb"]

T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to ``torch.device``.

    Raises:
        ValueError: an unknown device name, or a CUDA device on a machine without CUDA (one line, with the fix).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is unknown; valid choices: auto, cpu, cuda, cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but this machine has no CUDA; use device=auto or device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; flush denormals (a ~3x CPU slowdown late in cosine schedules)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterator[T]:
    """tqdm with a description, silent when ``CI`` or ``GEX_QUIET`` is set."""
    quiet = bool(os.environ.get("CI")) or bool(os.environ.get("GEX_QUIET"))
    return iter(tqdm(iterable, desc=desc, total=total, leave=leave, disable=quiet, dynamic_ncols=True))


@contextmanager
def stage_timer(times: dict[str, float], name: str, device: torch.device | None = None) -> Iterator[None]:
    """Record the wall time of a stage into ``times[name]`` (synchronizing CUDA so the time is real)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    times[name] = time.perf_counter() - start


def peak_mem_mb(device: torch.device | None = None) -> float:
    """Peak memory: max allocated on CUDA, else the process's peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
