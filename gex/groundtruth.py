"""Ground truth for pairwise influence by retraining: leave-one-out (LOO) and the linear datamodeling score (LDS).

Retraining (``SGDRetrainer``): every model starts from theta*'s own initialization (``task.fresh_model()``) and
follows the recipe, with one difference from ``gex.train.train`` made on purpose: the data order is the *full*
training set's shuffled order (the same generator as ``train``) with the removed samples filtered out. So a
retrain on every row with the pretraining seed reproduces theta*'s weights exactly, and a LOO retrain sees the
same sequence minus one sample: batches before the sample's position are identical, the later batches of that
epoch shift by one sample (their composition changes), and every epoch starts aligned again. Retrain seeds
change the data order only (never the init). BN statistics are set exactly over the kept rows in one batch
(``exact_bn``; off = the recipe's randomized refresh, which adds noise to differences of order 1/n).

SGD amplifies any perturbation, so one retrain's LOO effects are mostly noise (digits + BN MLP: two seeds' LOO
matrices agree with Spearman ~0.1 per test sample). Silencing the removed row's loss term in place, which keeps
every batch as in the full run, was measured to be no less noisy, so the noise is SGD's own rather than the
batch shift's. Average several retrain seeds and read ``seed_agreement`` (the ceiling any method can reach).

Outcomes of a retrain (``test_loss``, ``test_margin`` ``(n_test,)``, ``train_loss`` ``(n_train,)``) are one
artefact each in ``cache`` (kind ``groundtruth``), keyed by the retrainer's spec (theta*'s pretrain spec, the
recipe), the hash of the rows trained on and the retrain seed; a killed run resumes, and ``shard_jobs`` splits the
work into disjoint parts that separate processes train into the shared cache.

Signs (matching ``gex.attribution``: influence positive = the train sample lowers the test loss):
- LOO: ``measured[i, j] = l_j(theta_-i) - l_j(theta)`` (averaged over retrain seeds, paired by seed); positive
  when removing i hurts test sample j, i.e. i is a proponent, so a good method correlates positively.
- LDS (TRAK, dattri): for each test sample j, the Spearman correlation across subsets S between the additive
  prediction and the measured outcome of the model trained on S. For the loss outcome the prediction is
  ``-sum_{i in S} I(i, j)`` (proponents lower the loss); for the margin outcome (``logit_y - logsumexp`` of the
  other logits, which rises with proponents) it is ``+sum``. With softmax cross-entropy the margin is a strictly
  decreasing function of the loss (``margin = -log(exp(loss) - 1)``), so both give the same LDS there.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from gex.attribution import InfluenceTask
from gex.data import Batch, LabeledData, iter_batches
from gex.losses import per_sample_loss
from gex.runs import ArtifactCache, atomic_save, load_artifact
from gex.train import TrainConfig, eval_logits, sgd_steps, update_bn
from gex.utils import progress

__all__ = ["OUTCOMES", "CACHE_KIND", "Retrainer", "SGDRetrainer", "RetrainJob", "margins", "filtered_stream",
           "choose_rows", "subset_masks", "rows_hash", "retrain_seeds", "loo_jobs", "subset_jobs", "shard_jobs",
           "collect_outcomes", "measure_loo", "measure_subsets", "column_corr", "loo_correlations",
           "seed_agreement", "lds_per_test", "bootstrap_ci", "lds_summary"]

log = logging.getLogger(__name__)

OUTCOMES = ("loss", "margin")   # what LDS correlates with: test loss (prediction -sum I) or margin (+sum I)
CACHE_KIND = "groundtruth"
SEED_SALT = 0x6D7               # retrain seeds k >= 1 come from this stream of the run seed
BN_GEN_OFFSET = 1_000_003       # the BN-refresh generator's offset from the retrain seed (as gex.train.train)


class Retrainer(Protocol):
    """Trains a model on some training rows and returns its outcomes (float64 CPU tensors)."""

    def spec(self) -> dict[str, Any]:
        """What determines every retrain besides its rows and seed (keys the cache)."""

    def __call__(self, rows: Tensor, seed: int) -> dict[str, Tensor]:
        """Outcomes of a model trained on ``rows`` with retrain seed ``seed``: at least ``test_loss``
        ``(n_test,)``, ``test_margin`` ``(n_test,)`` and ``train_loss`` ``(n_train,)``."""


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """``logit_y - logsumexp_{k != y} logit_k`` = ``log p_y / (1 - p_y)`` under softmax, shape ``(n,)``."""
    y = y.long()[:, None]
    correct = logits.gather(1, y).squeeze(1)
    return correct - logits.scatter(1, y, -math.inf).logsumexp(1)


def filtered_stream(data: LabeledData, rows: Tensor, batch_size: int, augment: bool, seed: int,
                    device: torch.device) -> Iterator[Batch]:
    """Endless train view of ``data.subset(rows)`` in the *full* data's shuffled order, rows not kept skipped.

    Each epoch draws ``randperm(len(data))`` from one generator seeded by ``seed`` (as ``gex.train.batch_stream``
    does), keeps the rows in ``rows`` and cuts that sequence into batches; with every row kept the stream equals
    ``train``'s exactly (augmentation draws come from the same generator, so they match only then).
    """
    keep = torch.zeros(len(data), dtype=torch.bool)
    keep[rows.cpu()] = True
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=generator)
        order = order[keep[order]]
        yield from iter_batches(data.subset(order.to(data.x.device)), batch_size, augment=augment,
                                generator=generator, device=device)


class SGDRetrainer:
    """Retrain theta*'s architecture from theta*'s own init on some rows (see the module docstring).

    Args:
        task: theta*'s task (its ``make_model``, data, loss, device and ``cache_spec``).
        recipe: the retrain recipe (``task.recipe``, or a shortened one); the schedule is sized to the rows kept.
        exact_bn: BN statistics over all kept rows in one batch (deterministic); False = the recipe's refresh.
    """

    def __init__(self, task: InfluenceTask, recipe: TrainConfig, exact_bn: bool = True):
        self.task, self.recipe, self.exact_bn = task, recipe, bool(exact_bn)

    def spec(self) -> dict[str, Any]:
        return {"pretrain": self.task.cache_spec, "recipe": self.recipe.cache_spec(), "exact_bn": self.exact_bn,
                "loss": self.task.loss, "order": "full_permutation_filtered"}

    def train_model(self, rows: Tensor, seed: int) -> torch.nn.Module:
        """A fresh model (theta*'s init) trained on ``rows``; eval mode, BN statistics set."""
        task, recipe = self.task, self.recipe
        model = task.fresh_model()
        stream = filtered_stream(task.train, rows, recipe.batch_size, recipe.augment, seed, task.device)
        sgd_steps(model, stream, recipe.total_steps(len(rows)), recipe, desc="retrain")
        kept = task.train.subset(rows.to(task.train.x.device))
        bn_cfg = replace(recipe, batch_size=len(rows), bn_batches=1, augment=False) if self.exact_bn else recipe
        update_bn(model, kept, bn_cfg, torch.Generator().manual_seed(seed + BN_GEN_OFFSET), task.device)
        return model

    def __call__(self, rows: Tensor, seed: int) -> dict[str, Tensor]:
        model = self.train_model(rows, seed)
        out = {}
        for split, data in (("test", self.task.test), ("train", self.task.train)):
            logits, y = eval_logits(model, data).double(), data.y.cpu()
            out[f"{split}_loss"] = per_sample_loss(logits, y, self.task.loss)
            out[f"{split}_margin"] = margins(logits, y)
        return out


# --------------------------------------------------------------------------------------------- which retrains

def choose_rows(n: int, k: int, seed: int, what: str = "rows") -> Tensor:
    """``k`` distinct rows of ``n`` drawn by ``seed``, ascending long ``(k,)``.

    Raises:
        ValueError: ``k`` outside ``[1, n]``.
    """
    if not 1 <= k <= n:
        raise ValueError(f"{what}={k} must lie in [1, {n}] (the number of samples available)")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def subset_masks(n: int, count: int, alpha: float, seed: int) -> Tensor:
    """``count`` random subsets of exactly ``round(alpha * n)`` of ``n`` rows, bool ``(count, n)`` (seeded).

    Raises:
        ValueError: alpha outside (0, 1), a subset size of 0 or n, or count < 2.
    """
    size = int(round(alpha * n))
    if not 0.0 < alpha < 1.0 or not 0 < size < n:
        raise ValueError(f"task.alpha={alpha} must lie in (0, 1) and keep between 1 and {n - 1} of {n} rows")
    if count < 2:
        raise ValueError(f"task.n_subsets={count} must be >= 2 (LDS correlates across subsets)")
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, n, dtype=torch.bool)
    for s in range(count):
        masks[s, torch.randperm(n, generator=generator)[:size]] = True
    return masks


def rows_hash(rows: Tensor) -> str:
    """16 hex digits identifying a set of rows (order-free)."""
    data = np.ascontiguousarray(rows.detach().cpu().long().sort().values.numpy())
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def retrain_seeds(seed: int, count: int) -> list[int]:
    """``count`` retrain seeds: the run seed first (so the full retrain can replay theta*), then derived ones."""
    if count < 1:
        raise ValueError(f"retrain seeds: count={count} must be >= 1")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + SEED_SALT)
    return [seed] + [int(s) for s in torch.randint(0, 2**31 - 1, (count - 1,), generator=generator)]


@dataclass(frozen=True)
class RetrainJob:
    """One model to train. ``kind``: ``full``, ``loo`` (``ident`` = the removed row) or ``subset``
    (``ident`` = the subset number); ``rows``: the training rows kept."""

    kind: str
    ident: int
    seed: int
    rows: Tensor

    def spec(self, retrainer: Retrainer) -> dict[str, Any]:
        return {"retrainer": retrainer.spec(), "rows": rows_hash(self.rows), "n_rows": len(self.rows),
                "retrain_seed": self.seed}


def loo_jobs(n_train: int, loo_rows: Tensor, seeds: Sequence[int]) -> list[RetrainJob]:
    """The full-data retrain and one retrain without each row of ``loo_rows``, for every seed."""
    every = torch.arange(n_train)
    jobs = [RetrainJob("full", -1, s, every) for s in seeds]
    for row in loo_rows.tolist():
        kept = torch.cat([every[:row], every[row + 1:]])
        jobs += [RetrainJob("loo", row, s, kept) for s in seeds]
    return jobs


def subset_jobs(masks: Tensor, seeds: Sequence[int]) -> list[RetrainJob]:
    """One retrain per subset (row of ``masks`` ``(S, n)``) and seed."""
    return [RetrainJob("subset", s, seed, torch.nonzero(mask).squeeze(1)) for s, mask in enumerate(masks)
            for seed in seeds]


def shard_jobs(jobs: Sequence[RetrainJob], shard: int, num_shards: int) -> list[RetrainJob]:
    """Shard ``shard`` of ``num_shards``: every ``num_shards``-th job (disjoint parts that cover all jobs)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"task.shard={shard} must lie in [0, task.num_shards={num_shards}) and num_shards >= 1")
    return list(jobs[shard::num_shards])


def collect_outcomes(retrainer: Retrainer, jobs: Sequence[RetrainJob], cache: ArtifactCache | None,
                     desc: str = "retrain") -> tuple[list[dict[str, Tensor]], int]:
    """Outcomes of every job, loaded from ``cache`` or trained (and stored at once, so a killed run resumes).

    Returns:
        (outcomes aligned with ``jobs``, number of models trained now).
    """
    outcomes, trained = [], 0
    for job in progress(jobs, desc=desc):
        path = cache.path(CACHE_KIND, job.spec(retrainer), "outcomes") if cache is not None else None
        if path is not None and path.exists():  # loaded quietly: one summary line below, not one per model
            outcomes.append(load_artifact(path, f"{CACHE_KIND} outcomes"))
            continue
        outcome = {k: v.detach().double().cpu() for k, v in retrainer(job.rows, job.seed).items()}
        trained += 1
        if path is not None:
            atomic_save(outcome, path)
        outcomes.append(outcome)
    if trained < len(jobs):
        log.info("%s: reused %d of %d retrained models from the cache", desc, len(jobs) - trained, len(jobs))
    return outcomes, trained


# ----------------------------------------------------------------------------------------------- measurements

def measure_loo(retrainer: Retrainer, n_train: int, loo_rows: Tensor, seeds: Sequence[int], test_rows: Tensor,
                cache: ArtifactCache | None) -> dict[str, Tensor]:
    """Measured LOO effects, trained or loaded.

    Returns:
        ``test`` ``(n_loo, m)``: ``l_j(theta_-i) - l_j(theta)`` on test rows ``test_rows``, mean over seeds;
        ``per_seed`` ``(n_seeds, n_loo, m)``; ``self`` ``(n_loo,)``: the removed sample's own loss change;
        ``trained``: models trained now (0-d).
    """
    jobs = loo_jobs(n_train, loo_rows, seeds)
    outcomes, trained = collect_outcomes(retrainer, jobs, cache, desc="leave-one-out")
    k = len(seeds)
    full, rest = outcomes[:k], outcomes[k:]
    test = torch.stack([torch.stack([rest[r * k + s]["test_loss"] - full[s]["test_loss"] for s in range(k)])
                        for r in range(len(loo_rows))])[..., test_rows]          # (n_loo, k, n_test) -> (n_loo, k, m)
    self_ = torch.stack([torch.stack([rest[r * k + s]["train_loss"][row] - full[s]["train_loss"][row]
                                      for s in range(k)]) for r, row in enumerate(loo_rows.tolist())])
    return {"test": test.mean(1), "per_seed": test.transpose(0, 1), "self": self_.mean(1),
            "trained": torch.tensor(trained)}


def measure_subsets(retrainer: Retrainer, masks: Tensor, seeds: Sequence[int], test_rows: Tensor,
                    cache: ArtifactCache | None, outcome: str = "loss") -> tuple[Tensor, int]:
    """Outcome (``loss`` or ``margin``) of each subset model on ``test_rows`` per seed, ``(S, n_seeds, m)``
    (average over dim 1 for the LDS), and the number of models trained now."""
    if outcome not in OUTCOMES:
        raise ValueError(f"task.outcome={outcome!r} is unknown; valid choices: {list(OUTCOMES)}")
    outcomes, trained = collect_outcomes(retrainer, subset_jobs(masks, seeds), cache, desc="subsets")
    values = torch.stack([o[f"test_{outcome}"][test_rows] for o in outcomes])
    return values.view(len(masks), len(seeds), -1), trained


# ------------------------------------------------------------------------------------------------ correlations

def _ranks(x: Tensor) -> Tensor:
    return torch.from_numpy(rankdata(x.double().cpu().numpy(), axis=0))  # ties get their average rank


def column_corr(a: Tensor, b: Tensor, rank: bool = False) -> Tensor:
    """Pearson (or Spearman with ``rank``) correlation of each column of ``a`` with that of ``b``, ``(m,)``.

    Args:
        a, b: ``(n, m)`` (a 1-D input is one column). A constant column gives NaN.
    """
    a, b = (a.double().cpu().reshape(len(a), -1), b.double().cpu().reshape(len(b), -1))
    if a.shape != b.shape:
        raise ValueError(f"column_corr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if rank:
        a, b = _ranks(a), _ranks(b)
    a, b = a - a.mean(0), b - b.mean(0)
    denom = (a.norm(dim=0) * b.norm(dim=0))
    return torch.where(denom > 0, (a * b).sum(0) / denom.clamp_min(1e-300), torch.tensor(math.nan))


def loo_correlations(predicted: Tensor, measured: Tensor) -> dict[str, float]:
    """Agreement of predicted pairwise influence with measured LOO effects, both ``(n_loo, m)``.

    Returns:
        ``loo_spearman``, ``loo_pearson`` over all (i, j) pairs; ``loo_spearman_per_test``,
        ``loo_pearson_per_test``: the mean over test samples of the correlation across the n_loo train rows.
    """
    flat_p, flat_m = predicted.reshape(-1), measured.reshape(-1)
    return {"loo_spearman": float(column_corr(flat_p, flat_m, rank=True)[0]),
            "loo_pearson": float(column_corr(flat_p, flat_m)[0]),
            "loo_spearman_per_test": float(column_corr(predicted, measured, rank=True).nanmean()),
            "loo_pearson_per_test": float(column_corr(predicted, measured).nanmean())}


def seed_agreement(per_seed: Tensor) -> dict[str, float]:
    """How reproducible a retrained measurement is across retrain seeds (its noise ceiling).

    Args:
        per_seed: ``(k, n, m)``, one measurement per seed: LOO effects ``(k, n_loo, m)`` or subset outcomes
            ``(k, S, m)``.

    Returns:
        ``seed_spearman``: Spearman between two seeds over all entries, mean over seed pairs;
        ``seed_spearman_per_test``: the same per column (test sample), mean over columns and pairs (r);
        ``reliability_per_test``: Spearman-Brown reliability of the k-seed mean, ``k r / (1 + (k - 1) r)``.
        All NaN when k < 2.
    """
    k = len(per_seed)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    if not pairs:
        return {"seed_spearman": math.nan, "seed_spearman_per_test": math.nan, "reliability_per_test": math.nan}
    flat = sum(float(column_corr(per_seed[a].reshape(-1), per_seed[b].reshape(-1), rank=True)[0])
               for a, b in pairs) / len(pairs)
    r = sum(float(column_corr(per_seed[a], per_seed[b], rank=True).nanmean()) for a, b in pairs) / len(pairs)
    return {"seed_spearman": flat, "seed_spearman_per_test": r, "reliability_per_test": k * r / (1 + (k - 1) * r)}


def lds_per_test(influence: Tensor, masks: Tensor, outcomes: Tensor, outcome: str = "loss") -> Tensor:
    """Linear datamodeling score of each test sample, ``(m,)`` (NaN where a column is constant).

    Args:
        influence: ``(n_train, m)`` pairwise influence (positive = lowers the test loss).
        masks: bool ``(S, n_train)`` subset membership.
        outcomes: ``(S, m)`` measured test loss (``loss``) or margin (``margin``) of each subset model.
        outcome: which outcome; fixes the prediction's sign (``-sum`` for the loss, ``+sum`` for the margin).
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"task.outcome={outcome!r} is unknown; valid choices: {list(OUTCOMES)}")
    sign = -1.0 if outcome == "loss" else 1.0
    predicted = sign * (masks.double().cpu() @ influence.double().cpu())
    return column_corr(predicted, outcomes, rank=True)


def bootstrap_ci(values: Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the finite ``values`` and its percentile bootstrap interval (resampling the values).

    Raises:
        ValueError: ``level`` outside (0, 1) or ``n_boot`` < 1.
    """
    if not 0.0 < level < 1.0 or n_boot < 1:
        raise ValueError(f"bootstrap: need 0 < task.ci_level < 1 and task.n_bootstrap >= 1, got {level}, {n_boot}")
    x = values.double().cpu().numpy()
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(x.mean()), float(low), float(high)


def lds_summary(per_test: Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``lds`` (mean over test samples), ``lds_ci_low``, ``lds_ci_high`` (bootstrap over test samples)."""
    mean, low, high = bootstrap_ci(per_test, n_boot, level, seed)
    return {"lds": mean, "lds_ci_low": low, "lds_ci_high": high}
