"""Relabeling (docs/decisions.md#where-we-differ-from-the-authors, docs/protocols.md#relabeling): ``python -m experiments.relabel [method=<name>] [task.mode=rdia|drop|soft_all|oracle]``.

Otsu-thresholds the method's self-influence on the noisy training set; in the paper-era mode ``rdia`` the flagged
samples get the RDIA soft target (``ce``; sigmoid probabilities for ``bce``) and the others keep their label; a
fresh model from theta*'s initialization is retrained with the same recipe. Records ``test_acc``,
``test_acc_no_relabel`` (the same retrain on the unchanged data: cached, method-independent), ``flag_precision``,
``flag_recall`` and ``n_flagged``. ``drop`` removes the flagged samples; ``soft_all`` (the authors' HEAD) and
``oracle`` (true labels) ignore the flags and are cached like the no-change row.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from experiments import plots
from experiments.launch import cli, entry_point
from experiments.metrics import accuracy, check_scores, flag_metrics
from experiments.retrain import (
    cached_value,
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
from gex.attribution import InfluenceTask
from gex.data import LabeledData
from gex.train import TrainConfig, eval_logits
from gex.utils import stage_timer

__all__ = ["run"]

RELABEL_MODES = ("rdia", "drop", "soft_all", "oracle")

RDIA_EPS = 1e-12              # the authors' guard inside the RDIA logarithms (docs/protocols.md#relabeling)


@dataclass
class RelabelConfig:
    """``task=relabel`` (docs/decisions.md#where-we-differ-from-the-authors, docs/protocols.md#relabeling).

    Attributes:
        name: ``relabel``.
        mode: ``rdia`` (Otsu-flagged samples get the RDIA soft target), ``drop`` (flagged removed), ``soft_all``
            (every sample gets theta*'s probabilities: the authors' HEAD), ``oracle`` (true labels).
        retrain_epochs: epochs of every retrain; null = the pretraining recipe's.
    """

    name: str = "relabel"
    mode: str = "rdia"
    retrain_epochs: Optional[int] = None

    def __post_init__(self) -> None:
        if self.mode not in RELABEL_MODES:
            raise UsageError(f"task.mode={self.mode!r} is unknown; valid choices: {list(RELABEL_MODES)}")
        check_retrain_epochs(self.retrain_epochs)


def otsu_flags(scores: Tensor) -> tuple[Tensor, float]:
    """Flags ``scores > threshold_otsu(scores)`` (skimage, 256 bins) as bool ``(n,)``, and the threshold."""
    from skimage.filters import threshold_otsu
    values = scores.detach().double().cpu()
    threshold = float(threshold_otsu(values.numpy()))
    return values > threshold, threshold


def model_probs(task: InfluenceTask) -> Tensor:
    """theta*'s eval-mode probabilities on the training set ``(n, K)``: softmax (``ce``) or sigmoid (``bce``)."""
    logits = eval_logits(task.model, task.train).double()
    return logits.softmax(-1) if task.loss == "ce" else logits.sigmoid()


def rdia_targets(probs: Tensor, y: Tensor) -> Tensor:
    """RDIA soft targets (docs/protocols.md#relabeling): y'_y = 0, y'_k = ln((1-p_y)^(1/(K-1)) + e) / (ln(p_k + e) + e), e = 1e-12.

    Their cross-entropy ``-sum_k y'_k ln p_k`` equals ``-ln(1 - p_y)``: the loss pushes mass off the given label.
    The targets do not sum to 1.

    Args:
        probs: softmax probabilities ``(n, K)``.
        y: the given (possibly noisy) labels ``(n,)``.

    Returns:
        ``(n, K)`` float64.
    """
    p = probs.double()
    y = y.to(p.device).long()[:, None]
    p_y = p.gather(1, y)
    numerator = torch.log((1.0 - p_y).clamp_min(0.0) ** (1.0 / (p.shape[1] - 1)) + RDIA_EPS)
    targets = numerator / (torch.log(p + RDIA_EPS) + RDIA_EPS)
    return targets.scatter(1, y, 0.0)


def relabeled_data(mode: str, train: LabeledData, probs: Tensor, flags: Tensor, loss: str) -> LabeledData:
    """The training set of a relabel retrain.

    Args:
        mode: one of ``RELABEL_MODES``.
        train: the noisy training set.
        probs: theta*'s probabilities ``(n, K)`` (softmax for ``ce``, sigmoid for ``bce``).
        flags: bool ``(n,)`` Otsu flags.
        loss: ``ce`` (flagged get RDIA targets) or ``bce`` (flagged get the sigmoid probabilities).
    """
    device, flags = train.x.device, flags.cpu()
    if mode == "oracle":
        return train.with_labels(train.y_clean)
    if mode == "drop":
        if bool(flags.all()):
            raise UsageError("task.mode=drop: Otsu flagged every sample, nothing left to train on")
        return train.rows_where(~flags)
    if mode == "soft_all":
        return replace(train, targets=probs.float().to(device))
    targets = F.one_hot(train.y.cpu(), train.num_classes).double()
    soft = rdia_targets(probs, train.y.cpu()) if loss == "ce" else probs.double()
    targets[flags] = soft.cpu()[flags]
    return replace(train, targets=targets.float().to(device))

METHOD_FREE_MODES = ("soft_all", "oracle")   # their retrain ignores the scores: cache it across methods


def _relabel_acc(opts: RelabelConfig, run_: TaskRun, flags, recipe: TrainConfig) -> float:
    """Test accuracy of the retrain on the relabeled data of ``opts.mode``."""
    task = run_.task

    def compute() -> float:
        data = relabeled_data(opts.mode, task.train, model_probs(task), flags, task.loss)
        return retrain_test_acc(task, data, recipe, task.test, f"retrain ({opts.mode})")

    if opts.mode in METHOD_FREE_MODES:
        return cached_value(task, {"job": f"relabel_{opts.mode}", "recipe": recipe.cache_spec()}, compute)
    return compute()


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Fit, flag, relabel, retrain, and write the relabel record; returns the metrics."""
    opts = task_config(cfg.task, "relabel", RelabelConfig)
    run_ = start_run(cfg, run_dir, logger)
    task, method, device = run_.task, run_.method, run_.settings.device
    with stage_timer(run_.times, "score", device):
        scores = check_scores(method.self_influence(task.train), len(task.train), "self-influence", method.name)
    flags, threshold = otsu_flags(scores)
    recipe = retrain_recipe(task.recipe, opts.retrain_epochs)
    with stage_timer(run_.times, "retrain", device):
        acc = _relabel_acc(opts, run_, flags, recipe)
        acc_none = unchanged_test_acc(task, recipe, task.test, "test")
    noisy = task.train.is_noisy.cpu()
    metrics = flag_metrics(flags, noisy) | {
        "test_acc": acc, "test_acc_no_relabel": acc_none, "test_acc_pretrained": accuracy(task.model, task.test),
        "otsu_threshold": threshold, "relabel_mode": opts.mode, "retrain_epochs": recipe.epochs,
        "noise_rate_realized": run_.bundle.noise_rate_realized, "wall_s_retrain": run_.times["retrain"],
    } | record_fields(cfg, run_, "relabel")
    figure = run_dir / "relabel_bars.png"
    plots.plot_relabel_bars({f"{method.name} ({opts.mode})": [acc], "no relabel": [acc_none]},
                            f"relabel on {metrics['data']}: {metrics['n_flagged']} flagged", figure)
    finish_run(run_, logger, metrics, {"self_influence": scores.float(), "is_noisy": noisy, "flagged": flags,
                                       "index": task.train.index.cpu()}, {"relabel_bars": figure})
    print(f"[relabel] {method.name} ({opts.mode}): test_acc={acc:.4f} no_relabel={acc_none:.4f} "
          f"flagged={metrics['n_flagged']} precision={metrics['flag_precision']:.3f} "
          f"recall={metrics['flag_recall']:.3f}")
    return metrics


@hydra.main(config_path="../configs", config_name="relabel", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("relabel")(run)(cfg)


if __name__ == "__main__":
    cli(main)
