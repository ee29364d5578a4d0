"""Ground truth beyond the paper: leave-one-out (LOO) and linear datamodeling scores (LDS) for every method.

    python -m experiments.groundtruth                                   # digits + BN MLP (hidden 64), CPU minutes
    python -m experiments.groundtruth 'methods=[gex,if_exact,grad_dot]' task.n_subsets=50 task.n_loo=50
    python -m experiments.groundtruth data=mnist5k model=cnn_small '~model.options.depth' task.retrain_epochs=10

Parallel: K jobs each train a disjoint part of the retrains into the shared cache (no scores), then one unsharded
run trains whatever is still missing (nothing, normally) and scores. A shard trains theta* itself when it is not
cached yet (deterministic and written atomically, so K shards starting cold only repeat that work):

    python -m experiments.groundtruth -m task.shard=0,1,2,3 task.num_shards=4 threads=1 \
        hydra/launcher=joblib_local hydra.launcher.n_jobs=4 <overrides>
    python -m experiments.groundtruth <overrides>

Every retrain (``gex.groundtruth``) starts from theta*'s own init, follows the recipe (``task.retrain_epochs``
shortens it) in the full data's order with the removed rows skipped, and is one cached artefact. For each method
(``methods``; options from ``configs/method/<name>.yaml`` when present, then ``method_options.<name>``) the run
records ``<m>.loo_spearman``/``<m>.loo_pearson`` (all (i, j) pairs; ``_per_test`` = the mean over test samples),
``<m>.lds`` with a bootstrap interval over test samples (``<m>.lds_ci_low``/``_high``), and
``<m>.self_loo_spearman`` (self-influence vs the removed sample's own loss change); plus the ground truth's own
noise (``loo.seed_spearman``, ``loo.seed_spearman_per_test``, ``loo.reliability_per_test``: agreement between
retrain seeds, see ``gex.groundtruth.seed_agreement``; ``lds.*`` likewise when ``task.subset_seeds`` > 1): no
method can correlate with a measurement better than that measurement reproduces itself. A method that fails
(too many parameters for ``if_exact``, no pairwise form) is reported in one line and gets NaN.
"""
from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from experiments import plots
from experiments.launch import cli, entry_point
from experiments.retrain import retrain_recipe
from experiments.scaffold import (
    RunLogger,
    RunRecord,
    UsageError,
    has_pairwise,
    load_task,
    register_methods,
    settings_from,
    typed_config,
    versions,
)
from gex import groundtruth as gt
from gex.attribution import METHODS, InfluenceTask, MethodError, build_method
from gex.models import MODELS, ModelConfig
from gex.utils import peak_mem_mb, stage_timer

__all__ = ["GroundTruthConfig", "DEFAULT_METHODS", "select_methods", "method_options", "score_method",
           "method_metrics", "run"]

log = logging.getLogger("gex")

DEFAULT_METHODS = ("gex", "gex_lin", "if_exact", "if_cg", "lissa", "arnoldi", "tracin", "tracin_rp", "randproj",
                   "grad_dot", "ekfac", "trak", "la_kfac")
METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"
METRICS = ("lds", "lds_ci_low", "lds_ci_high", "loo_spearman", "loo_pearson", "loo_spearman_per_test",
           "loo_pearson_per_test", "self_loo_spearman")
TEST_SALT, LOO_SALT, SUBSET_SALT, BOOT_SALT = 0x7E5, 0x100, 0x5B5, 0xB07   # independent streams of the run seed


@dataclass
class GroundTruthConfig:
    """``task=groundtruth``.

    Attributes:
        name: ``groundtruth``.
        n_test_eval: test samples whose losses are measured (drawn by the seed).
        n_loo: training samples removed one at a time (drawn by the seed); 0 = no LOO.
        retrain_seeds: LOO retrains per removed sample (data orders; the first is the run seed).
        n_subsets: LDS subsets; 0 = no LDS.
        alpha: fraction of the training set in each subset.
        subset_seeds: retrains per subset.
        outcome: LDS outcome, ``loss`` (prediction -sum I) or ``margin`` (+sum I).
        retrain_epochs: epochs of every retrain; null = the pretraining recipe.
        exact_bn: BN statistics of every retrain over all its rows in one batch (else the recipe's refresh).
        n_bootstrap: bootstrap resamples of the LDS interval.
        ci_level: the interval's coverage.
        shard: this job's part of the retrains (with ``num_shards`` > 1: train only, no scores).
        num_shards: number of parts; 1 = train what is missing and score.
    """

    name: str = "groundtruth"
    n_test_eval: int = 50
    n_loo: int = 100
    retrain_seeds: int = 3
    n_subsets: int = 100
    alpha: float = 0.5
    subset_seeds: int = 1
    outcome: str = "loss"
    retrain_epochs: Optional[int] = None
    exact_bn: bool = True
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    shard: int = 0
    num_shards: int = 1

    def __post_init__(self) -> None:
        if self.name != "groundtruth":
            raise UsageError(f"task={self.name!r} does not fit python -m experiments.groundtruth; use task=groundtruth")
        if self.outcome not in gt.OUTCOMES:
            raise UsageError(f"task.outcome={self.outcome!r} is unknown; valid choices: {list(gt.OUTCOMES)}")
        for key in ("n_test_eval", "retrain_seeds", "subset_seeds", "n_bootstrap"):
            if getattr(self, key) < 1:
                raise UsageError(f"task.{key}={getattr(self, key)} must be >= 1")
        if self.n_loo < 0 or self.n_subsets < 0 or self.n_subsets == 1 or (self.n_loo == 0 and self.n_subsets == 0):
            raise UsageError(f"task.n_loo={self.n_loo} and task.n_subsets={self.n_subsets}: need n_loo >= 0, "
                             f"n_subsets = 0 or >= 2, and at least one of them positive")
        if not 0.0 < self.alpha < 1.0 or not 0.0 < self.ci_level < 1.0:
            raise UsageError(f"task.alpha={self.alpha} and task.ci_level={self.ci_level} must lie in (0, 1)")
        if self.retrain_epochs is not None and self.retrain_epochs < 1:
            raise UsageError(f"task.retrain_epochs={self.retrain_epochs} must be >= 1 or null (= the recipe)")
        try:
            gt.shard_jobs([], self.shard, self.num_shards)  # validates shard / num_shards
        except ValueError as err:
            raise UsageError(str(err)) from None


def select_methods(names: list[str]) -> list[str]:
    """The registered names of ``names`` (order kept); each unknown one is one error line, then skipped.

    Raises:
        UsageError: no name is registered.
    """
    register_methods()
    valid = [n for n in names if n in METHODS]
    for name in names:
        if name not in METHODS:
            log.error("methods: %r is unknown, skipped; valid choices: %s", name, sorted(METHODS))
    if not valid:
        raise UsageError(f"methods={list(names)} holds no registered method; valid choices: {sorted(METHODS)}")
    return valid


def method_options(name: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Constructor options: ``configs/method/<name>.yaml`` (when it exists) updated by ``overrides``."""
    path = METHOD_CONFIGS / f"{name}.yaml"
    options = OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else {}
    options.pop("name", None)
    return options | dict(overrides or {})


def score_method(name: str, options: dict[str, Any], task: InfluenceTask, test_rows: Tensor, loo_rows: Tensor,
                 times: dict[str, float]) -> dict[str, Tensor]:
    """Fit ``name`` and score: ``influence`` ``(n_train, m)`` on the eval test rows (absent without a pairwise form)
    and ``self`` ``(n_loo,)`` on the LOO rows. Fit and scoring wall times go into ``times``."""
    try:
        method = build_method(name, **options)
    except TypeError as err:
        raise MethodError(f"method_options.{name}: {err}") from None
    device = task.device
    with stage_timer(times, f"{name}.wall_s_fit", device):
        method.fit(task)
    out = {}
    with stage_timer(times, f"{name}.wall_s_score", device):
        if has_pairwise(method):
            test = task.test.subset(test_rows.to(task.test.x.device))
            out["influence"] = method.influence(task.train, test).detach().double().cpu()
        if len(loo_rows):
            removed = task.train.subset(loo_rows.to(task.train.x.device))
            out["self"] = method.self_influence(removed).detach().double().cpu()
    want = {"influence": (len(task.train), len(test_rows)), "self": (len(loo_rows),)}
    for key, value in out.items():
        if tuple(value.shape) != want[key] or not bool(torch.isfinite(value).all()):
            raise MethodError(f"method={name} returned {key} of shape {tuple(value.shape)} (expected {want[key]}) "
                              f"with {int((~torch.isfinite(value)).sum())} non-finite values")
    return out


def method_metrics(scores: dict[str, Tensor], truth: dict[str, Any], opts: GroundTruthConfig,
                   seed: int) -> tuple[dict[str, float], dict[str, Tensor]]:
    """One method's metrics (unprefixed; NaN where it has no score) and its tensors for ``scores.pt``."""
    out, tensors = {k: math.nan for k in METRICS}, {}
    influence = scores.get("influence")
    if "loo" in truth:
        out["self_loo_spearman"] = float(gt.column_corr(scores["self"], truth["loo"]["self"], rank=True)[0])
        tensors["self_influence"] = scores["self"]
        if influence is not None:
            predicted = influence[truth["loo_rows"]]
            out |= gt.loo_correlations(predicted, truth["loo"]["test"])
            tensors |= {"predicted": predicted, "measured": truth["loo"]["test"]}
    if influence is not None and "lds" in truth:
        per_test = gt.lds_per_test(influence, truth["masks"], truth["lds"], opts.outcome)
        out |= gt.lds_summary(per_test, opts.n_bootstrap, opts.ci_level, seed)
        tensors["lds_per_test"] = per_test
    return out, tensors


# --------------------------------------------------------------------------------------------- ground truth

def _plan(opts: GroundTruthConfig, task: InfluenceTask) -> dict[str, Any]:
    """The seeded choices: eval test rows, LOO rows, subsets and retrain seeds."""
    n_train, no_rows = len(task.train), torch.zeros(0, dtype=torch.long)
    test_rows = gt.choose_rows(len(task.test), opts.n_test_eval, task.derived_seed(TEST_SALT), "task.n_test_eval")
    loo_rows = gt.choose_rows(n_train, opts.n_loo, task.derived_seed(LOO_SALT), "task.n_loo") if opts.n_loo else no_rows
    masks = (gt.subset_masks(n_train, opts.n_subsets, opts.alpha, task.derived_seed(SUBSET_SALT))
             if opts.n_subsets else None)
    return {"test_rows": test_rows, "loo_rows": loo_rows, "masks": masks,
            "loo_seeds": gt.retrain_seeds(task.seed, opts.retrain_seeds),
            "subset_seeds": gt.retrain_seeds(task.seed, opts.subset_seeds)}


def _all_jobs(plan: dict[str, Any], n_train: int) -> list[gt.RetrainJob]:
    jobs = gt.loo_jobs(n_train, plan["loo_rows"], plan["loo_seeds"]) if len(plan["loo_rows"]) else []
    return jobs + (gt.subset_jobs(plan["masks"], plan["subset_seeds"]) if plan["masks"] is not None else [])


def _measure(opts: GroundTruthConfig, plan: dict[str, Any], retrainer: gt.SGDRetrainer,
             task: InfluenceTask) -> tuple[dict[str, Any], dict[str, float]]:
    """Measured LOO effects and subset outcomes (trained or loaded), and the ground truth's own noise."""
    truth, extra, trained = dict(plan), {}, 0
    if len(plan["loo_rows"]):
        loo = gt.measure_loo(retrainer, len(task.train), plan["loo_rows"], plan["loo_seeds"], plan["test_rows"],
                             task.cache)
        truth["loo"], trained = loo, trained + int(loo["trained"])
        extra |= {f"loo.{k}": v for k, v in gt.seed_agreement(loo["per_seed"]).items()}
        extra |= {"loo.effect_std": float(loo["test"].std()), "loo.self_effect_mean": float(loo["self"].mean())}
    if plan["masks"] is not None:
        per_seed, n = gt.measure_subsets(retrainer, plan["masks"], plan["subset_seeds"], plan["test_rows"],
                                         task.cache, opts.outcome)           # (S, n_seeds, m)
        truth["lds"], trained = per_seed.mean(1), trained + n
        extra |= {f"lds.{k}": v for k, v in gt.seed_agreement(per_seed.transpose(0, 1)).items()}
    extra["n_trained"] = trained
    return truth, extra


# ------------------------------------------------------------------------------------------------- figures

def _figures(run_dir: Path, results: dict[str, dict], metrics: dict[str, Any], setting: str) -> dict[str, Path]:
    """``loo_scatter.png`` (predicted vs measured per method) and ``lds_per_test.png`` (per-test LDS boxes)."""
    from matplotlib.figure import Figure
    paths = {}
    pairs = [(m, t) for m, t in results.items() if "predicted" in t]
    if pairs:
        cols = min(4, len(pairs))
        fig = Figure(figsize=(3.6 * cols, 3.0 * -(-len(pairs) // cols)), layout="constrained")
        for k, (name, t) in enumerate(pairs):
            ax = fig.add_subplot(-(-len(pairs) // cols), cols, k + 1)
            ax.scatter(t["predicted"].reshape(-1).numpy(), t["measured"].reshape(-1).numpy(), s=4, alpha=0.5)
            ax.set_title(f"{name}: Spearman {metrics[f'{name}.loo_spearman']:.3f}", fontsize=9)
            ax.set_xlabel("predicted influence", fontsize=8)
            ax.set_ylabel("LOO loss change", fontsize=8)
        fig.suptitle(f"leave-one-out, {setting}", fontsize=10)
        paths["loo_scatter"] = plots.save_figure(fig, run_dir / "loo_scatter")[0]
    boxes = [(m, t["lds_per_test"]) for m, t in results.items() if "lds_per_test" in t]
    if boxes:
        fig = Figure(figsize=(max(4.0, 0.7 * len(boxes) + 2), 3.2), layout="constrained")
        ax = fig.add_subplot()
        ax.boxplot([v[torch.isfinite(v)].numpy() for _, v in boxes], tick_labels=[m for m, _ in boxes])
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_ylabel("LDS per test sample (Spearman)")
        ax.set_title(f"linear datamodeling score, {setting}", fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        paths["lds_per_test"] = plots.save_figure(fig, run_dir / "lds_per_test")[0]
    return paths


# ---------------------------------------------------------------------------------------------------- run

def _check_model_options(model: ModelConfig) -> None:
    """configs/groundtruth.yaml sizes the MLP; another model that does not take those options fails here, in one
    line with the fix, rather than deep inside model building."""
    accepted = inspect.signature(MODELS[model.name]).parameters
    for key in model.options:
        if key not in accepted:
            raise UsageError(f"model.options.{key} is not an option of model={model.name} (valid: "
                             f"{[k for k in accepted if k not in ('input_shape', 'num_classes')]}); "
                             f"configs/groundtruth.yaml sizes the mlp, so drop it with '~model.options.{key}'")


def _train_shard(opts, plan, retrainer, task, record, start) -> dict[str, Any]:
    jobs = gt.shard_jobs(_all_jobs(plan, len(task.train)), opts.shard, opts.num_shards)
    _, trained = gt.collect_outcomes(retrainer, jobs, task.cache, desc=f"shard {opts.shard}/{opts.num_shards}")
    metrics = {"task": "groundtruth_shard", "shard": opts.shard, "num_shards": opts.num_shards, "n_jobs": len(jobs),
               "n_trained": trained, "seed": task.seed, "wall_s": time.perf_counter() - start}
    record.write(metrics)
    print(f"[groundtruth] shard {opts.shard}/{opts.num_shards}: {len(jobs)} retrains, {trained} trained now")
    return metrics


def _score_all(names: list[str], overrides: dict[str, Any], task: InfluenceTask, truth: dict[str, Any],
               opts: GroundTruthConfig, times: dict[str, float], metrics: dict[str, Any]) -> dict[str, dict]:
    """Fit and score each method against the ground truth; adds ``<m>.<metric>`` to ``metrics`` (NaN for a method
    that fails, with one line saying why) and returns each method's tensors for ``scores.pt``."""
    results = {}
    for name in names:
        try:
            scores = score_method(name, method_options(name, overrides.get(name)), task, truth["test_rows"],
                                  truth["loo_rows"], times)
            values, results[name] = method_metrics(scores, truth, opts, task.derived_seed(BOOT_SALT))
        except (MethodError, NotImplementedError, ValueError, RuntimeError) as err:  # one method must not sink the run
            print(f"[groundtruth] {name}: skipped: {err}")
            log.error("%s: skipped: %s", name, err)
            values, results[name] = {k: math.nan for k in METRICS}, {}
        metrics |= {f"{name}.{k}": v for k, v in values.items()}
    return results


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Retrain (or load) the ground truth, fit and score every method, and write the record; returns the metrics."""
    opts = typed_config(GroundTruthConfig, cfg.task, "task")
    settings, record, start = settings_from(cfg), RunRecord(run_dir, cfg), time.perf_counter()
    names = select_methods(list(cfg.get("methods") or DEFAULT_METHODS)) if opts.num_shards == 1 else []
    _check_model_options(settings.model)
    _, task = load_task(settings, logger)
    plan = _plan(opts, task)
    retrainer = gt.SGDRetrainer(task, retrain_recipe(task.recipe, opts.retrain_epochs), opts.exact_bn)
    if opts.num_shards > 1:
        return _train_shard(opts, plan, retrainer, task, record, start)
    times: dict[str, float] = {}
    with stage_timer(times, "wall_s_retrain", task.device):
        truth, metrics = _measure(opts, plan, retrainer, task)
    node = cfg.get("method_options")
    overrides = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    results = _score_all(names, overrides, task, truth, opts, times, metrics)
    setting = f"{settings.data.name} / {settings.model.name}"
    metrics |= times | {"task": "groundtruth", "method": "multi", "methods": ",".join(names),
                        "data": settings.data.name, "model": settings.model.name, "seed": task.seed,
                        "n_train": len(task.train), "n_test_eval": opts.n_test_eval, "n_loo": opts.n_loo,
                        "n_subsets": opts.n_subsets, "retrain_seeds": opts.retrain_seeds, "outcome": opts.outcome,
                        "wall_s_pretrain": task.pretrain_wall_s, "peak_mem_mb": peak_mem_mb(task.device),
                        "wall_s": time.perf_counter() - start} | versions()
    figures = _figures(run_dir, results, metrics, setting)
    for key, path in figures.items():
        logger.image(key, path)
    record.write(metrics, _scores(truth, results))
    _print(names, metrics)
    return metrics


def _scores(truth: dict[str, Any], results: dict[str, dict]) -> dict[str, Tensor]:
    out = {"test_rows": truth["test_rows"], "loo_rows": truth["loo_rows"]}
    if "loo" in truth:
        out |= {"loo_measured": truth["loo"]["test"], "loo_measured_per_seed": truth["loo"]["per_seed"],
                "self_loo": truth["loo"]["self"]}
    if "lds" in truth:
        out |= {"subset_masks": truth["masks"], "lds_outcomes": truth["lds"]}
    for name, tensors in results.items():
        out |= {f"{name}.{k}": v for k, v in tensors.items()}
    return out


def _print(names: list[str], metrics: dict[str, Any]) -> None:
    print(f"[groundtruth] {metrics['data']}/{metrics['model']}: retrained {metrics['n_trained']} models now; "
          f"seed agreement per test (Spearman): loo {metrics.get('loo.seed_spearman_per_test', math.nan):.3f}, "
          f"lds {metrics.get('lds.seed_spearman_per_test', math.nan):.3f}")
    for name in names:
        get = lambda k: metrics.get(f"{name}.{k}", math.nan)  # noqa: E731
        print(f"[groundtruth] {name:>10}: lds={get('lds'):.3f} [{get('lds_ci_low'):.3f}, {get('lds_ci_high'):.3f}] "
              f"loo_spearman={get('loo_spearman'):.3f} loo_pearson={get('loo_pearson'):.3f} "
              f"self_loo_spearman={get('self_loo_spearman'):.3f}")


@hydra.main(config_path="../configs", config_name="groundtruth", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("groundtruth")(run)(cfg)


if __name__ == "__main__":
    cli(main)
