"""Ranking quality shared by every layer: AUROC and average precision of scores against a bool label.

Higher score = more likely positive (for detection: more likely mislabeled). Callers decide what a label set with
a single class means for them (``experiments.metrics`` refuses it; a benchmark row records NaN).
"""
from __future__ import annotations

from torch import Tensor

__all__ = ["auroc_ap"]


def auroc_ap(scores: Tensor, positive: Tensor) -> tuple[float, float]:
    """``(AUROC, AP)`` (scikit-learn) of ``scores`` against bool ``positive``; ``(nan, nan)`` with a single class."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    pos = positive.detach().cpu().numpy().astype(bool)
    if pos.all() or not pos.any():
        return float("nan"), float("nan")
    values = scores.detach().double().cpu().numpy()
    return float(roc_auc_score(pos, values)), float(average_precision_score(pos, values))
