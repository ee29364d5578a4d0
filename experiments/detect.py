"""Mislabel detection (SPEC B3.2): ``python -m experiments.detect [method=<name>] [task.score=self|cross]``.

Scores the noisy training set by self-influence (``task.score=self``) or by -(influence on the mean test loss)
(``task.score=cross``, the authors' sign: samples that raise the test loss rank first) and records ``auroc``,
``ap`` (label 1 = noisy), ``found_at_5/10/20``, ``noise_rate_realized`` and the method's diagnostics (GEX: median
member loss of noisy / clean samples), with a Fig. 1-style histogram and the detection curve.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments import plots
from experiments.common import RunLogger, UsageError, entry_point
from experiments.tasks import (check_scores, detection_metrics, finish_run, record_fields,
                               start_run, task_config)
from gex.data import DataBundle
from gex.utils import stage_timer

__all__ = ["run"]

log = logging.getLogger("gex")


def _has_noise(bundle: DataBundle | None) -> None:
    if bundle is None or not bool(bundle.train.is_noisy.any()):
        raise UsageError("task=detect needs mislabeled samples, but no label changed; set noise=symmetric "
                         "(or another kind) with noise.rate > 0")


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Fit the method, score the training set, and write the detection record; returns the metrics."""
    opts = task_config(cfg.task, "detect")
    if cfg.noise.kind == "none":
        _has_noise(None)
    pairwise = ("task.score=cross", "set task.score=self") if opts.score == "cross" else None
    run_ = start_run(cfg, run_dir, logger, pairwise=pairwise, check=_has_noise)
    task, method = run_.task, run_.method
    with stage_timer(run_.times, "score", run_.settings.device):
        raw = (method.self_influence(task.train) if opts.score == "self"
               else -method.influence_on_mean_test(task.train, task.test))
    scores = check_scores(raw, len(task.train), f"{opts.score}-influence", method.name)
    noisy = task.train.is_noisy.cpu()
    metrics = detection_metrics(scores, noisy, seed=task.seed) | method.diagnostics() | {
        "noise_rate_realized": run_.bundle.noise_rate_realized, "score_kind": opts.score} | record_fields(cfg, run_, "detect")
    what = "self-influence" if opts.score == "self" else "-influence on mean test loss"
    title = f"{method.name} on {metrics['data']}: AUROC {metrics['auroc']:.4f} / AP {metrics['ap']:.4f}"
    figures = {"self_influence_hist": run_dir / "self_influence_hist.png", "detection_curve": run_dir / "detection_curve.png"}
    plots.plot_self_influence_hist(scores, noisy, title, figures["self_influence_hist"])
    plots.plot_detection_curve({method.name: scores}, noisy, f"{method.name} ({what}) on {metrics['data']}",
                               figures["detection_curve"])
    key = "self_influence" if opts.score == "self" else "cross_score"
    finish_run(run_, logger, metrics, {key: scores.float(), "is_noisy": noisy, "index": task.train.index.cpu()}, figures)
    print(f"[detect] {method.name}: auroc={metrics['auroc']:.4f} ap={metrics['ap']:.4f} "
          f"found_at_10={metrics['found_at_10']:.3f} fit={metrics['wall_s_fit']:.1f}s score={metrics['wall_s_score']:.1f}s")
    return metrics


@hydra.main(config_path="../configs", config_name="detect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("detect")(run)(cfg)


if __name__ == "__main__":
    main()
