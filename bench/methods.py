"""Timing a method end to end (fit + self-influence, fresh artefact cache each repeat), GEX against its bare
compute floor, and the speed switches of the training loop (batched members, channels_last, compile).
"""
from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from omegaconf import OmegaConf

from bench.config import BenchConfig
from bench.timing import (
    ForwardCounter,
    MemoryProbe,
    alternate,
    median_ratios,
    stats,
    timed,
)
from gex.attribution import InfluenceTask, build_method
from gex.data import balanced_subset, iter_batches
from gex.ensemble import cycle_recipe
from gex.grads import per_sample_grads, per_sample_grads_hooks
from gex.ihvp import hvp
from gex.losses import per_sample_loss
from gex.runs import ArtifactCache
from gex.train import batch_stream, clone_model, lr_at, sgd_steps, update_bn

__all__ = ["CONFIG_DIR", "EVAL_BATCH", "method_options", "subtask", "warm_up", "fit_and_score", "time_method",
           "gex_floor", "speed_table"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

WARMUP_ROWS = 64          # samples of the generic warm-up (one chunk of each gradient path, one HVP)

EVAL_BATCH = 1024         # samples per eval forward of the GEX floor (GEX's default batch_size)


def warm_up(task: InfluenceTask) -> None:
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


def fit_and_score(task: InfluenceTask, name: str, options: dict[str, Any]) -> dict[str, float]:
    """One timed fit + self-influence on the training set, in a fresh artefact cache."""
    with tempfile.TemporaryDirectory(prefix="gex-bench-") as tmp:
        sub = replace(task, cache=ArtifactCache(tmp))
        method = build_method(name, **options)
        fit_s, fit_cpu, _ = timed(lambda: method.fit(sub), task.device)
        score_s, score_cpu, scores = timed(lambda: method.self_influence(sub.train), task.device)
    if scores.shape != (len(task.train),) or not bool(torch.isfinite(scores).all()):
        raise RuntimeError(f"{name} returned self-influence of shape {tuple(scores.shape)} or non-finite values")
    return {"fit_s": fit_s, "score_s": score_s, "wall_s": fit_s + score_s, "cpu_s": fit_cpu + score_cpu}


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
    memory = MemoryProbe(task.device, fresh_process)
    memory.start()
    counter = ForwardCounter(task.model)
    runs, floors, counts, mem = [], [], {}, {}
    try:
        for _ in range(repeats):
            runs.append(fit_and_score(task, name, options))
            counts = counter.reset()
            # memory of one fit + score (repeats are alike), read before any floor run can raise the peak
            mem = mem or {"peak_mem_mb": memory.peak_mb(), "mem_rise_mb": memory.rise_mb()}
            if floor:  # interleaved with the method's repeats, so drifting load hits both alike
                method = build_method(name, **options)
                floors.append(gex_floor(task, method.config, method.batch_size))
                counter.reset()  # the floor's forwards are not the method's
    finally:
        counter.close()
    row: dict[str, Any] = {"n": len(task.train), "repeats": repeats} | counts
    for key in ("fit_s", "score_s"):
        row[key] = statistics.median(r[key] for r in runs)
    wall = stats([r["wall_s"] for r in runs])
    row |= {"wall_s": wall["median"], "wall_s_mean": wall["mean"], "wall_s_std": wall["std"],
            "samples_per_s": len(task.train) / wall["median"]} | mem
    row["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    if floors:  # the ratio of the medians, and the range of the per-round ratios (drifting load shows there)
        rounds = [r["wall_s"] / f["wall_s"] for r, f in zip(runs, floors)]
        row |= {"floor_s": statistics.median(f["wall_s"] for f in floors),
                "floor_bn_s": statistics.median(f["bn_s"] for f in floors),
                "ratio_to_floor": row["wall_s"] / statistics.median(f["wall_s"] for f in floors),
                "ratio_to_floor_min": min(rounds), "ratio_to_floor_max": max(rounds),
                "ratio_to_floor_cpu": row["cpu_s"] / statistics.median(f["cpu_s"] for f in floors)}
    return row


def gex_floor(task: InfluenceTask, cfg, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """GEX's bare compute, timed in three parts: ``M x ft_step`` plain SGD steps of the ensemble's own cycle recipe
    (``gex.ensemble.cycle_recipe``: its schedule, weight decay and clipping) on the same kind of stream, the ``M``
    BN refreshes, and ``M + 1`` plain eval passes over the data.

    No snapshots, caching or bookkeeping: the least any implementation of the same ensemble does. The BN refresh is
    part of GEX's recipe (each member is evaluated with its own statistics), so it counts in the floor; ``bn_s``
    reports it as its own line.

    Args:
        task: theta* and the data.
        cfg: the ``gex.ensemble.EnsembleConfig`` of the GEX being compared.
        batch_size: samples per eval forward (GEX's ``batch_size``).

    Returns:
        ``{"train_s", "bn_s", "eval_s", "wall_s", "cpu_s"}``.
    """
    model = clone_model(task.model)
    params = [p for p in model.parameters() if p.requires_grad]
    recipe = cycle_recipe(cfg, task.loss)
    stream = batch_stream(task.train, cfg.ft_batch_size, cfg.ft_augment, task.generator(0xF100), task.device)

    def train_all() -> None:
        model.train()
        for _ in range(cfg.num_members):
            opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
            for step in range(cfg.ft_step):
                batch = next(stream)
                opt.param_groups[0]["lr"] = lr_at(step, cfg.ft_step, recipe)
                opt.zero_grad(set_to_none=True)
                per_sample_loss(model(batch.x), batch.y, task.loss).mean().backward()
                if recipe.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, recipe.clip_norm)
                opt.step()

    def refresh_all() -> None:
        for m in range(cfg.num_members):
            update_bn(model, task.train, recipe, task.generator(0xF101 + m), task.device)

    @torch.no_grad()
    def eval_all() -> None:
        model.eval()
        for _ in range(cfg.num_members + 1):
            for batch in iter_batches(task.train, batch_size, device=task.device):
                per_sample_loss(model(batch.x), batch.y, task.loss).cpu()

    train_s, train_cpu, _ = timed(train_all, task.device)
    bn_s, bn_cpu, _ = timed(refresh_all, task.device)
    eval_s, eval_cpu, _ = timed(eval_all, task.device)
    return {"train_s": train_s, "bn_s": bn_s, "eval_s": eval_s, "wall_s": train_s + bn_s + eval_s,
            "cpu_s": train_cpu + bn_cpu + eval_cpu}


def speed_rows(what: str, fns: dict[str, Callable[[], Any]], opts: "BenchConfig", device: torch.device,
                warmups: dict[str, Callable[[], Any]] | None = None,
                **extra: Any) -> tuple[list[dict[str, Any]], Any]:
    """One alternating comparison of the speed table: rows with medians and ratios to the first setting, and the
    first setting's output of its first timed round."""
    runs = alternate(fns, opts.speed_repeats, lambda fn: timed(fn, device), warmups)
    base = next(iter(fns))
    wall = median_ratios({k: [r[0] for r in v] for k, v in runs.items()}, base)
    cpu = median_ratios({k: [r[1] for r in v] for k, v in runs.items()}, base)
    rows = [{"what": what, "setting": k, "wall_s": wall[k]["median"], "cpu_s": cpu[k]["median"],
             "speedup": wall[k]["ratio"], "cpu_speedup": cpu[k]["ratio"], "speedup_min": wall[k]["ratio_min"],
             "speedup_max": wall[k]["ratio_max"], "repeats": opts.speed_repeats} | extra for k in fns]
    return rows, runs[base][0][2]


def step_runner(task: InfluenceTask, recipe, steps: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(warm-up, run): one and then ``steps`` SGD steps of ``recipe`` on a clone of theta* and its own stream; each
    run continues from the last (the cost of a step does not depend on where it starts)."""
    model = clone_model(task.model)
    stream = batch_stream(task.train, recipe.batch_size, recipe.augment, task.generator(0x5BED), task.device)
    return (lambda: sgd_steps(model, stream, 1, recipe, desc="speed warm-up"),
            lambda: sgd_steps(model, stream, steps, recipe, desc="speed"))


def speed_table(task: InfluenceTask, opts: "BenchConfig") -> pd.DataFrame:
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
    from gex.evaluation import losses_for_states, losses_for_states_batched
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
        built, members = speed_rows("build members", builds, opts, device, warmups, n=len(sub.train),
                                     members=cfg.num_members, steps=cfg.num_members * cfg.ft_step)
        evals = {"per member": lambda: losses_for_states(sub.model, members, sub.train, sub.loss, EVAL_BATCH),
                 f"batched ({len(members)} per pass)": lambda: losses_for_states_batched(
                     sub.model, members, sub.train, sub.loss, EVAL_BATCH, len(members))}
        rows += built + speed_rows("member losses", evals, opts, device, n=len(sub.train), members=len(members))[0]
    recipe = cycle_recipe(base_cfg, task.loss)
    switches = {"plain": {}, "channels_last": {"channels_last": True}, "compile": {"compile": True}}
    runners = {key: step_runner(sub, replace(recipe, **on), opts.speed_steps) for key, on in switches.items()}
    rows += speed_rows("sgd steps", {k: run for k, (_, run) in runners.items()}, opts, device,
                        {k: warm for k, (warm, _) in runners.items()}, n=len(sub.train), steps=opts.speed_steps)[0]
    return pd.DataFrame(rows)
