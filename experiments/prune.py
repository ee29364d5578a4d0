"""Dataset pruning (docs/protocols.md#dataset-pruning): ``python -m experiments.prune [method=<name>] [task.fractions=[0.1,0.2]]``.

On clean labels (``configs/prune.yaml`` sets ``noise=none``), removes the lowest self-influence fraction of the
training set (keeping the influential samples; ties broken by a seeded U(0, 0.5) key), retrains a fresh model from
theta*'s initialization with the schedule sized to what remains, and records ``test_acc_at_<pct>``; the same for
uniformly random removal as ``random.test_acc_at_<pct>`` (cached per seed: method-independent), and the unpruned
retrain as ``test_acc_at_0`` = ``random.test_acc_at_0``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from experiments import plots
from experiments.launch import cli, entry_point
from experiments.metrics import check_scores, ranking_order
from experiments.retrain import (
    cached_value,
    check_retrain_epochs,
    retrain_recipe,
    retrain_test_acc,
    unchanged_test_acc,
)
from experiments.scaffold import (
    RunLogger,
    UsageError,
    finish_run,
    record_fields,
    start_run,
    task_config,
)
from gex.attribution import InfluenceTask
from gex.data import DataBundle
from gex.train import TrainConfig
from gex.utils import stage_timer

__all__ = ["run"]

RANDOM_PRUNE_SALT = 0x9A7     # the random-pruning reference's stream


@dataclass
class PruneConfig:
    """``task=prune`` (docs/protocols.md#dataset-pruning): remove the lowest self-influence fraction, retrain, compare with random.

    Attributes:
        name: ``prune``.
        fractions: fractions of the training set removed, each in (0, 1), distinct as integer percents.
        retrain_epochs: epochs of every retrain (steps sized to what remains); null = the pretraining recipe's.
        retrains: retrains averaged per point (the pruned sets, the random ones and the unpruned one alike; the
            first from theta*'s seed, the others with other data orders); the record keeps their spread.
    """

    name: str = "prune"
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4])
    retrain_epochs: Optional[int] = None
    retrains: int = 1

    def __post_init__(self) -> None:
        if not self.fractions:
            raise UsageError("task.fractions is empty; give fractions removed in (0, 1), e.g. [0.1,0.2]")
        for frac in self.fractions:
            if not 0.0 < float(frac) < 1.0:
                raise UsageError(f"task.fractions contains {frac}: each fraction removed must lie in (0, 1)")
        labels = [pct_label(f) for f in self.fractions]
        if len(set(labels)) != len(labels):
            raise UsageError(f"task.fractions={list(self.fractions)} repeats an integer percent ({labels})")
        check_retrain_epochs(self.retrain_epochs)
        if not isinstance(self.retrains, int) or self.retrains < 1:
            raise UsageError(f"task.retrains={self.retrains} must be a positive integer (retrains averaged per point)")


def pct_label(frac: float) -> int:
    """A fraction as the integer percent used in metric names (``test_acc_at_<pct>``)."""
    return int(round(float(frac) * 100))


def n_removed(n: int, frac: float) -> int:
    k = int(round(frac * n))
    if not 0 < k < n:
        raise UsageError(f"task.fractions: removing {frac} of {n} samples leaves {n - k}; choose fractions in (0, 1)")
    return k


def prune_rows(scores: Tensor, frac: float, seed: int = 0) -> Tensor:
    """Rows kept after removing the ``round(frac * n)`` lowest scores (seeded tie-break), ascending ``(n - k,)``."""
    k = n_removed(len(scores), frac)
    return ranking_order(scores, descending=False, seed=seed)[k:].sort().values


def random_prune_rows(n: int, frac: float, seed: int) -> Tensor:
    """Rows kept after removing ``round(frac * n)`` rows uniformly at random (seeded), ascending ``(n - k,)``."""
    k = n_removed(n, frac)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + RANDOM_PRUNE_SALT))
    return perm[k:].sort().values

log = logging.getLogger("gex")


def _pruned_acc(task: InfluenceTask, kept: torch.Tensor, recipe: TrainConfig, desc: str, replicate: int) -> float:
    return retrain_test_acc(task, task.train.subset(kept.to(task.train.x.device)), recipe, task.test, desc, replicate)


def _random_acc(task: InfluenceTask, frac: float, recipe: TrainConfig, replicate: int) -> float:
    what = {"job": "prune_random", "fraction": float(frac), "recipe": recipe.cache_spec()}
    if replicate:  # replicate 0 keeps its old key
        what["replicate"] = replicate
    return cached_value(task, what, lambda: _pruned_acc(task, random_prune_rows(len(task.train), frac, task.seed),
                                                        recipe, f"retrain (random -{pct_label(frac)}%)", replicate))


def _mean_and_spread(name: str, accs: list[float]) -> dict[str, float]:
    """``name``: the mean over retrains; with more than one, ``<name>_std`` (sample std) beside it."""
    values = torch.tensor(accs, dtype=torch.float64)
    return {name: float(values.mean())} | ({f"{name}_std": float(values.std())} if len(accs) > 1 else {})


def _curves(task: InfluenceTask, scores: torch.Tensor, opts: PruneConfig, recipe: TrainConfig) -> dict[str, float]:
    """``test_acc_at_<pct>`` and ``random.test_acc_at_<pct>`` for every fraction, plus the unpruned ``_at_0``; each
    the mean over ``opts.retrains`` retrains (with ``<metric>_std`` beside it when there are several)."""
    replicates = range(opts.retrains)
    full = _mean_and_spread("test_acc_at_0", [unchanged_test_acc(task, recipe, task.test, "test", r)
                                              for r in replicates])
    out = full | {f"random.{k}": v for k, v in full.items()}
    for frac in opts.fractions:
        pct = pct_label(frac)
        kept = prune_rows(scores, frac, task.seed)
        out |= _mean_and_spread(f"test_acc_at_{pct}", [_pruned_acc(task, kept, recipe, f"retrain (-{pct}%)", r)
                                                       for r in replicates])
        out |= _mean_and_spread(f"random.test_acc_at_{pct}", [_random_acc(task, frac, recipe, r) for r in replicates])
    return out


def _plot(metrics: dict, opts: PruneConfig, method: str, path: Path) -> None:
    pcts = [0] + [pct_label(f) for f in opts.fractions]
    curves = {name: (pcts, [[metrics[f"{prefix}test_acc_at_{p}"] for p in pcts]])
              for name, prefix in ((method, ""), ("random", "random."))}
    plots.plot_pruning_curves(curves, f"pruning on {metrics['data']} ({method})", path)


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Fit, score, prune at every fraction, retrain, and write the pruning record; returns the metrics."""
    opts = task_config(cfg.task, "prune", PruneConfig)

    def check(bundle: DataBundle) -> None:  # every fraction must leave something on this dataset
        for frac in opts.fractions:
            n_removed(len(bundle.train), frac)
        if bundle.train.is_noisy.any():
            log.warning("prune: the training labels are noisy (noise=%s); the protocol prunes clean data "
                        "(noise=none)", cfg.noise.kind)

    run_ = start_run(cfg, run_dir, logger, check=check)
    task, method, device = run_.task, run_.method, run_.settings.device
    with stage_timer(run_.times, "score", device):
        scores = check_scores(method.self_influence(task.train), len(task.train), "self-influence", method.name)
    recipe = retrain_recipe(task.recipe, opts.retrain_epochs)
    with stage_timer(run_.times, "retrain", device):
        curves = _curves(task, scores, opts, recipe)
    metrics = curves | {"retrain_epochs": recipe.epochs, "retrains": opts.retrains,
                        "wall_s_retrain": run_.times["retrain"]} | record_fields(
        cfg, run_, "prune")
    figure = run_dir / "pruning_curves.png"
    _plot(metrics, opts, method.name, figure)
    order = ranking_order(scores, descending=False, seed=task.seed)
    finish_run(run_, logger, metrics, {"self_influence": scores.float(), "prune_order": order,
                                       "index": task.train.index.cpu()}, {"pruning_curves": figure})
    print(f"[prune] {method.name}: " + " ".join(f"-{pct_label(f)}%: {curves[f'test_acc_at_{pct_label(f)}']:.4f} "
                                               f"(random {curves[f'random.test_acc_at_{pct_label(f)}']:.4f})"
                                               for f in opts.fractions))
    return metrics


@hydra.main(config_path="../configs", config_name="prune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("prune")(run)(cfg)


if __name__ == "__main__":
    cli(main)
