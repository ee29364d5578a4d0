"""Rankings and the metrics every task records: score checks, seeded rankings, AUROC / AP, found-at-k, the
memorized / never-fit split, flag precision and recall, accuracy.

Sign conventions follow ``gex.attribution``: self-influence higher = more influential; pairwise influence
positive = the training sample lowers the test loss (a proponent). Rankings put the highest score first and break
ties with a seeded U(0, 0.5) secondary key (the authors' tie-break for integer scores), so equal scores are
ordered deterministically and without favouring low indices.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from experiments.scaffold import UsageError
from gex.attribution import MethodError
from gex.data import LabeledData
from gex.ranking import auroc_ap
from gex.train import eval_logits

__all__ = ["SCORE_KINDS", "FOUND_AT_PCTS", "check_scores", "ranking_order", "ranking_metrics", "found_at",
           "detection_metrics", "detection_by_fit", "flag_metrics", "accuracy"]

SCORE_KINDS = ("self", "cross")  # self-influence, or influence on the mean test loss
FOUND_AT_PCTS = (5, 10, 20)   # found_at_<pct>: share of noisy samples among the top pct% of the ranking

TIE_SALT = 0x71E              # separates the tie-break stream from every other seeded stream


def check_scores(scores: Tensor, n: int, what: str, method: str) -> Tensor:
    """Scores as float64 CPU ``(n,)``; a wrong shape or a non-finite value is a one-line ``MethodError``."""
    scores = scores.detach().double().cpu().reshape(-1)
    if scores.numel() != n:
        raise MethodError(f"method={method} returned {scores.numel()} {what} scores for {n} samples")
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise MethodError(f"method={method} returned {bad} non-finite {what} scores of {n}")
    return scores


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
    """``auroc`` and ``ap`` (``gex.ranking.auroc_ap``) of ``scores`` (higher = more likely positive) against bool
    ``positive``; a single class is a ``UsageError``."""
    _two_classes(positive, what)
    auroc, ap = auroc_ap(scores, positive)
    return {"auroc": auroc, "ap": ap}


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


def flag_metrics(flags: Tensor, is_noisy: Tensor) -> dict[str, float]:
    """``flag_precision`` (NaN when nothing is flagged), ``flag_recall`` (NaN without noisy samples), ``n_flagged``."""
    flags, noisy = flags.cpu().bool(), is_noisy.cpu().bool()
    hit = float((flags & noisy).sum())
    return {"flag_precision": hit / float(flags.sum()) if flags.any() else float("nan"),
            "flag_recall": hit / float(noisy.sum()) if noisy.any() else float("nan"), "n_flagged": int(flags.sum())}


def accuracy(model: torch.nn.Module, test: LabeledData) -> float:
    """Accuracy of ``model`` on ``test`` (eval mode)."""
    pred = eval_logits(model, test).argmax(-1)
    return float((pred == test.y.cpu()).double().mean())
