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

import json
import logging
import multiprocessing
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from bench.config import BenchConfig
from bench.grad_paths import compare_grad_paths, freeze_norm_layers
from bench.methods import method_options, speed_table, subtask, time_method, warm_up
from bench.peers import peer_table
from bench.tables import write_table
from experiments.launch import cli, entry_point
from experiments.scaffold import (
    RunLogger,
    RunRecord,
    UsageError,
    load_task,
    settings_from,
    typed_config,
    versions,
)
from gex.attribution import METHODS, InfluenceTask
from gex.runs import atomic_write_text
from gex.utils import seed_everything

__all__ = ["grad_path_table", "run", "main"]

log = logging.getLogger("gex")

METHOD_COLUMNS = ("method", "n", "status", "wall_s", "fit_s", "score_s", "cpu_s", "wall_s_mean", "wall_s_std",
                  "samples_per_s", "peak_mem_mb", "mem_rise_mb", "floor_s", "floor_bn_s", "ratio_to_floor",
                  "ratio_to_floor_min", "ratio_to_floor_max", "ratio_to_floor_cpu",
                  "forwards", "grad_forwards", "forward_rows", "repeats", "isolated")


def grad_path_table(task: InfluenceTask, opts: BenchConfig) -> pd.DataFrame:
    """``compare_grad_paths`` on the full model (hooks, vmap) and on its BN-frozen copy (all paths, Opacus too)."""
    if not opts.grad_paths:
        return pd.DataFrame(columns=["variant", "path", "n", "P", "status"])
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


def _method_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Load theta* (from the cache), warm up, and time one method at each ``(n, repeats)`` point (ascending n)."""
    from experiments.scaffold import register_methods
    settings = settings_from(OmegaConf.create(job["cfg"]))
    seed_everything(settings.seed)
    _, task = load_task(settings)
    register_methods()
    if job["warmup"]:
        warm_up(task)
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
        floor = opts.floor and name == "gex" and name in names
        if floor:
            points[_floor_n(opts)] = opts.repeats
        for n in (opts.sweep_n if name in sweep else []):
            points.setdefault(n, opts.sweep_repeats)
        jobs.append({"cfg": container, "method": name, "points": sorted(points.items()),
                     "options": method_options(name, opts.method_options.get(name, {})), "warmup": opts.warmup,
                     "floor": floor, "floor_n": _floor_n(opts), "isolated": opts.isolate})
    return jobs


def _floor_n(opts: BenchConfig) -> int:
    return opts.floor_n or opts.n_train


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
    """The names of docs/run_records.md: ``<m>.wall_s``, ``<m>.peak_mem_mb``, ``<m>.samples_per_s``, ``gex.ratio_to_floor``, ..."""
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


def _floor_metrics(floor: pd.DataFrame) -> dict[str, float]:
    """``gex.ratio_to_floor`` (the ratio of medians) with its per-round range, at ``bench.floor_n``."""
    keys = ("floor_s", "floor_bn_s", "ratio_to_floor", "ratio_to_floor_min", "ratio_to_floor_max",
            "ratio_to_floor_cpu", "n")
    ok = floor[floor.get("status", pd.Series(dtype=str)) == "ok"] if not floor.empty else floor
    if ok.empty or "ratio_to_floor" not in ok:
        return {}
    row = ok.iloc[0]
    return {f"gex.{k}" if k != "n" else "gex.floor_n": float(row[k]) for k in keys if k in row and pd.notna(row[k])}


def _hardware() -> str:
    import platform
    info = versions()
    return (f"{info['host_device']}, {torch.get_num_threads()} torch threads, torch {info['torch']}, "
            f"python {info['python']}, git {info['git']}, {platform.platform()}")


def _registered(names: list[str]) -> list[str]:
    """The registered methods among ``names``, in order; the others are reported and skipped."""
    missing = [m for m in names if m not in METHODS]
    for name in missing:
        print(f"[bench] skipping {name}: no method is registered under that name (yet)")
    return [m for m in names if m in METHODS]


def _peer_table(task: InfluenceTask, opts: BenchConfig) -> pd.DataFrame:
    """``bench.peers``'s comparisons on its tiny task (when ``bench.peers=true``)."""
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
    from experiments.scaffold import register_methods
    start = time.perf_counter()
    settings = settings_from(cfg)
    opts = typed_config(BenchConfig, cfg.bench, "bench")
    record = RunRecord(run_dir, cfg)
    register_methods()
    names = _registered(list(opts.methods))
    _, task = load_task(settings, logger)  # pretrains once; each method's process reuses the cached theta*
    largest = max([opts.n_train, _floor_n(opts), *opts.sweep_n])
    if largest > len(task.train):
        raise UsageError(f"bench needs {largest} training samples (bench.n_train / bench.sweep_n) but data.n_train "
                         f"gives {len(task.train)}; raise data.n_train or lower them")
    if opts.warmup:
        warm_up(task)
    grads = grad_path_table(task, opts)
    frame = _method_rows(cfg, opts, run_dir, names)
    table = frame[frame["method"].isin(names) & (frame["n"] == opts.n_train)].reset_index(drop=True)
    floor = frame[(frame["method"] == "gex") & (frame["n"] == _floor_n(opts))].reset_index(drop=True)
    sweep = frame[frame["method"].isin(opts.sweep_methods) & (frame["status"] == "ok")].reset_index(drop=True)
    peers = _peer_table(task, opts) if opts.peers else None
    sections = {"Methods": write_table(table, run_dir / "bench_methods"),
                f"GEX against its compute floor (n = {_floor_n(opts)})": write_table(floor, run_dir / "bench_floor"),
                "Per-sample-gradient paths": write_table(grads, run_dir / "bench_grads"),
                "Scaling sweep": write_table(sweep, run_dir / "bench_sweep")}
    if peers is not None:
        sections["Peers"] = write_table(peers, run_dir / "bench_peers")
    if opts.member_batches:
        sections["Batched members and speed switches"] = write_table(speed_table(task, opts),
                                                                      run_dir / "bench_speed")
    if len(sweep):
        _sweep_plot(sweep, run_dir / "bench_sweep.png")
    _summary(run_dir, sections)
    metrics = _metrics(table, grads, peers) | _floor_metrics(floor) | {
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
    cli(main)
