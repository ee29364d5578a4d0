"""Shared logic of the four downstream tasks (SPEC B3.2-B3.5): detect, relabel, prune, separate.

The entry points (``experiments/<task>.py``) stay thin: they validate the task options, call ``start_run``
(settings, run record, method, theta*, ``fit``), score, call the pure functions below, and ``finish_run``.

Sign conventions follow ``gex.attribution``: self-influence higher = more influential; pairwise influence
positive = the training sample lowers the test loss (a proponent). Rankings put the highest score first and break
ties with a seeded U(0, 0.5) secondary key (the authors' tie-break for integer scores), so equal scores are
ordered deterministically and without favouring low indices.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from experiments.common import RunLogger, RunRecord, Settings, UsageError, load_task, settings_from, typed_config, versions
from gex.attribution import Attributor, InfluenceTask, MethodError, build_method
from gex.data import DataBundle, LabeledData
from gex.runs import tensors_digest
from gex.train import TrainConfig, eval_logits, train
from gex.utils import peak_mem_mb, stage_timer

__all__ = ["DetectConfig", "RelabelConfig", "PruneConfig", "SeparateConfig", "task_config", "RELABEL_MODES",
           "DETECT_SCORES", "FOUND_AT_PCTS", "register_methods", "method_from_cfg", "has_pairwise",
           "require_pairwise", "TaskRun", "start_run", "record_fields", "finish_run", "check_scores",
           "ranking_order", "ranking_metrics", "found_at", "detection_metrics", "otsu_flags",
           "model_probs", "rdia_targets", "relabeled_data", "flag_metrics", "pct_label", "n_removed", "prune_rows",
           "random_prune_rows", "retrain_recipe", "retrain_test_acc", "data_digest", "cached_value",
           "unchanged_test_acc", "minority_mask", "rows_where", "upweighted", "accuracy"]

log = logging.getLogger("gex")

DETECT_SCORES = ("self", "cross")
RELABEL_MODES = ("rdia", "drop", "soft_all", "oracle")
FOUND_AT_PCTS = (5, 10, 20)   # found_at_<pct>: share of noisy samples among the top pct% of the ranking
RDIA_EPS = 1e-12              # the authors' guard inside the RDIA logarithms (SPEC B3.3)
TIE_SALT = 0x71E              # separates the tie-break stream from every other seeded stream
RANDOM_PRUNE_SALT = 0x9A7     # the random-pruning reference's stream


# ---------------------------------------------------------------------------------------------- task options

def _check_epochs(value: Optional[int]) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"task.retrain_epochs={value} must be a positive integer or null (= the pretraining recipe)")


@dataclass
class DetectConfig:
    """``task=detect`` (SPEC B3.2).

    Attributes:
        name: ``detect``.
        score: ``self`` = self-influence; ``cross`` = -(influence on the mean test loss), as the authors.
    """

    name: str = "detect"
    score: str = "self"

    def __post_init__(self) -> None:
        if self.score not in DETECT_SCORES:
            raise UsageError(f"task.score={self.score!r} is unknown; valid choices: {list(DETECT_SCORES)}")


@dataclass
class RelabelConfig:
    """``task=relabel`` (SPEC A3, B3.3).

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
        _check_epochs(self.retrain_epochs)


@dataclass
class PruneConfig:
    """``task=prune`` (SPEC B3.4): remove the lowest self-influence fraction, retrain, compare with random.

    Attributes:
        name: ``prune``.
        fractions: fractions of the training set removed, each in (0, 1), distinct as integer percents.
        retrain_epochs: epochs of every retrain (steps sized to what remains); null = the pretraining recipe's.
    """

    name: str = "prune"
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4])
    retrain_epochs: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.fractions:
            raise UsageError("task.fractions is empty; give fractions removed in (0, 1), e.g. [0.1,0.2]")
        for frac in self.fractions:
            if not 0.0 < float(frac) < 1.0:
                raise UsageError(f"task.fractions contains {frac}: each fraction removed must lie in (0, 1)")
        labels = [pct_label(f) for f in self.fractions]
        if len(set(labels)) != len(labels):
            raise UsageError(f"task.fractions={list(self.fractions)} repeats an integer percent ({labels})")
        _check_epochs(self.retrain_epochs)


@dataclass
class SeparateConfig:
    """``task=separate`` (SPEC A4, B3.5; the protocol is ours).

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
        if self.upweight_by not in DETECT_SCORES:
            raise UsageError(f"task.upweight_by={self.upweight_by!r} is unknown; valid choices: {list(DETECT_SCORES)}")
        if self.upweight_by == "cross" and not self.cross:
            raise UsageError("task.upweight_by=cross needs task.cross=true")
        _check_epochs(self.retrain_epochs)


_TASKS = {"detect": DetectConfig, "relabel": RelabelConfig, "prune": PruneConfig, "separate": SeparateConfig}


def task_config(node: Any, job: str):
    """The typed options of ``job`` from ``cfg.task``; a task meant for another entry point is a one-line error."""
    name = node.get("name") if node is not None else None
    if name != job:
        raise UsageError(f"task={name!r} does not fit python -m experiments.{job}; "
                         f"use task={job}, or python -m experiments.{name} for task={name}")
    return typed_config(_TASKS[job], node, "task")


# -------------------------------------------------------------------------------------------------- methods

def register_methods() -> None:
    """Import every method module, so the registry is complete (baselines/ and the GEX family)."""
    import baselines  # noqa: F401  (imports each baselines/<method>.py)
    import gex.gex  # noqa: F401  (registers gex, gex_lin and the rest of the GEX family)


def method_from_cfg(node: Any) -> Attributor:
    """``build_method(cfg.method.name, **other keys)``; a bad option is a one-line ``MethodError``."""
    register_methods()
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    name = values.pop("name", None)
    try:
        return build_method(name, **values)
    except TypeError as err:  # an option the constructor does not take
        raise MethodError(f"method={name}: {err}; check configs/method/{name}.yaml") from None


def has_pairwise(method: Attributor) -> bool:
    """Whether the method has a pairwise form, decided before any work.

    No override of ``influence``/``influence_on_mean_test`` means none. A subclass may also override them only to
    refuse (e.g. ``gex_mean_loss``); probing the unfitted method shows that at no cost, since a real pairwise
    method first asks for ``fit`` (any error other than ``NotImplementedError`` counts as "has one").
    """
    cls = type(method)
    if (cls.influence is Attributor.influence
            and cls.influence_on_mean_test is Attributor.influence_on_mean_test):
        return False
    try:
        method.influence_on_mean_test(None, None)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001  (the usual answer before fit: "call fit(task) before scoring")
        return True
    return True


def require_pairwise(method: Attributor, option: str, fix: str) -> None:
    """Fail before any work when ``option`` asks a method without a pairwise form for one."""
    if not has_pairwise(method):
        raise MethodError(f"{option} needs pairwise influence, which method={method.name} does not have; {fix}")


# ------------------------------------------------------------------------------------------- run scaffolding

@dataclass
class TaskRun:
    """What ``start_run`` built: typed settings, the run record, the fitted method, the data and theta*."""

    settings: Settings
    record: RunRecord
    method: Attributor
    bundle: DataBundle
    task: InfluenceTask
    times: dict[str, float]
    started: float


def start_run(cfg: DictConfig, run_dir: Path, logger: RunLogger, *, pairwise: Optional[tuple[str, str]] = None,
              check: Optional[Callable[[DataBundle], None]] = None) -> TaskRun:
    """Validate, then load theta* and fit the method (timed into ``times['fit']``).

    Args:
        cfg: the composed config.
        run_dir: the Hydra run directory (refused if it holds a finished run with another config).
        logger: W&B logger (pretraining curves go there).
        pairwise: ``(option, fix)`` when the task needs pairwise influence: checked before anything runs.
        check: called on the data before fitting (e.g. "are there noisy samples?").
    """
    started = time.perf_counter()
    settings = settings_from(cfg)
    record = RunRecord(run_dir, cfg)
    method = method_from_cfg(cfg.method)
    if pairwise is not None:
        require_pairwise(method, *pairwise)
    bundle, task = load_task(settings, logger)
    if check is not None:
        check(bundle)
    times: dict[str, float] = {}
    with stage_timer(times, "fit", settings.device):
        method.fit(task)
    log.info("[%s] fit in %.1fs", method.name, times["fit"])
    return TaskRun(settings, record, method, bundle, task, times, started)


def record_fields(cfg: DictConfig, run: TaskRun, job: str) -> dict[str, Any]:
    """The fields every task's ``metrics.json`` holds besides its metrics."""
    s = run.settings
    return {"method": run.method.name, "data": s.data.name, "model": s.model.name, "seed": s.seed, "task": job,
            "noise_kind": s.noise.kind, "noise_rate": s.noise.rate, "n_train": len(run.task.train),
            "wall_s_pretrain": run.task.pretrain_wall_s, "wall_s_fit": run.times.get("fit", 0.0),
            "wall_s_score": run.times.get("score", 0.0), "wall_s": time.perf_counter() - run.started,
            "peak_mem_mb": peak_mem_mb(s.device)} | versions()


def finish_run(run: TaskRun, logger: RunLogger, metrics: dict[str, Any], scores: dict[str, Tensor],
               figures: dict[str, Path]) -> dict[str, Any]:
    """Log the figures to W&B and write the record (metrics.json last: it marks a finished run)."""
    for name, path in figures.items():
        logger.image(name, path)
    run.record.write(metrics, scores)
    return metrics


def check_scores(scores: Tensor, n: int, what: str, method: str) -> Tensor:
    """Scores as float64 CPU ``(n,)``; a wrong shape or a non-finite value is a one-line ``MethodError``."""
    scores = scores.detach().double().cpu().reshape(-1)
    if scores.numel() != n:
        raise MethodError(f"method={method} returned {scores.numel()} {what} scores for {n} samples")
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise MethodError(f"method={method} returned {bad} non-finite {what} scores of {n}")
    return scores


# ------------------------------------------------------------------------------------------------- rankings

def ranking_order(scores: Tensor, *, descending: bool = True, seed: int = 0) -> Tensor:
    """Rows sorted by score, shape ``(n,)`` long; ties broken by a seeded U(0, 0.5) secondary key.

    Args:
        scores: ``(n,)``.
        descending: highest first (inspection order) or lowest first (pruning order).
        seed: seed of the tie-break key.
    """
    values = scores.detach().double().cpu().numpy()
    tie = np.random.default_rng([seed, TIE_SALT]).uniform(0.0, 0.5, len(values))
    return torch.from_numpy(np.lexsort((tie, -values if descending else values)).astype(np.int64))


def _two_classes(positive: Tensor, what: str) -> np.ndarray:
    pos = positive.detach().cpu().numpy().astype(bool)
    if pos.all() or not pos.any():
        raise UsageError(f"{what}: need both positive and negative samples, got {int(pos.sum())} of {len(pos)}")
    return pos


def ranking_metrics(scores: Tensor, positive: Tensor, what: str = "ranking") -> dict[str, float]:
    """``auroc`` and ``ap`` (sklearn) of ``scores`` (higher = more likely positive) against bool ``positive``."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    pos = _two_classes(positive, what)
    values = scores.detach().double().cpu().numpy()
    return {"auroc": float(roc_auc_score(pos, values)), "ap": float(average_precision_score(pos, values))}


def found_at(scores: Tensor, positive: Tensor, frac: float, seed: int = 0) -> float:
    """Share of the positives among the top ``round(frac * n)`` rows of the ranking."""
    k = int(round(frac * len(scores)))
    top = ranking_order(scores, seed=seed)[:k]
    return float(positive.cpu()[top].sum()) / max(1, int(positive.sum()))


def detection_metrics(scores: Tensor, positive: Tensor, seed: int = 0) -> dict[str, float]:
    """``auroc``, ``ap`` and ``found_at_<pct>`` for pct in ``FOUND_AT_PCTS``."""
    out = ranking_metrics(scores, positive, "detect (is_noisy)")
    return out | {f"found_at_{pct}": found_at(scores, positive, pct / 100, seed) for pct in FOUND_AT_PCTS}


def detection_by_fit(scores: Tensor, noisy: Tensor, fitted: Tensor) -> dict[str, float]:
    """AUROC against the clean samples, separately for the mislabeled samples theta* fits (predicts as their noisy
    label: the memorized ones, GEX's regime) and for those it does not.

    Returns ``auroc_noisy_fit`` and ``auroc_noisy_unfit``; a key is left out when its group (or the clean set) is
    empty.
    """
    noisy, fitted = noisy.cpu().bool(), fitted.cpu().bool()
    out = {}
    for name, group in (("fit", noisy & fitted), ("unfit", noisy & ~fitted)):
        keep = group | ~noisy
        if group.any() and (~noisy).any():
            out[f"auroc_noisy_{name}"] = ranking_metrics(scores.cpu()[keep], group[keep], "detect")["auroc"]
    return out


# ------------------------------------------------------------------------------------------------ relabeling

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
    """RDIA soft targets (SPEC B3.3): y'_y = 0, y'_k = ln((1-p_y)^(1/(K-1)) + e) / (ln(p_k + e) + e), e = 1e-12.

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
        return rows_where(train, ~flags)
    if mode == "soft_all":
        return replace(train, targets=probs.float().to(device))
    targets = F.one_hot(train.y.cpu(), train.num_classes).double()
    soft = rdia_targets(probs, train.y.cpu()) if loss == "ce" else probs.double()
    targets[flags] = soft.cpu()[flags]
    return replace(train, targets=targets.float().to(device))


def flag_metrics(flags: Tensor, is_noisy: Tensor) -> dict[str, float]:
    """``flag_precision`` (NaN when nothing is flagged), ``flag_recall`` (NaN without noisy samples), ``n_flagged``."""
    flags, noisy = flags.cpu().bool(), is_noisy.cpu().bool()
    hit = float((flags & noisy).sum())
    return {"flag_precision": hit / float(flags.sum()) if flags.any() else float("nan"),
            "flag_recall": hit / float(noisy.sum()) if noisy.any() else float("nan"), "n_flagged": int(flags.sum())}


# --------------------------------------------------------------------------------------------------- pruning

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


# ------------------------------------------------------------------------------------------------ retraining

def retrain_recipe(recipe: TrainConfig, epochs: Optional[int]) -> TrainConfig:
    """The pretraining recipe, with ``epochs`` replaced when given (steps are then sized from the data)."""
    return recipe if epochs is None else replace(recipe, epochs=int(epochs), steps=None)


def accuracy(model: torch.nn.Module, test: LabeledData) -> float:
    """Accuracy of ``model`` on ``test`` (eval mode)."""
    pred = eval_logits(model, test).argmax(-1)
    return float((pred == test.y.cpu()).double().mean())


def retrain_test_acc(task: InfluenceTask, data: LabeledData, recipe: TrainConfig, test: LabeledData,
                     desc: str = "retrain") -> float:
    """Train a fresh model from theta*'s initialization (``task.fresh_model()``, same seed and data order) on
    ``data`` with ``recipe`` (schedule sized to ``len(data)``; BN refreshed) and return its accuracy on ``test``.

    Cached by what the retrain sees (theta*'s spec, the recipe, and the contents of ``data`` and ``test``), so a
    task that was interrupted after some of its retrains (a pruning grid) continues past the finished ones.
    """
    def compute() -> float:
        model = task.fresh_model()
        train(model, data, recipe, seed=task.seed, device=task.device, desc=desc)
        return accuracy(model, test)

    what = {"job": "retrain", "recipe": recipe.cache_spec(), "data": data_digest(data), "test": data_digest(test)}
    return cached_value(task, what, compute)


def data_digest(data: LabeledData) -> str:
    """16 hex digits identifying what a training or evaluation pass sees: inputs, labels, soft targets, weights and
    original indices, in their order."""
    return tensors_digest(data.x, data.y, data.targets, data.weights, data.index)


def cached_value(task: InfluenceTask, what: dict[str, Any], compute: Callable[[], float]) -> float:
    """A method-independent number (e.g. a reference retrain's accuracy), cached by theta*'s spec plus ``what``."""
    if task.cache is None:
        return compute()
    spec = {"pretrain": task.cache_spec, **what}
    hit = task.cache.load("retrain", spec, "result")
    if hit is not None:  # ArtifactCache.load has logged the reuse
        return float(hit["value"])
    value = float(compute())
    task.cache.save("retrain", spec, "result", {"value": value})
    return value


def unchanged_test_acc(task: InfluenceTask, recipe: TrainConfig, test: LabeledData, test_name: str) -> float:
    """Accuracy on ``test`` of a retrain on the unchanged training set (cached; independent of the method)."""
    what = {"job": "retrain_unchanged", "recipe": recipe.cache_spec(), "test": test_name}
    return cached_value(task, what, lambda: retrain_test_acc(task, task.train, recipe, test, "retrain (unchanged)"))


# ------------------------------------------------------------------------------------------- data separation

def minority_mask(split: LabeledData, data_name: str) -> Tensor:
    """Bool ``(n,)`` CPU mask of the minority-source rows; data without two sources is a one-line error."""
    if "is_minority" not in split.extra:
        raise UsageError(f"task=separate needs data with two sources (extra['is_minority']); data={data_name} "
                         f"has none; use data=mixed")
    return split.extra["is_minority"].cpu().bool()


def rows_where(split: LabeledData, mask: Tensor) -> LabeledData:
    """The rows of ``split`` where the bool ``mask`` holds (original order)."""
    return split.subset(torch.nonzero(mask.cpu()).squeeze(1).to(split.x.device))


def upweighted(train: LabeledData, rows: Tensor, factor: float) -> LabeledData:
    """``train`` with loss weight ``factor`` on ``rows`` and 1 elsewhere (``LabeledData.weights``)."""
    weights = torch.ones(len(train), dtype=torch.float32)
    weights[rows.cpu()] = float(factor)
    return replace(train, weights=weights.to(train.x.device))
