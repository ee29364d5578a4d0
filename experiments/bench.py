"""Speed benchmark: ``python -m experiments.bench [bench.methods=[gex,loss]] [bench.n_train=2000] [bench.peers=true]``.

What it measures, all in one run on one machine (the record names the hardware and versions):

- per method: wall time of ``fit`` and of scoring (``self_influence`` on the training set), medians over
  ``bench.repeats`` after a generic warm-up (kernels, allocator, the lazy ``torch._dynamo`` import of the first
  ``vmap``), each repeat with a fresh artefact cache so the real work is timed; peak memory (CPU: the RSS
  high-water mark, reset before the method, in a fresh process per method; CUDA: max allocated) and its rise over
  the state before the method;
  model forward calls (total and with autograd on) counted by a hook on theta*'s module (clones inherit it);
  samples per second;
- GEX against its bare compute (``gex.ratio_to_floor``): ``M x ft_step`` plain SGD steps on the same stream plus
  ``M + 1`` plain eval passes over the data, timed alternately with GEX in the same process;
- per-sample-gradient paths: our hooks, ``vmap(grad)`` and Opacus (ratios to hooks);
- a scaling sweep over N (``bench.sweep_n``) for streamed methods: time should grow linearly, memory stay flat;
- optionally (``bench.peers=true``) our methods against installed peer libraries (``bench/peers.py``).

Writes ``bench_methods``, ``bench_grads``, ``bench_sweep`` (and ``bench_peers``) as ``.md`` and ``.csv``, the
log-log plot ``bench_sweep.png``, ``bench.md`` (all tables with the hardware line) and ``metrics.json``
(``<m>.wall_s``, ``<m>.peak_mem_mb``, ``<m>.samples_per_s``, ``gex.ratio_to_floor``, ``<m>.peer_time_ratio``,
``<m>.peer_spearman``, ...). A method that is not registered, fails or runs past ``bench.timeout_s`` is reported
and skipped. The full sweep on a quiet machine: ``bench.sweep_n=[2000,5000,10000,20000,60000]
data=fashion_mnist_full``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from experiments.common import (RunLogger, RunRecord, UsageError, entry_point, load_task, settings_from, typed_config,
                                versions)
from gex.attribution import METHODS, InfluenceTask, build_method
from gex.data import balanced_subset, iter_batches
from gex.grads import per_sample_grads_hooks
from gex.influence import hvp, param_names, per_sample_grads
from gex.losses import per_sample_loss
from gex.runs import ArtifactCache, atomic_write_text
from gex.train import batch_stream, clone_model, lr_at
from gex.utils import peak_mem_mb, seed_everything

__all__ = ["BenchConfig", "GRAD_PATHS", "alternate", "median_ratios", "compare_grad_paths", "freeze_norm_layers",
           "opacus_grads", "gex_floor", "time_method", "speed_table", "run", "main"]

log = logging.getLogger("gex")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
GRAD_PATHS = ("hooks", "vmap", "opacus")
WARMUP_ROWS = 64          # samples of the generic warm-up (one chunk of each gradient path, one HVP)
EVAL_BATCH = 1024         # samples per eval forward of the GEX floor (GEX's default batch_size)
METHOD_COLUMNS = ("method", "n", "status", "wall_s", "fit_s", "score_s", "cpu_s", "wall_s_mean", "wall_s_std",
                  "samples_per_s", "peak_mem_mb", "mem_rise_mb", "floor_s", "ratio_to_floor", "ratio_to_floor_cpu",
                  "forwards", "grad_forwards", "forward_rows", "repeats", "isolated")


@dataclass
class BenchConfig:
    """``bench.*`` options.

    Attributes:
        methods: methods timed at ``n_train`` (unregistered names are skipped with a message).
        n_train: N of the method table (a class-balanced subset of the loaded training set).
        repeats: timed repeats per method (medians reported).
        warmup: run the generic warm-up before timing.
        isolate: one fresh process per method (honest peak memory); false = all in this process.
        timeout_s: a method's process is stopped after this many seconds (reported as a timeout).
        sweep_n: N values of the scaling sweep.
        sweep_methods: methods of the sweep (those also in ``methods`` or registered).
        sweep_repeats: timed repeats per sweep point.
        grad_paths: per-sample-gradient paths compared (``hooks``, ``vmap``, ``opacus``).
        grad_n: samples of the gradient-path comparison.
        grad_chunk: samples per per-sample-gradient chunk.
        floor: time GEX's bare-compute floor.
        peers: compare with installed peer libraries (captum, dattri, kronfluence).
        peer_n: training samples of the peer comparison (test samples: half of it).
        peer_repeats: timed rounds of each peer pair, ours and the peer alternating (medians reported).
        method_options: per-method option overrides on top of ``configs/method/<name>.yaml``.
        member_batches: ``batch_members`` values of the speed table (``speed_table``); [] skips the table.
        speed_members: M of the speed table's ensemble builds and evaluations.
        speed_steps: SGD steps of each timed build (``speed_steps // speed_members`` per member) and of each
            channels_last / compile timing.
        speed_repeats: timed rounds of each speed-table group, its settings alternating (medians reported).
    """

    methods: list[str] = field(default_factory=lambda: ["gex", "loss", "el2n", "tracin_rp", "randproj", "grad_dot",
                                                        "arnoldi", "trak", "ekfac"])
    n_train: int = 2000
    repeats: int = 3
    warmup: bool = True
    isolate: bool = True
    timeout_s: float = 3600.0
    sweep_n: list[int] = field(default_factory=lambda: [500, 1000, 2000, 4000])
    sweep_methods: list[str] = field(default_factory=lambda: ["loss", "randproj", "grad_dot"])
    sweep_repeats: int = 1
    grad_paths: list[str] = field(default_factory=lambda: list(GRAD_PATHS))
    grad_n: int = 2000
    grad_chunk: int = 256
    floor: bool = True
    peers: bool = False
    peer_n: int = 200
    peer_repeats: int = 3
    method_options: dict[str, Any] = field(default_factory=dict)
    member_batches: list[int] = field(default_factory=lambda: [1, 2, 4])
    speed_members: int = 4
    speed_steps: int = 200
    speed_repeats: int = 3

    def __post_init__(self) -> None:
        for key in ("n_train", "repeats", "sweep_repeats", "grad_n", "grad_chunk", "peer_n", "peer_repeats",
                    "speed_members", "speed_steps", "speed_repeats"):
            if getattr(self, key) < 1:
                raise UsageError(f"bench.{key}={getattr(self, key)} must be a positive integer")
        if any(n < 1 for n in self.sweep_n):
            raise UsageError(f"bench.sweep_n={list(self.sweep_n)} must hold positive integers")
        if any(k < 1 for k in self.member_batches):
            raise UsageError(f"bench.member_batches={list(self.member_batches)} must hold positive integers")
        bad = sorted(set(self.grad_paths) - set(GRAD_PATHS))
        if bad:
            raise UsageError(f"bench.grad_paths has unknown {bad}; valid choices: {list(GRAD_PATHS)}")
        if self.timeout_s <= 0:
            raise UsageError(f"bench.timeout_s={self.timeout_s} must be positive")


# ------------------------------------------------------------------------------------ measuring helpers

class _MemoryProbe:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Wall and process-CPU seconds of ``fn()`` (CUDA synchronized on both ends), and its result.

    CPU seconds (all threads) are the steadier number on a shared machine, where wall time also counts waiting.
    """
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


class _ForwardCounter:
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


def _warm_up(task: InfluenceTask) -> None:
    """One training step, an eval forward, a chunk of each gradient path and one HVP on a copy of theta*."""
    model = clone_model(task.model)
    batch = next(iter_batches(task.train, WARMUP_ROWS, device=task.device))
    model.train()
    per_sample_loss(model(batch.x), batch.y, task.loss).mean().backward()
    model.eval()
    with torch.no_grad():
        model(next(iter_batches(task.train, EVAL_BATCH, device=task.device)).x)
    per_sample_grads_hooks(model, batch.x, batch.y, task.loss)
    per_sample_grads(model, batch.x, batch.y, "ce")  # first vmap: imports torch._dynamo (seconds)
    small = task.train.subset(torch.arange(min(WARMUP_ROWS, len(task.train))))
    hvp(model, small, torch.ones(sum(p.numel() for p in model.parameters() if p.requires_grad),
                                 device=task.device), task.loss)


# ------------------------------------------------------------------------------------------- methods

def method_options(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``configs/method/<name>.yaml`` (without ``name``) updated by ``overrides``; constructor defaults if absent."""
    path = CONFIG_DIR / "method" / f"{name}.yaml"
    base = OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else {}
    base.pop("name", None)
    return base | dict(overrides or {})


def subtask(task: InfluenceTask, n: int, cache_root: str | None) -> InfluenceTask:
    """``task`` on a class-balanced subset of ``n`` training samples, with its own artefact cache.

    Per-sample task fields (forgetting counts) follow the subset; the cache spec records ``n`` so nothing computed
    on another subset can be reused.
    """
    rows = balanced_subset(task.train.y_clean.cpu().numpy(), n, seed=task.seed) if n < len(task.train) \
        else torch.arange(len(task.train))
    pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
    return replace(task, train=task.train.subset(rows), forgetting=pick(task.forgetting),
                   never_learned=pick(task.never_learned),
                   cache=ArtifactCache(cache_root) if cache_root is not None else None,
                   cache_spec=task.cache_spec | {"bench_n": n})


def _fit_and_score(task: InfluenceTask, name: str, options: dict[str, Any]) -> dict[str, float]:
    """One timed fit + self-influence on the training set, in a fresh artefact cache."""
    with tempfile.TemporaryDirectory(prefix="gex-bench-") as tmp:
        sub = replace(task, cache=ArtifactCache(tmp))
        method = build_method(name, **options)
        fit_s, fit_cpu, _ = _timed(lambda: method.fit(sub), task.device)
        score_s, score_cpu, scores = _timed(lambda: method.self_influence(sub.train), task.device)
    if scores.shape != (len(task.train),) or not bool(torch.isfinite(scores).all()):
        raise RuntimeError(f"{name} returned self-influence of shape {tuple(scores.shape)} or non-finite values")
    return {"fit_s": fit_s, "score_s": score_s, "wall_s": fit_s + score_s, "cpu_s": fit_cpu + score_cpu}


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def time_method(task: InfluenceTask, name: str, options: dict[str, Any], repeats: int,
                floor: bool = False, fresh_process: bool = True) -> dict[str, Any]:
    """Medians over ``repeats`` of fit / score / total wall time, forward counts, memory, and the GEX floor.

    Args:
        task: theta* on the subset to time (already warmed up).
        name, options: the method.
        repeats: timed repeats.
        floor: also time ``gex_floor`` after each repeat (GEX only) and report ``ratio_to_floor``.
        fresh_process: this process did nothing heavier before; matters only where the RSS peak cannot be reset
            (not Linux): there ``mem_rise_mb`` is then NaN.

    Returns:
        A flat row: ``n``, ``fit_s``, ``score_s``, ``wall_s``, ``cpu_s`` (medians), ``wall_s_mean``, ``wall_s_std``,
        ``samples_per_s``, ``peak_mem_mb``, ``mem_rise_mb``, forward counts of the last repeat, and with ``floor``
        ``floor_s`` and ``ratio_to_floor`` (``_cpu``): medians over repeats of method / floor seconds.
    """
    memory = _MemoryProbe(task.device, fresh_process)
    memory.start()
    counter = _ForwardCounter(task.model)
    runs, floors, counts, mem = [], [], {}, {}
    try:
        for _ in range(repeats):
            runs.append(_fit_and_score(task, name, options))
            counts = counter.reset()
            # memory of one fit + score (repeats are alike), read before any floor run can raise the peak
            mem = mem or {"peak_mem_mb": memory.peak_mb(), "mem_rise_mb": memory.rise_mb()}
            if floor:  # interleaved with the method's repeats, so drifting load hits both alike
                floors.append(gex_floor(task, build_method(name, **options).config))
                counter.reset()  # the floor's forwards are not the method's
    finally:
        counter.close()
    row: dict[str, Any] = {"n": len(task.train), "repeats": repeats} | counts
    for key in ("fit_s", "score_s"):
        row[key] = statistics.median(r[key] for r in runs)
    wall = _stats([r["wall_s"] for r in runs])
    row |= {"wall_s": wall["median"], "wall_s_mean": wall["mean"], "wall_s_std": wall["std"],
            "samples_per_s": len(task.train) / wall["median"]} | mem
    row["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    if floors:  # medians of the ratios of adjacent (method, floor) pairs: robust to slow drifts of the load
        row |= {"floor_s": statistics.median(f["wall_s"] for f in floors),
                "ratio_to_floor": statistics.median(r["wall_s"] / f["wall_s"] for r, f in zip(runs, floors)),
                "ratio_to_floor_cpu": statistics.median(r["cpu_s"] / f["cpu_s"] for r, f in zip(runs, floors))}
    return row


def gex_floor(task: InfluenceTask, cfg) -> dict[str, float]:
    """GEX's bare compute, timed: ``M x ft_step`` plain SGD steps on the same stream, ``M + 1`` eval passes.

    No snapshots, BN refreshes, caching or bookkeeping: the least any implementation of the same ensemble does.

    Args:
        task: theta* and the data.
        cfg: the ``gex.ensemble.EnsembleConfig`` of the GEX being compared.

    Returns:
        ``{"train_s", "eval_s", "wall_s", "cpu_s"}``.
    """
    model = clone_model(task.model)
    params = [p for p in model.parameters() if p.requires_grad]
    stream = batch_stream(task.train, cfg.ft_batch_size, cfg.ft_augment, task.generator(0xF100), task.device)
    recipe = replace(task.recipe, lr=cfg.ft_lr, warmup_frac=0.0,
                     schedule="constant" if cfg.ft_schedule == "constant" else "warmup_cosine")
    clip = 1.0 if cfg.ft_schedule == "constant" else None

    def train_all() -> None:
        model.train()
        for _ in range(cfg.num_members):
            opt = torch.optim.SGD(params, lr=cfg.ft_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            for step in range(cfg.ft_step):
                batch = next(stream)
                opt.param_groups[0]["lr"] = lr_at(step, cfg.ft_step, recipe)
                opt.zero_grad(set_to_none=True)
                per_sample_loss(model(batch.x), batch.y, task.loss).mean().backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()

    @torch.no_grad()
    def eval_all() -> None:
        model.eval()
        for _ in range(cfg.num_members + 1):
            for batch in iter_batches(task.train, EVAL_BATCH, device=task.device):
                per_sample_loss(model(batch.x), batch.y, task.loss).cpu()

    train_s, train_cpu, _ = _timed(train_all, task.device)
    eval_s, eval_cpu, _ = _timed(eval_all, task.device)
    return {"train_s": train_s, "eval_s": eval_s, "wall_s": train_s + eval_s, "cpu_s": train_cpu + eval_cpu}


# ------------------------------------------------------------------------------- per-sample-gradient paths

class _Opacus:
    """Opacus's ``GradSampleModule`` on a copy of the model (it adds hooks to the module it wraps).

    Opacus records activations only in training mode, so its layers are put in train mode and every BatchNorm back
    in eval mode (running statistics: the same function as the other paths). Opacus has no BatchNorm rule and
    refuses layers with buffers, so BatchNorm parameters must be frozen first (``freeze_norm_layers``).
    """

    def __init__(self, model: nn.Module):
        from opacus import GradSampleModule
        self.names = param_names(model)
        self.module = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum", strict=False)
        self.module.train()
        for layer in self.module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()

    def __call__(self, x: Tensor, y: Tensor, loss: str) -> Tensor:
        self.module.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # Opacus' module backward hooks warn when the input needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_sample_loss(self.module(x), y, loss).sum().backward()
        params = dict(self.module._module.named_parameters())
        return torch.cat([params[n].grad_sample.reshape(len(x), -1) for n in self.names], dim=1)


def opacus_grads(model: nn.Module) -> Callable[[Tensor, Tensor, str], Tensor] | str:
    """A ``(x, y, loss) -> (b, P)`` function backed by Opacus, or why there is none (a message)."""
    try:
        return _Opacus(model)
    except ImportError:
        return "opacus is not installed (pip install opacus)"
    except NotImplementedError as err:  # Opacus refuses layers with buffers, i.e. trainable BatchNorm
        return f"opacus cannot run this model ({str(err).strip()}); compared on the BN-frozen copy only"


def freeze_norm_layers(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorm affine parameters are frozen, so that Opacus (no BatchNorm rule) can run it."""
    frozen = copy.deepcopy(model)
    for module in frozen.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)
    return frozen


def _grad_fns(model: nn.Module, paths: list[str]) -> tuple[dict[str, Callable], dict[str, str]]:
    fns: dict[str, Callable] = {"hooks": lambda x, y, loss: per_sample_grads_hooks(model, x, y, loss),
                                "vmap": lambda x, y, loss: per_sample_grads(model, x, y, loss)}
    skipped = {}
    if "opacus" in paths:
        fn = opacus_grads(model)
        if isinstance(fn, str):
            skipped["opacus"] = fn
        else:
            fns["opacus"] = fn
    return {k: v for k, v in fns.items() if k in paths}, skipped


def _one_pass(fn: Callable, x: Tensor, y: Tensor, loss: str, chunk: int, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds of one per-sample-gradient pass over ``x``; each chunk is reduced to squared norms."""
    def work() -> None:
        for i in range(0, len(x), chunk):
            fn(x[i:i + chunk], y[i:i + chunk], loss).pow(2).sum(1)
    return _timed(work, device)[:2]


def compare_grad_paths(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce", chunk: int = 256,
                       repeats: int = 3, paths: list[str] = list(GRAD_PATHS)) -> list[dict[str, Any]]:
    """Median wall time of one per-sample-gradient pass over ``x`` per path, and its error against ``vmap``.

    Every path is warmed up on the first chunk (which also gives its largest absolute difference from the
    ``vmap(grad)`` reference), then the repeats are interleaved across paths so that drifting machine load hits
    them alike.

    Returns:
        One row per path: ``path``, ``P``, ``wall_s``, ``cpu_s``, ``samples_per_s``, ``max_abs_err``,
        ``ratio_to_hooks`` and ``cpu_ratio_to_hooks``; a path that cannot run has a ``status`` instead.
    """
    model.eval()
    fns, skipped = _grad_fns(model, paths)
    ref = per_sample_grads(model, x[:chunk], y[:chunk], loss) if "vmap" in fns else None
    errs = {k: float((fn(x[:chunk], y[:chunk], loss) - ref).abs().max()) if ref is not None else float("nan")
            for k, fn in fns.items()}  # also each path's warm-up
    device, times = x.device, {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_one_pass(fn, x, y, loss, chunk, device))
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = []
    for k, v in times.items():
        wall = [w for w, _ in v]
        rows.append({"path": k, "P": size, "wall_s": statistics.median(wall), "wall_s_std": _stats(wall)["std"],
                     "cpu_s": statistics.median(c for _, c in v), "samples_per_s": len(x) / statistics.median(wall),
                     "max_abs_err": errs[k]})
    hooks = next((r for r in rows if r["path"] == "hooks"), None)
    for row in rows:
        row["ratio_to_hooks"] = row["wall_s"] / hooks["wall_s"] if hooks else float("nan")
        row["cpu_ratio_to_hooks"] = row["cpu_s"] / hooks["cpu_s"] if hooks else float("nan")
    return rows + [{"path": k, "P": size, "status": why} for k, why in skipped.items()]


def grad_path_table(task: InfluenceTask, opts: BenchConfig) -> pd.DataFrame:
    """``compare_grad_paths`` on the full model (hooks, vmap) and on its BN-frozen copy (all paths, Opacus too)."""
    n = min(opts.grad_n, len(task.train))
    data = task.train.subset(torch.arange(n)).to(task.device)
    frames = []
    for variant, model in (("full", task.model), ("bn_frozen", freeze_norm_layers(task.model))):
        paths = [p for p in opts.grad_paths if variant == "bn_frozen" or p != "opacus"]
        rows = compare_grad_paths(model, data.x, data.y, task.loss, opts.grad_chunk, opts.repeats, paths)
        frames.append(pd.DataFrame(rows).assign(variant=variant, n=n))
    frame = pd.concat(frames, ignore_index=True)
    first = ["variant", "path", "n", "P"]
    return frame[first + [c for c in frame.columns if c not in first]]


# ------------------------------------------------------------------------------------- alternating timing

Timer = Callable[[Callable[[], Any]], tuple]  # runs one call; its result's first item is the seconds


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, timer: Timer,
              warmups: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[tuple]]:
    """Time the functions of a comparison in alternation (A, B, A, B, ...) so that drifting load hits them alike.

    Timing each setting once, one after the other, turns a load change between them into a fake ratio (the
    reference run's channels_last 1.67x was 1.00-1.02x in an alternating check).

    Args:
        fns: name -> work, in the order called within each round.
        repeats: timed rounds (each calls every function once).
        timer: times one call, e.g. ``lambda fn: _timed(fn, device)``.
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


# ------------------------------------------------------------------------- batched members, speed switches

def _speed_rows(what: str, fns: dict[str, Callable[[], Any]], opts: BenchConfig, device: torch.device,
                warmups: dict[str, Callable[[], Any]] | None = None,
                **extra: Any) -> tuple[list[dict[str, Any]], Any]:
    """One alternating comparison of the speed table: rows with medians and ratios to the first setting, and the
    first setting's output of its first timed round."""
    runs = alternate(fns, opts.speed_repeats, lambda fn: _timed(fn, device), warmups)
    base = next(iter(fns))
    wall = median_ratios({k: [r[0] for r in v] for k, v in runs.items()}, base)
    cpu = median_ratios({k: [r[1] for r in v] for k, v in runs.items()}, base)
    rows = [{"what": what, "setting": k, "wall_s": wall[k]["median"], "cpu_s": cpu[k]["median"],
             "speedup": wall[k]["ratio"], "cpu_speedup": cpu[k]["ratio"], "speedup_min": wall[k]["ratio_min"],
             "speedup_max": wall[k]["ratio_max"], "repeats": opts.speed_repeats} | extra for k in fns]
    return rows, runs[base][0][2]


def _step_runner(task: InfluenceTask, recipe, steps: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(warm-up, run): one and then ``steps`` SGD steps of ``recipe`` on a clone of theta* and its own stream; each
    run continues from the last (the cost of a step does not depend on where it starts)."""
    from gex.train import sgd_steps
    model = clone_model(task.model)
    stream = batch_stream(task.train, recipe.batch_size, recipe.augment, task.generator(0x5BED), task.device)
    return (lambda: sgd_steps(model, stream, 1, recipe, desc="speed warm-up"),
            lambda: sgd_steps(model, stream, steps, recipe, desc="speed"))


def speed_table(task: InfluenceTask, opts: BenchConfig) -> pd.DataFrame:
    """Batched ensemble members and the training loop's speed switches, as ratios measured in this run.

    On the bench's ``n_train`` subset with GEX's options: building ``speed_members`` independent members (so that
    k of them can train together) of ``speed_steps // speed_members`` steps with each ``batch_members`` of
    ``member_batches`` (in memory); their member losses one member per pass against all members in one vmapped
    pass; and ``speed_steps`` SGD steps of a cycle's recipe with ``channels_last`` and ``compile`` on against off.
    Each group is timed in alternation (``alternate``) over ``speed_repeats`` rounds after an untimed warm-up
    (compilation, first vmap): ``wall_s`` / ``cpu_s`` are medians, ``speedup`` = the group's first setting's median
    / this median (> 1 = faster), ``speedup_min`` / ``speedup_max`` the range of the per-round ratios.
    """
    from gex.ensemble import build_ensemble, cycle_recipe
    from gex.influence import losses_for_states, losses_for_states_batched
    sub, device = subtask(task, opts.n_train, None), task.device
    base_cfg = build_method("gex", **method_options("gex", opts.method_options.get("gex", {}))).config
    cfg = replace(base_cfg, num_members=opts.speed_members, ft_step=max(1, opts.speed_steps // opts.speed_members),
                  members="independent", num_chains=1)
    rows: list[dict[str, Any]] = []
    if opts.member_batches:
        builds = {f"batch_members={k}": lambda k=k: list(build_ensemble(sub, replace(cfg, batch_members=k)))
                  for k in opts.member_batches}
        warmups = {f"batch_members={k}": lambda k=k: build_ensemble(sub, replace(cfg, batch_members=k, ft_step=1,
                                                                                 bn_batches=1))
                   for k in opts.member_batches}
        built, members = _speed_rows("build members", builds, opts, device, warmups, n=len(sub.train),
                                     members=cfg.num_members, steps=cfg.num_members * cfg.ft_step)
        evals = {"per member": lambda: losses_for_states(sub.model, members, sub.train, sub.loss, EVAL_BATCH),
                 f"batched ({len(members)} per pass)": lambda: losses_for_states_batched(
                     sub.model, members, sub.train, sub.loss, EVAL_BATCH, len(members))}
        rows += built + _speed_rows("member losses", evals, opts, device, n=len(sub.train), members=len(members))[0]
    recipe = cycle_recipe(base_cfg, task.loss)
    switches = {"plain": {}, "channels_last": {"channels_last": True}, "compile": {"compile": True}}
    runners = {key: _step_runner(sub, replace(recipe, **on), opts.speed_steps) for key, on in switches.items()}
    rows += _speed_rows("sgd steps", {k: run for k, (_, run) in runners.items()}, opts, device,
                        {k: warm for k, (warm, _) in runners.items()}, n=len(sub.train), steps=opts.speed_steps)[0]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- method jobs

def _method_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Load theta* (from the cache), warm up, and time one method at each ``(n, repeats)`` point (ascending n)."""
    from experiments.tasks import register_methods
    settings = settings_from(OmegaConf.create(job["cfg"]))
    seed_everything(settings.seed)
    _, task = load_task(settings)
    register_methods()
    if job["warmup"]:
        _warm_up(task)
    rows = []
    for n, repeats in job["points"]:
        try:
            row = time_method(subtask(task, n, None), job["method"], job["options"], repeats,
                              floor=job["floor"] and n == job["floor_n"], fresh_process=job["isolated"])
            row["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - a failing method is reported, the bench goes on
            log.warning("bench: %s at n=%d failed: %s", job["method"], n, traceback.format_exc(limit=3))
            row = {"n": n, "status": f"error: {type(err).__name__}: {err}".splitlines()[0][:300]}
        rows.append(row | {"method": job["method"], "isolated": job["isolated"]})
    return rows


def _child(job: dict[str, Any], out: str) -> None:
    """Entry of a method's own process: run the job, write its rows as JSON."""
    atomic_write_text(json.dumps(_method_job(job)), Path(out))


def _run_job(job: dict[str, Any], timeout_s: float, workdir: Path) -> list[dict[str, Any]]:
    """Run a job in a fresh process (``job['isolated']``) or in this one; a crash or timeout becomes a status."""
    if not job["isolated"]:
        return _method_job(job)
    out = workdir / f"job_{job['method']}.json"
    proc = multiprocessing.get_context("spawn").Process(target=_child, args=(job, str(out)))
    proc.start()
    proc.join(timeout_s)
    status = None
    if proc.is_alive():
        proc.terminate()
        proc.join()
        status = f"timeout after {timeout_s:.0f}s (bench.timeout_s)"
    elif proc.exitcode != 0 or not out.is_file():
        status = f"failed: its process exited with code {proc.exitcode}"
    if status is not None:
        return [{"method": job["method"], "n": n, "status": status, "isolated": True} for n, _ in job["points"]]
    return json.loads(out.read_text())


def _jobs(cfg: DictConfig, opts: BenchConfig, names: list[str]) -> list[dict[str, Any]]:
    """One job per method: the table point (``n_train``) and, for sweep methods, every sweep point."""
    container = OmegaConf.to_container(cfg, resolve=True)
    sweep = set(opts.sweep_methods)
    jobs = []
    for name in names + [m for m in opts.sweep_methods if m in METHODS and m not in names]:
        points = {opts.n_train: opts.repeats} if name in names else {}
        for n in (opts.sweep_n if name in sweep else []):
            points.setdefault(n, opts.sweep_repeats)
        jobs.append({"cfg": container, "method": name, "points": sorted(points.items()),
                     "options": method_options(name, opts.method_options.get(name, {})), "warmup": opts.warmup,
                     "floor": opts.floor and name == "gex", "floor_n": opts.n_train, "isolated": opts.isolate})
    return jobs


# --------------------------------------------------------------------------------------- tables, plot

def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "/")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``frame`` (floats to 4 significant digits, NaN blank)."""
    if frame.empty:
        return "(empty)"
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _write_table(frame: pd.DataFrame, stem: Path) -> str:
    """Write ``<stem>.csv`` and ``<stem>.md``; return the Markdown."""
    frame.to_csv(stem.with_suffix(".csv"), index=False)
    text = markdown_table(frame)
    atomic_write_text(text + "\n", stem.with_suffix(".md"))
    return text


def _sweep_plot(sweep: pd.DataFrame, path: Path) -> None:
    """Wall time against N (log-log, with a slope-1 guide) and the peak-memory rise against N (linear from 0: flat
    for streamed methods), one line per method."""
    from matplotlib import ticker
    from matplotlib.figure import Figure

    from experiments.plots import save_figure
    fig = Figure(figsize=(9.0, 3.5))
    ax_t, ax_m = fig.subplots(1, 2)
    for name, part in sweep.groupby("method"):
        part = part.sort_values("n")
        ax_t.plot(part["n"], part["wall_s"], "o-", label=name)
        ax_m.plot(part["n"], part["mem_rise_mb"], "o-", label=name)
    n = sweep["n"].sort_values().unique()
    if len(n) > 1:
        ax_t.plot(n, sweep["wall_s"].max() * n / n[-1], "k:", label="linear")
    ax_t.set_yscale("log")
    ax_m.set_ylim(bottom=0)
    for ax, what in ((ax_t, "wall time (s)"), (ax_m, "peak memory rise (MB)")):
        ax.set_xscale("log")
        ax.set_xticks(n)
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("training samples N")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def _metrics(table: pd.DataFrame, grads: pd.DataFrame, peers: pd.DataFrame | None) -> dict[str, float]:
    """DESIGN.md names: ``<m>.wall_s``, ``<m>.peak_mem_mb``, ``<m>.samples_per_s``, ``gex.ratio_to_floor``, ..."""
    out: dict[str, float] = {}
    keys = ("wall_s", "wall_s_std", "fit_s", "score_s", "cpu_s", "peak_mem_mb", "mem_rise_mb", "samples_per_s",
            "forwards", "grad_forwards", "floor_s", "ratio_to_floor", "ratio_to_floor_cpu")
    for _, row in table[table["status"] == "ok"].iterrows():
        out |= {f"{row['method']}.{k}": float(row[k]) for k in keys if k in row and pd.notna(row[k])}
    for _, row in grads[grads.get("wall_s", pd.Series(dtype=float)).notna()].iterrows():
        prefix = f"grads.{row['path']}" + ("" if row["variant"] == "full" else f"_{row['variant']}")
        out |= {f"{prefix}.{k}": float(row[k]) for k in ("wall_s", "cpu_s", "ratio_to_hooks", "cpu_ratio_to_hooks")}
    if peers is not None and not peers.empty:
        for _, row in peers[peers["status"] == "ok"].iterrows():
            out |= {f"{row['method']}.peer_time_ratio": float(row["peer_time_ratio"]),
                    f"{row['method']}.peer_spearman": float(row["peer_spearman"])}
    return out


def _hardware() -> str:
    import platform
    info = versions()
    return (f"{info['host_device']}, {torch.get_num_threads()} torch threads, torch {info['torch']}, "
            f"python {info['python']}, git {info['git']}, {platform.platform()}")


# ------------------------------------------------------------------------------------------ the run

def _registered(names: list[str]) -> list[str]:
    """The registered methods among ``names``, in order; the others are reported and skipped."""
    missing = [m for m in names if m not in METHODS]
    for name in missing:
        print(f"[bench] skipping {name}: no method is registered under that name (yet)")
    return [m for m in names if m in METHODS]


def _peer_table(task: InfluenceTask, opts: BenchConfig) -> pd.DataFrame:
    """``bench/peers.py``'s comparisons on its tiny task (imported only when ``bench.peers=true``)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from bench.peers import peer_table
    except ImportError as err:
        print(f"[bench] skipping peers: bench/peers.py cannot be imported ({err})")
        return pd.DataFrame(columns=["method", "peer", "status"])
    return peer_table(opts.peer_n, task.seed, str(task.device), opts.method_options, opts.peer_repeats)


def _summary(run_dir: Path, sections: dict[str, str]) -> None:
    lines = ["# gex-bench speed benchmark", "", f"Hardware and versions: {_hardware()}", ""]
    for title, text in sections.items():
        lines += [f"## {title}", "", text, ""]
    atomic_write_text("\n".join(lines), run_dir / "bench.md")


def _method_rows(cfg: DictConfig, opts: BenchConfig, run_dir: Path, names: list[str]) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".jobs-") as work:
        for job in _jobs(cfg, opts, names):
            print(f"[bench] {job['method']}: n={[n for n, _ in job['points']]}")
            rows += _run_job(job, opts.timeout_s, Path(work))
    frame = pd.DataFrame(rows)
    first = [c for c in METHOD_COLUMNS if c in frame.columns]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    for row in rows:
        if row.get("status") != "ok":
            print(f"[bench] {row['method']} at n={row['n']}: {row['status']}")
    return frame


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Time every method, the GEX floor, the gradient paths, the sweep (and the peers); write the record."""
    from experiments.tasks import register_methods
    start = time.perf_counter()
    settings = settings_from(cfg)
    opts = typed_config(BenchConfig, cfg.bench, "bench")
    record = RunRecord(run_dir, cfg)
    register_methods()
    names = _registered(list(opts.methods))
    _, task = load_task(settings, logger)  # pretrains once; each method's process reuses the cached theta*
    largest = max([opts.n_train, *opts.sweep_n])
    if largest > len(task.train):
        raise UsageError(f"bench needs {largest} training samples (bench.n_train / bench.sweep_n) but data.n_train "
                         f"gives {len(task.train)}; raise data.n_train or lower them")
    if opts.warmup:
        _warm_up(task)
    grads = grad_path_table(task, opts)
    frame = _method_rows(cfg, opts, run_dir, names)
    table = frame[frame["method"].isin(names) & (frame["n"] == opts.n_train)].reset_index(drop=True)
    sweep = frame[frame["method"].isin(opts.sweep_methods) & (frame["status"] == "ok")].reset_index(drop=True)
    peers = _peer_table(task, opts) if opts.peers else None
    sections = {"Methods": _write_table(table, run_dir / "bench_methods"),
                "Per-sample-gradient paths": _write_table(grads, run_dir / "bench_grads"),
                "Scaling sweep": _write_table(sweep, run_dir / "bench_sweep")}
    if peers is not None:
        sections["Peers"] = _write_table(peers, run_dir / "bench_peers")
    if opts.member_batches:
        sections["Batched members and speed switches"] = _write_table(speed_table(task, opts),
                                                                      run_dir / "bench_speed")
    if len(sweep):
        _sweep_plot(sweep, run_dir / "bench_sweep.png")
    _summary(run_dir, sections)
    metrics = _metrics(table, grads, peers) | {
        "task": "bench", "method": "bench", "data": settings.data.name, "model": settings.model.name,
        "seed": settings.seed, "n_train": opts.n_train, "repeats": opts.repeats, "isolated": int(opts.isolate),
        "hardware": _hardware(), "wall_s": time.perf_counter() - start} | versions()
    record.write(metrics)
    for title, text in sections.items():
        print(f"\n## {title}\n{text}")
    if "gex.ratio_to_floor" in metrics:
        print(f"\ngex.ratio_to_floor = {metrics['gex.ratio_to_floor']:.3f} (target <= 1.15)")
    return metrics


@hydra.main(config_path="../configs", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("bench")(run)(cfg)


if __name__ == "__main__":
    main()
