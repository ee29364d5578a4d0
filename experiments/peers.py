"""Peer libraries against our methods at the default scale: ``python -m experiments.peers``.

On the default setting (Fashion-MNIST, the cached theta* and its pretraining checkpoints, cnn_small), every pair
of ``peers.pairs`` (``bench.peers.PAIRS``) runs on class-balanced training subsets of each size in
``peers.sizes``: each side fits and scores self-influence there, timed in ``peers.repeats`` alternating rounds.
Writes per (size, pair) the median times, their ratio with its per-round range, Spearman between the two score
vectors and both sides' detection AUROC / AP (``peers.csv`` / ``peers.md``), and per pair, scored count and side the
fixed and per-sample cost from a line through the sizes (``peers_cost.csv``). Both sides' settings are in every row. The
per-sample inverse-HVP pairs (if_cg, lissa) score ``peers.scored`` samples of each size, a fixed random subset, with
the curvature of the whole size (one inverse-HVP per scored sample is their cost on both sides); arnoldi scores all.
``peers.summary_only=true peers.summary_of=<glob> peers.summary_out=<folder>`` measures nothing: it pools the
``peers.csv`` of earlier records (e.g. one per size, run separately) into one table and one cost split.
The micro-benchmark on a tiny model is ``python -m bench.peers`` (results/bench/README.md).
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig

from bench.peers import PAIRS, SUBSET_PAIRS, cost_split, peer_campaign
from bench.tables import markdown_table
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
from gex.runs import atomic_write_text

__all__ = ["PeersConfig", "write_tables", "pool_records", "run"]


@dataclass
class PeersConfig:
    """Options of ``experiments.peers`` (``peers.*``).

    Attributes:
        pairs: pairs of ``bench.peers.PAIRS`` to run.
        sizes: training-subset sizes (class-balanced subsets of the loaded training set).
        repeats: timed rounds per pair and size, ours and the peer alternating.
        method_options: per-method options on top of ``configs/method/<name>.yaml`` (both sides get them).
        scored: the per-sample inverse-HVP pairs (``bench.peers.SUBSET_PAIRS``) score a fixed random subset of
            this many samples of each size, the curvature still over the whole size; 0 = every sample.
        summary_only: measure nothing; pool the ``peers.csv`` of the records matching ``summary_of`` into
            ``summary_out``.
        summary_of: glob of record folders.
        summary_out: folder of the pooled ``peers.md`` / ``peers.csv`` / ``peers_cost.csv``.
    """

    pairs: list[str] = field(default_factory=lambda: list(PAIRS))
    sizes: list[int] = field(default_factory=lambda: [1000, 2500, 5000, 10000])
    repeats: int = 3
    method_options: dict[str, Any] = field(default_factory=dict)
    scored: int = 10
    summary_only: bool = False
    summary_of: str = ""
    summary_out: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.pairs) - set(PAIRS))
        if unknown or not self.pairs:
            raise UsageError(f"peers.pairs has unknown {unknown or 'nothing'}; valid: {list(PAIRS)}")
        if self.repeats < 1 or not self.sizes or min(self.sizes) < 1:
            raise UsageError(f"peers.repeats ({self.repeats}) and peers.sizes ({list(self.sizes)}) must be positive")
        if self.scored < 0:
            raise UsageError(f"peers.scored={self.scored} must be a number of samples >= 1, or 0 (every sample)")
        if self.summary_only and not (self.summary_of and self.summary_out):
            raise UsageError("peers.summary_only=true needs peers.summary_of (a glob of record folders) and "
                             "peers.summary_out")


def write_tables(table: pd.DataFrame, out: Path, header: str) -> pd.DataFrame:
    """``peers.csv``, ``peers_cost.csv`` (``cost_split``) and ``peers.md`` into ``out``; returns the cost split."""
    costs = cost_split(table)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table.to_csv(index=False), out / "peers.csv")
    atomic_write_text(costs.to_csv(index=False), out / "peers_cost.csv")
    shown = [c for c in table.columns if not c.endswith("_settings") and not c.endswith("rounds_s")]
    atomic_write_text(header + markdown_table(table[shown]) + "\n\n## Fixed and per-sample cost\n\n"
                      + (markdown_table(costs) if len(costs) else "(fewer than two sizes)") + "\n",
                      out / "peers.md")
    return costs


def pool_records(pattern: str) -> pd.DataFrame:
    """The rows of every ``peers.csv`` under the folders matching ``pattern``, sorted by pair and size, with the
    record each row came from (``record``)."""
    paths = sorted(glob.glob(f"{pattern}/peers.csv"))
    if not paths:
        raise UsageError(f"peers.summary_of={pattern!r} matches no folder holding peers.csv")
    frames = [pd.read_csv(p).assign(record=Path(p).parent.name) for p in paths]
    return pd.concat(frames, ignore_index=True).sort_values(["method", "n"], kind="stable").reset_index(drop=True)


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Run the pairs at every size; write the tables and the record."""
    opts = typed_config(PeersConfig, cfg.peers, "peers")
    if opts.summary_only:
        table = pool_records(opts.summary_of)
        write_tables(table, Path(opts.summary_out), f"# Peers pooled from {sorted(set(table.record))}\n\n")
        metrics = {"task": "peers_summary", "method": "peers", "records": sorted(set(table.record))} | versions()
        RunRecord(run_dir, cfg).write(metrics)
        print((Path(opts.summary_out) / "peers.md").read_text())
        return metrics
    settings = settings_from(cfg)
    record = RunRecord(run_dir, cfg)
    _, task = load_task(settings, logger)
    if max(opts.sizes) > len(task.train):
        raise UsageError(f"peers.sizes goes up to {max(opts.sizes)} but data.n_train gives {len(task.train)} "
                         f"training samples; lower peers.sizes or raise data.n_train")
    table = peer_campaign(task, list(opts.sizes), list(opts.pairs), opts.repeats, dict(opts.method_options),
                          progress=lambda what: print(f"[peers] {what}", flush=True), scored=opts.scored or None)
    threads = torch.get_num_threads()
    header = (f"# Peers at the default scale ({settings.data.name}, {settings.model.name}, sizes "
              f"{sorted(opts.sizes)}, {opts.repeats} alternating rounds, {threads} torch thread(s))\n\n"
              + (f"{', '.join(p for p in opts.pairs if p in SUBSET_PAIRS)} score a fixed random subset of "
                 f"{opts.scored} samples of each size (column `scored`); their curvature is over the whole size.\n\n"
                 if opts.scored and set(opts.pairs) & set(SUBSET_PAIRS) else ""))
    write_tables(table, run_dir, header)
    metrics: dict[str, Any] = {"task": "peers", "method": "peers", "data": settings.data.name,
                               "model": settings.model.name, "seed": settings.seed, "threads": threads,
                               "repeats": opts.repeats, "scored": opts.scored} | versions()
    for row in table.to_dict("records"):
        key = f"{row['method']}.n{row['n']}"
        metrics[f"{key}.status"] = row["status"]
        for col in ("ours_s", "peer_s", "peer_time_ratio", "peer_time_ratio_min", "peer_time_ratio_max",
                    "peer_spearman", "ours_auroc", "ours_ap", "peer_auroc", "peer_ap"):
            if col in row and row[col] == row[col]:
                metrics[f"{key}.{col}"] = float(row[col])
    record.write(metrics)
    print((run_dir / "peers.md").read_text())
    return metrics


@hydra.main(config_path="../configs", config_name="peers", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("peers")(run)(cfg)


if __name__ == "__main__":
    cli(main)
