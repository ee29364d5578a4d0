"""Forgetting events (docs/baselines.md#forgetting-events, Toneva et al. 2019): how often pretraining un-learned a sample.

The counts are a by-product of pretraining (``task.forgetting``: correct -> wrong transitions of the pre-update
train-mode prediction against the noisy label). Samples never predicted correctly have no event; Toneva et al.
rank them as the most forgettable (``never_learned="max"``: score = max count + 1, our default), the authors
left them at 0 (``never_learned="zero"``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData

__all__ = ["Forgetting", "NEVER_LEARNED"]

NEVER_LEARNED = ("max", "zero")
_SALT_TIES = 8_001  # the tie-break noise stream


@register("forgetting")
class Forgetting(Attributor):
    """Forgetting-event counts from the pretraining log; higher = forgotten more often (or never learned).

    Args:
        never_learned: ``max`` = max count + 1 (Toneva et al.), ``zero`` = 0 (the authors).
        tie_break: width of the uniform noise U(0, tie_break) added to break ties among equal counts (the
            authors' pruning uses 0.5); 0 = off. Must be < 1 so that it never reorders different counts.
    """

    def __init__(self, never_learned: str = "max", tie_break: float = 0.0):
        if never_learned not in NEVER_LEARNED:
            raise MethodError(f"forgetting.never_learned={never_learned!r} is unknown; valid choices: "
                              f"{list(NEVER_LEARNED)}")
        if not 0.0 <= tie_break < 1.0:
            raise MethodError(f"forgetting.tie_break={tie_break} must lie in [0, 1) (0 = off; authors' pruning: 0.5)")
        self.never_learned, self.tie_break = never_learned, tie_break
        self.scores_: Tensor | None = None

    def fit(self, task: InfluenceTask) -> "Forgetting":
        """Turn the pretraining log into one score per training sample (no training here)."""
        if task.forgetting is None:
            raise MethodError("forgetting needs task.forgetting (the pretraining log), which is None; pretrain "
                              "through gex.pipeline.pretrained_task")
        if self.never_learned == "max" and task.never_learned is None:
            raise MethodError("forgetting.never_learned='max' needs task.never_learned, which is None; "
                              "use never_learned='zero'")
        super().fit(task)
        counts = task.forgetting.detach().cpu().double()
        if len(counts) != len(task.train):
            raise MethodError(f"task.forgetting has {len(counts)} entries but task.train has {len(task.train)}")
        if self.never_learned == "max":
            never = task.never_learned.detach().cpu().bool()
            counts = torch.where(never, counts.max() + 1, counts)
        if self.tie_break > 0:
            counts = counts + self.tie_break * torch.rand(len(counts), generator=task.generator(_SALT_TIES),
                                                          dtype=torch.float64)
        self.scores_ = counts
        return self

    def self_influence(self, data: LabeledData) -> Tensor:
        """Score of each sample of ``data`` (which must be training samples), float64 ``(n,)``."""
        task = self._require_fit()
        return self.scores_[task.train_rows(data, self.name)]
