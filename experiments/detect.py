"""Mislabel detection (docs/protocols.md#mislabel-detection): ``python -m experiments.detect [method=<name>] [task.score=self|cross]``.

Scores the noisy training set by self-influence (``task.score=self``) or by -(influence on the mean test loss)
(``task.score=cross``, the authors' sign: samples that raise the test loss rank first) and records ``auroc``,
``ap`` (label 1 = noisy), ``found_at_5/10/20``, ``noise_rate_realized`` and the method's diagnostics (GEX: median
member loss of noisy / clean samples), with a Fig. 1-style histogram and the detection curve. ``noisy_fit`` (share
of the mislabeled samples theta* predicts as their noisy label) and ``auroc_noisy_fit`` / ``auroc_noisy_unfit``
(AUROC of each group against the clean samples) tell memorized noise, GEX's regime, from noise theta* never fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from experiments import plots
from experiments.launch import cli, entry_point
from experiments.metrics import (
    SCORE_KINDS,
    check_scores,
    detection_by_fit,
    detection_metrics,
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
from gex.data import DataBundle
from gex.pipeline import fitted_train_samples
from gex.utils import stage_timer

__all__ = ["run"]

@dataclass
class DetectConfig:
    """``task=detect`` (docs/protocols.md#mislabel-detection).

    Attributes:
        name: ``detect``.
        score: ``self`` = self-influence; ``cross`` = -(influence on the mean test loss), as the authors.
    """

    name: str = "detect"
    score: str = "self"

    def __post_init__(self) -> None:
        if self.score not in SCORE_KINDS:
            raise UsageError(f"task.score={self.score!r} is unknown; valid choices: {list(SCORE_KINDS)}")


def _has_noise(bundle: DataBundle | None) -> None:
    if bundle is None or not bool(bundle.train.is_noisy.any()):
        raise UsageError("task=detect needs mislabeled samples, but no label changed; set noise=symmetric "
                         "(or another kind) with noise.rate > 0")


def _score(run_: TaskRun, score: str) -> torch.Tensor:
    """Self-influence, or -(influence on the mean test loss) for ``score=cross``, float64 ``(n,)`` (timed)."""
    task, method = run_.task, run_.method
    with stage_timer(run_.times, "score", run_.settings.device):
        raw = (method.self_influence(task.train) if score == "self"
               else -method.influence_on_mean_test(task.train, task.test))
    return check_scores(raw, len(task.train), f"{score}-influence", method.name)


def _plot(scores: torch.Tensor, noisy: torch.Tensor, metrics: dict, score: str, run_dir: Path) -> dict[str, Path]:
    """The Fig. 1-style histogram and the detection curve; returns name -> PNG path."""
    method, data = metrics["method"], metrics["data"]
    figures = {name: run_dir / f"{name}.png" for name in ("self_influence_hist", "detection_curve")}
    plots.plot_self_influence_hist(scores, noisy, f"{method} on {data}: AUROC {metrics['auroc']:.4f} / "
                                   f"AP {metrics['ap']:.4f}", figures["self_influence_hist"])
    what = "self-influence" if score == "self" else "-influence on the mean test loss"
    plots.plot_detection_curve({method: scores}, noisy, f"{method} ({what}) on {data}", figures["detection_curve"])
    return figures


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Fit the method, score the training set, and write the detection record; returns the metrics."""
    opts = task_config(cfg.task, "detect", DetectConfig)
    if cfg.noise.kind == "none":
        _has_noise(None)
    pairwise = ("task.score=cross", "set task.score=self") if opts.score == "cross" else None
    run_ = start_run(cfg, run_dir, logger, pairwise=pairwise, check=_has_noise)
    scores = _score(run_, opts.score)
    noisy = run_.task.train.is_noisy.cpu()
    fitted = fitted_train_samples(run_.task)   # one eval pass of theta*, outside the method's timers
    metrics = detection_metrics(scores, noisy, seed=run_.task.seed) | detection_by_fit(scores, noisy, fitted) | {
        "noisy_fit": fitted[noisy].float().mean().item(),
    } | run_.method.diagnostics() | {
        "noise_rate_realized": run_.bundle.noise_rate_realized, "score_kind": opts.score,
    } | record_fields(cfg, run_, "detect")
    figures = _plot(scores, noisy, metrics, opts.score, run_dir)
    key = "self_influence" if opts.score == "self" else "cross_score"
    finish_run(run_, logger, metrics, {key: scores.float(), "is_noisy": noisy,
                                       "index": run_.task.train.index.cpu()}, figures)
    print(f"[detect] {metrics['method']}: auroc={metrics['auroc']:.4f} ap={metrics['ap']:.4f} "
          f"found_at_10={metrics['found_at_10']:.3f} fit={metrics['wall_s_fit']:.1f}s "
          f"score={metrics['wall_s_score']:.1f}s")
    return metrics


@hydra.main(config_path="../configs", config_name="detect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("detect")(run)(cfg)


if __name__ == "__main__":
    cli(main)
