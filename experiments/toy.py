"""The paper's Fig. 2 toy (docs/method.md#the-papers-evidence): ``python -m experiments.toy [seed=0]``; five seeds:
``python -m experiments.toy -m seed=0,1,2,3,4``.

On ``two_circles`` (two dense circles, one per class, plus rare "influential" points between them; clean labels) a
small BN MLP is trained full batch to convergence (``configs/toy.yaml``). Every estimator scores each training
point by self-influence, and the run records how well it separates the influential points from the typical ones
(``<m>.auroc``, ``<m>.ap``; label 1 = influential) and how it agrees with leave-one-out (``<m>.spearman_loo``,
``<m>.pearson_loo``). Estimators:

- ``loo``: exact leave-one-out, ``l_i(theta_-i) - l_i(theta*)``, theta_-i retrained without point i from the same
  initialization with the same recipe and seed (``gex.train.train``); cached point by point in ``paths.cache``, so
  an interrupted run resumes. ``loo.refit_gap`` is the largest loss change of a retrain on *all* points: the
  noise floor of the LOO values (0 when retraining is bitwise deterministic).
- ``if_exact``: ``g^T (H + alpha I)^-1 g`` with the explicit Hessian, alpha = ``task.main_damping`` (the paper's
  100); the other dampings of ``task.dampings`` as ``if_exact_a<alpha>``. A damping for which ``H + alpha I`` is not
  positive definite is reported (the message names the damping needed) and its metrics are NaN.
- ``gex`` and ``gex_lin`` with the options of ``cfg.method`` (a GEX-family config). The toy's losses at theta*
  are ~1e-5 (typical) to ~0.3 (influential), so the configured ``eps`` is 0 (no clamp): the paper's 0.05 would
  clamp almost every reference and invert the ranking (docs/decisions.md#what-the-cpu-pilot-taught-us).
- ``loss``: the training loss at theta*.

Writes ``metrics.json``, ``scores.pt`` (``self_influence`` = GEX, one tensor per estimator, ``is_influential``),
``toy_scores.png`` (the data coloured by each estimator) and ``toy_hist.png`` (influential vs typical).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from experiments import plots
from experiments.launch import cli, entry_point
from experiments.metrics import ranking_metrics
from experiments.scaffold import (
    RunLogger,
    RunRecord,
    UsageError,
    load_task,
    register_methods,
    settings_from,
    typed_config,
    versions,
)
from gex.attribution import InfluenceTask, MethodError, build_method
from gex.evaluation import per_sample_losses
from gex.train import train
from gex.utils import peak_mem_mb, progress, stage_timer

__all__ = ["ToyConfig", "loo_rows", "loo_self_influence", "refit_gap", "damping_key", "if_exact_scores",
           "gex_options", "gex_family_scores", "estimator_metrics", "run"]

log = logging.getLogger("gex")

GEX_FAMILY = ("gex", "gex_lin", "gex_mean_loss")
LOG_FLOOR = 1e-12  # figures show log10 of the scores, floored here (LOO can be slightly negative)
HIST_BINS = 20     # 210 points: 20 bins suffice, and matplotlib draws each bar as a patch (slow)


@dataclass
class ToyConfig:
    """``task=toy``.

    Attributes:
        name: ``toy``.
        loo_points: leave-one-out on every training point (null) or on k evenly spaced rows (smoke runs).
        dampings: the exact-Hessian IF grid.
        main_damping: the damping reported as ``if_exact`` (the paper's 100); must be in ``dampings``.
    """

    name: str = "toy"
    loo_points: Optional[int] = None
    dampings: list[float] = field(default_factory=lambda: [0.01, 1.0, 100.0])
    main_damping: float = 100.0

    def __post_init__(self) -> None:
        if self.name != "toy":
            raise UsageError(f"task={self.name!r} does not fit python -m experiments.toy; use task=toy")
        if self.loo_points is not None and self.loo_points < 2:
            raise UsageError(f"task.loo_points={self.loo_points} must be >= 2 or null (= every training point)")
        if not self.dampings or any(a < 0 for a in self.dampings) or self.main_damping not in self.dampings:
            raise UsageError(f"task.dampings={list(self.dampings)} must be non-negative and contain "
                             f"task.main_damping={self.main_damping}")


def loo_rows(n: int, k: Optional[int]) -> Tensor:
    """All rows (``k`` None or >= n) or ``k`` evenly spaced rows with the first and the last, ascending."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long().unique()


def _retrain_without(task: InfluenceTask, row: int) -> float:
    """Loss of training point ``row`` under a model retrained without it (same init, recipe and seed)."""
    keep = torch.cat([torch.arange(row), torch.arange(row + 1, len(task.train))])
    model = task.make_model().to(task.device)
    train(model, task.train.subset(keep), task.recipe, seed=task.seed, device=task.device, desc=f"LOO {row}")
    return float(per_sample_losses(model, task.train.subset(torch.tensor([row])), task.loss)[0])


def loo_self_influence(task: InfluenceTask, rows: Tensor) -> Tensor:
    """Exact leave-one-out self-influence ``l_i(theta_-i) - l_i(theta*)``, float64 ``(n,)``, NaN off ``rows``.

    Each finished point is saved to ``task.cache`` (kind ``loo``) at once, so an interrupted run resumes.
    """
    base = per_sample_losses(task.model, task.train, task.loss).double()
    spec = {"pretrain": task.cache_spec, "loss": task.loss, "job": "loo_self_influence"}
    cached = task.cache.load("loo", spec, "loss_change") if task.cache is not None else None
    values = cached.clone() if cached is not None else torch.full((len(task.train),), math.nan, dtype=torch.float64)
    todo = [int(i) for i in rows if math.isnan(values[i])]
    log.info("leave-one-out: %d of %d points to retrain", len(todo), len(rows))
    for row in progress(todo, desc="leave-one-out"):
        values[row] = _retrain_without(task, row) - base[row]
        if task.cache is not None:
            task.cache.save("loo", spec, "loss_change", values)
    out = torch.full_like(values, math.nan)
    out[rows] = values[rows]
    return out


def refit_gap(task: InfluenceTask) -> float:
    """Largest ``|l_i(refit) - l_i(theta*)|`` of a retrain on every point: the noise floor of the LOO values."""
    model = task.make_model().to(task.device)
    train(model, task.train, task.recipe, seed=task.seed, device=task.device, desc="refit")
    refit = per_sample_losses(model, task.train, task.loss).double()
    return float((refit - per_sample_losses(task.model, task.train, task.loss).double()).abs().max())


def damping_key(damping: float, main: float) -> str:
    """``if_exact`` for the main damping, else ``if_exact_a<damping>`` (``.`` -> ``p``, ``-`` -> ``m``)."""
    return "if_exact" if damping == main else "if_exact_a" + f"{damping:g}".replace(".", "p").replace("-", "m")


def if_exact_scores(task: InfluenceTask, dampings: list[float], main: float) -> dict[str, Tensor]:
    """Exact-Hessian IF self-influence per damping; a non-positive-definite ``H + alpha I`` gives NaN scores."""
    out = {}
    for damping in dampings:
        key = damping_key(damping, main)
        try:
            out[key] = build_method("if_exact", damping=damping).fit(task).self_influence(task.train).double()
        except MethodError as err:
            log.warning("%s skipped: %s", key, err)  # surfaced in the run log; its metrics are NaN
            out[key] = torch.full((len(task.train),), math.nan, dtype=torch.float64)
    return out


def gex_options(method_cfg: DictConfig) -> dict:
    """The constructor options of ``cfg.method`` (without ``name``), which must be a GEX-family config."""
    options = OmegaConf.to_container(method_cfg, resolve=True)
    name = options.pop("name", None)
    if name not in GEX_FAMILY:
        raise UsageError(f"method={name}: the toy runs gex and gex_lin with the options of a GEX-family method "
                         f"config; use method=gex (valid: {list(GEX_FAMILY)})")
    return options


def gex_family_scores(options: dict, task: InfluenceTask,
                      times: dict[str, float]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """GEX and GEX-lin self-influence with ``options`` (``gex_options``), and their diagnostics (prefixed)."""
    scores, extra = {}, {}
    for key in ("gex", "gex_lin"):
        with stage_timer(times, key, task.device):
            method = build_method(key, **options).fit(task)
            scores[key] = method.self_influence(task.train).double()
        extra |= {f"{key}.{k}": v for k, v in method.diagnostics().items()} | {f"{key}.eps": method.eps}
    return scores, extra


def _correlations(scores: Tensor, loo: Tensor, rows: Tensor) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr
    a, b = scores[rows].numpy(), loo[rows].numpy()
    if len(rows) < 2 or not (torch.isfinite(scores[rows]).all()) or a.std() == 0 or b.std() == 0:
        return {"spearman_loo": math.nan, "pearson_loo": math.nan}
    return {"spearman_loo": float(spearmanr(a, b).statistic), "pearson_loo": float(pearsonr(a, b).statistic)}


def estimator_metrics(name: str, scores: Tensor, influential: Tensor, loo: Tensor, rows: Tensor) -> dict[str, float]:
    """``<name>.auroc``/``.ap`` (influential = 1, over the points it scored) and ``.spearman_loo``/``.pearson_loo``."""
    scored = torch.isfinite(scores)
    if scored.any():
        ranking = ranking_metrics(scores[scored], influential[scored], f"toy ({name})")
    else:
        ranking = {"auroc": math.nan, "ap": math.nan}
    return {f"{name}.{k}": v for k, v in (ranking | _correlations(scores, loo, rows)).items()}


def _figures(run_dir: Path, task: InfluenceTask, scores: dict[str, Tensor], metrics: dict,
             seed: int) -> dict[str, Path]:
    """Fig. 2 panels: the data coloured by log10 self-influence, and influential-vs-typical histograms (estimators
    without any score, e.g. a damping that left ``H + alpha I`` indefinite, are left out)."""
    influential = task.train.extra["is_influential"].cpu()
    logs = {k: torch.log10(v.clamp(min=LOG_FLOOR)) for k, v in scores.items() if torch.isfinite(v).any()}
    subtitles = {k: f"AUROC {metrics[f'{k}.auroc']:.3f} / AP {metrics[f'{k}.ap']:.3f}" for k in logs}
    title = f"two_circles, seed {seed}: log10 self-influence (floored at {LOG_FLOOR:g})"
    paths = {"toy_scores": run_dir / "toy_scores.png", "toy_hist": run_dir / "toy_hist.png"}
    plots.plot_toy_panel(task.train.x.cpu(), logs, influential, title, paths["toy_scores"], subtitles=subtitles)
    panels = [(v[torch.isfinite(v)], influential[torch.isfinite(v)], f"{k}  {subtitles[k]}")
              for k, v in logs.items()]
    plots.plot_self_influence_panel(panels, paths["toy_hist"], labels=("typical", "influential"),
                                    bins=HIST_BINS, suptitle=title)
    return paths


def _score(task: InfluenceTask, opts: ToyConfig, options: dict, rows: Tensor,
           times: dict[str, float]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Every estimator's self-influence (float64 ``(n,)``) and the extra numbers (LOO noise floor, diagnostics)."""
    with stage_timer(times, "loo", task.device):
        scores = {"loo": loo_self_influence(task, rows)}
        extra = {"loo.refit_gap": refit_gap(task)}
    with stage_timer(times, "if_exact", task.device):
        scores |= if_exact_scores(task, list(opts.dampings), opts.main_damping)
    gex_scores, diagnostics = gex_family_scores(options, task, times)
    scores |= gex_scores | {"loss": build_method("loss").fit(task).self_influence(task.train).double()}
    return scores, extra | diagnostics


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Train theta*, score with every estimator, and write the toy record; returns the metrics."""
    opts, options = typed_config(ToyConfig, cfg.task, "task"), gex_options(cfg.method)
    settings, record, start = settings_from(cfg), RunRecord(run_dir, cfg), time.perf_counter()
    register_methods()
    _, task = load_task(settings, logger)
    if "is_influential" not in task.train.extra:
        raise UsageError(f"task=toy needs data with influential points (extra['is_influential']); "
                         f"data={settings.data.name} has none; use data=two_circles")
    influential, rows, times = task.train.extra["is_influential"].cpu(), loo_rows(len(task.train), opts.loo_points), {}
    scores, extra = _score(task, opts, options, rows, times)
    metrics = {}
    for name, values in scores.items():
        metrics |= estimator_metrics(name, values, influential, scores["loo"], rows)
    metrics |= extra | {"n_loo": len(rows), "n_train": len(task.train), "n_influential": int(influential.sum()),
                        "method": cfg.method.name, "data": settings.data.name, "model": settings.model.name,
                        "seed": settings.seed, "task": "toy", "wall_s_pretrain": task.pretrain_wall_s,
                        "peak_mem_mb": peak_mem_mb(settings.device)}
    metrics |= {f"wall_s_{k}": v for k, v in times.items()} | {"wall_s": time.perf_counter() - start} | versions()
    for name, path in _figures(run_dir, task, scores, metrics, settings.seed).items():
        logger.image(name, path)
    record.write(metrics, {"self_influence": scores["gex"], **scores, "is_influential": influential,
                           "index": task.train.index.cpu()})
    for name in scores:
        print(f"[toy] {name:>16}: auroc={metrics[f'{name}.auroc']:.4f} ap={metrics[f'{name}.ap']:.4f} "
              f"spearman_loo={metrics[f'{name}.spearman_loo']:.3f}")
    return metrics


@hydra.main(config_path="../configs", config_name="toy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("toy")(run)(cfg)


if __name__ == "__main__":
    cli(main)
