"""Separation of data sources (docs/protocols.md#settings, docs/protocols.md#separation-of-data-sources; the protocol is ours): ``python -m experiments.separate``.

On a two-source mixture with clean labels (``data=mixed``: ``extra['is_minority']`` marks the ~10% minority
source), records how well a method finds the minority source by self-influence (``auroc``, ``ap``) and by influence
on the minority-source test loss (``auroc_cross``, ``ap_cross``), then the minority test accuracy after
up-weighting the top-ranked ``task.upweight_frac`` samples by ``task.upweight`` and retraining from theta*'s
initialization (``minority_test_acc_weighted``) versus uniform weights (``minority_test_acc_uniform``: cached,
method-independent).

Sign of the cross ranking: pairwise influence is positive when a training sample *lowers* the test loss (a
proponent; ``gex.attribution``). Minority training samples are the proponents of the minority test loss, so they
are ranked by **+influence** (highest first). Detection's cross score is the opposite (-influence: mislabeled
samples raise the test loss). ``tests/test_tasks.py`` checks the sign on a tiny mixture with first-order
influence. A method without a pairwise form needs ``task.cross=false`` (self-influence only).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from experiments import plots
from experiments.launch import cli, entry_point
from experiments.metrics import (
    SCORE_KINDS,
    check_scores,
    ranking_metrics,
    ranking_order,
)
from experiments.retrain import (
    check_retrain_epochs,
    retrain_recipe,
    retrain_test_acc,
    unchanged_test_acc,
)
from experiments.scaffold import (
    RunLogger,
    TaskRun,
    UsageError,
    finish_run,
    record_fields,
    start_run,
    task_config,
)
from gex.data import DataBundle, LabeledData
from gex.utils import stage_timer

__all__ = ["run"]

@dataclass
class SeparateConfig:
    """``task=separate`` (docs/protocols.md#settings, docs/protocols.md#separation-of-data-sources; the protocol is ours).

    Attributes:
        name: ``separate``.
        cross: also rank by influence on the minority test loss (needs a method with a pairwise form).
        upweight: loss weight of the up-weighted samples in the retrain (others weigh 1).
        upweight_frac: fraction of the training set up-weighted; null = the realized minority fraction.
        upweight_by: ``self`` or ``cross`` ranking; null = ``cross`` when ``cross`` is on, else ``self``.
        retrain_epochs: epochs of both retrains; null = the pretraining recipe's.
    """

    name: str = "separate"
    cross: bool = True
    upweight: float = 5.0
    upweight_frac: Optional[float] = None
    upweight_by: Optional[str] = None
    retrain_epochs: Optional[int] = None

    def __post_init__(self) -> None:
        if self.upweight <= 0:
            raise UsageError(f"task.upweight={self.upweight} must be positive")
        if self.upweight_frac is not None and not 0.0 < self.upweight_frac < 1.0:
            raise UsageError(f"task.upweight_frac={self.upweight_frac} must lie in (0, 1) or be null")
        if self.upweight_by is None:
            self.upweight_by = "cross" if self.cross else "self"
        if self.upweight_by not in SCORE_KINDS:
            raise UsageError(f"task.upweight_by={self.upweight_by!r} is unknown; valid choices: {list(SCORE_KINDS)}")
        if self.upweight_by == "cross" and not self.cross:
            raise UsageError("task.upweight_by=cross needs task.cross=true")
        check_retrain_epochs(self.retrain_epochs)


def minority_mask(split: LabeledData, data_name: str) -> Tensor:
    """Bool ``(n,)`` CPU mask of the minority-source rows; data without two sources is a one-line error."""
    if "is_minority" not in split.extra:
        raise UsageError(f"task=separate needs data with two sources (extra['is_minority']); data={data_name} "
                         f"has none; use data=mixed")
    return split.extra["is_minority"].cpu().bool()


def upweighted(train: LabeledData, rows: Tensor, factor: float) -> LabeledData:
    """``train`` with loss weight ``factor`` on ``rows`` and 1 elsewhere (``LabeledData.weights``)."""
    weights = torch.ones(len(train), dtype=torch.float32)
    weights[rows.cpu()] = float(factor)
    return replace(train, weights=weights.to(train.x.device))

LABELS = ("majority", "minority")


def _check(data_name: str):
    """A data check for ``start_run``: both splits carry ``is_minority`` and the training set has both sources."""
    def check(bundle: DataBundle) -> None:
        mask = minority_mask(bundle.train, data_name)
        minority_mask(bundle.test, data_name)
        if mask.all() or not mask.any():
            raise UsageError(f"data={data_name}: the training set holds one source only ({int(mask.sum())} minority "
                             f"of {len(mask)}); separation needs both")
    return check


def _scores(run_: TaskRun, opts: SeparateConfig, test_min) -> dict[str, torch.Tensor]:
    """``self`` (n,) and, when ``task.cross``, ``cross`` = +influence on the mean minority test loss (n,)."""
    task, method, n = run_.task, run_.method, len(run_.task.train)
    out = {"self": check_scores(method.self_influence(task.train), n, "self-influence", method.name)}
    if opts.cross:
        out["cross"] = check_scores(method.influence_on_mean_test(task.train, test_min), n, "cross-influence",
                                    method.name)
    return out


def _upweight(run_: TaskRun, opts: SeparateConfig, rank: torch.Tensor, is_min: torch.Tensor, test_min,
              recipe) -> dict[str, float]:
    """Retrain with the top-ranked samples up-weighted; minority test accuracy vs the uniform retrain."""
    task = run_.task
    frac = opts.upweight_frac if opts.upweight_frac is not None else float(is_min.double().mean())
    k = max(1, int(round(frac * len(rank))))
    top = ranking_order(rank, seed=task.seed)[:k]
    weighted = retrain_test_acc(task, upweighted(task.train, top, opts.upweight), recipe, test_min,
                                "retrain (up-weighted)")
    return {"minority_test_acc_weighted": weighted,
            "minority_test_acc_uniform": unchanged_test_acc(task, recipe, test_min, "minority_test"),
            "upweight_precision": float(is_min[top].double().mean()), "n_upweighted": k}


def _plot(scores: dict[str, torch.Tensor], is_min: torch.Tensor, metrics: dict, run_dir: Path) -> dict[str, Path]:
    """One majority-vs-minority histogram per ranking; returns name -> PNG path."""
    figures = {}
    for kind, values in scores.items():
        figures[f"{kind}_hist"] = run_dir / f"{kind}_influence_hist.png"
        auroc = metrics["auroc" if kind == "self" else "auroc_cross"]
        plots.plot_self_influence_hist(values, is_min, f"{metrics['method']} {kind}-influence: AUROC {auroc:.4f}",
                                       figures[f"{kind}_hist"], labels=LABELS)
    return figures


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Fit, rank, up-weight, retrain, and write the separation record; returns the metrics."""
    opts = task_config(cfg.task, "separate", SeparateConfig)
    pairwise = ("task.cross=true", "set task.cross=false to rank by self-influence only") if opts.cross else None
    run_ = start_run(cfg, run_dir, logger, pairwise=pairwise, check=_check(cfg.data.name))
    task, method, device = run_.task, run_.method, run_.settings.device
    is_min = minority_mask(task.train, cfg.data.name)
    test_min = task.test.rows_where(minority_mask(task.test, cfg.data.name))
    with stage_timer(run_.times, "score", device):
        scores = _scores(run_, opts, test_min)
    metrics = ranking_metrics(scores["self"], is_min, "separate (is_minority)")
    if opts.cross:
        metrics |= {f"{k}_cross": v for k, v in ranking_metrics(scores["cross"], is_min, "separate").items()}
    recipe = retrain_recipe(task.recipe, opts.retrain_epochs)
    with stage_timer(run_.times, "retrain", device):
        metrics |= _upweight(run_, opts, scores[opts.upweight_by], is_min, test_min, recipe)
    metrics |= {"minority_frac": float(is_min.double().mean()), "upweight": opts.upweight,
                "upweight_by": opts.upweight_by, "retrain_epochs": recipe.epochs,
                "wall_s_retrain": run_.times["retrain"]} | record_fields(cfg, run_, "separate")
    figures = _plot(scores, is_min, metrics, run_dir)
    saved = {"self_influence": scores["self"].float(), "is_minority": is_min, "index": task.train.index.cpu()}
    if opts.cross:
        saved["cross_influence"] = scores["cross"].float()
    finish_run(run_, logger, metrics, saved, figures)
    print(f"[separate] {method.name}: auroc={metrics['auroc']:.4f} "
          f"auroc_cross={metrics.get('auroc_cross', float('nan')):.4f} "
          f"minority acc weighted={metrics['minority_test_acc_weighted']:.4f} "
          f"uniform={metrics['minority_test_acc_uniform']:.4f}")
    return metrics


@hydra.main(config_path="../configs", config_name="separate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("separate")(run)(cfg)


if __name__ == "__main__":
    cli(main)
