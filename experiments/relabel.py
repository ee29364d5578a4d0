"""Relabeling (SPEC A3, B3.3): ``python -m experiments.relabel [method=<name>] [task.mode=rdia|drop|soft_all|oracle]``.

Otsu-thresholds the method's self-influence on the noisy training set; in the paper-era mode ``rdia`` the flagged
samples get the RDIA soft target (``ce``; sigmoid probabilities for ``bce``) and the others keep their label; a
fresh model from theta*'s initialization is retrained with the same recipe. Records ``test_acc``,
``test_acc_no_relabel`` (the same retrain on the unchanged data: cached, method-independent), ``flag_precision``,
``flag_recall`` and ``n_flagged``. ``drop`` removes the flagged samples; ``soft_all`` (the authors' HEAD) and
``oracle`` (true labels) ignore the flags and are cached like the no-change row.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments import plots
from experiments.common import RunLogger, entry_point
from experiments.tasks import (RelabelConfig, TaskRun, accuracy, cached_value, check_scores, finish_run, flag_metrics,
                               model_probs, otsu_flags, record_fields, relabeled_data, retrain_recipe, retrain_test_acc,
                               start_run, task_config, unchanged_test_acc)
from gex.train import TrainConfig
from gex.utils import stage_timer

__all__ = ["run"]

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
    opts = task_config(cfg.task, "relabel")
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
    main()
