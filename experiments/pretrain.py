"""Pretrain theta* (or reuse the cached checkpoint): ``python -m experiments.pretrain [overrides]``.

Records ``train_acc`` (on the labels trained on, noisy included), ``noisy_fit`` (fraction of mislabeled samples
predicted as their noisy label: the benchmark needs memorization), ``test_acc`` and ``wall_s``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.launch import cli, entry_point
from experiments.scaffold import (
    RunLogger,
    RunRecord,
    load_task,
    settings_from,
    versions,
)
from gex.pipeline import pretrain_metrics
from gex.utils import peak_mem_mb

log = logging.getLogger("gex")


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Train or reuse theta* and write the run record; returns the metrics."""
    settings = settings_from(cfg)
    record = RunRecord(run_dir, cfg)
    start = time.perf_counter()
    bundle, task = load_task(settings, logger)
    metrics = pretrain_metrics(task) | {
        "wall_s": time.perf_counter() - start, "wall_s_train": task.pretrain_wall_s,
        "reused_checkpoint": int(task.pretrain_wall_s == 0.0), "noise_rate_realized": bundle.noise_rate_realized,
        "n_train": len(bundle.train), "peak_mem_mb": peak_mem_mb(settings.device), "data": settings.data.name,
        "model": settings.model.name, "seed": settings.seed, "task": "pretrain"} | versions()
    record.write(metrics)
    print(f"train_acc={metrics['train_acc']:.4f} noisy_fit={metrics['noisy_fit']:.4f} "
          f"test_acc={metrics['test_acc']:.4f} wall_s={metrics['wall_s']:.1f}")
    return metrics


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("pretrain")(run)(cfg)


if __name__ == "__main__":
    cli(main)
