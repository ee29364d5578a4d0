"""Area under the margin (docs/baselines.md#aum, Pleiss et al. 2020): mislabeled samples keep a low, often negative
margin through training, while the network fits clean ones early.

The margins are a by-product of pretraining (``task.aum``: each sample's pre-update train-mode margin, its assigned
label's logit minus the largest other logit, averaged over every step that saw it). The score is ``-AUM``, so that
higher = more likely mislabeled, as every self-influence here. Pleiss et al. also calibrate a flagging threshold
with extra "threshold samples" given a fake class, which needs its own training run; the ranking, which is all
AUROC / AP measure, does not depend on it, so it is not implemented.
"""
from __future__ import annotations

from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData

__all__ = ["AUM"]


@register("aum")
class AUM(Attributor):
    """``-AUM`` from the pretraining log; higher = lower margin during training = more likely mislabeled."""

    def fit(self, task: InfluenceTask) -> "AUM":
        """Read the margins recorded during pretraining (no training here)."""
        if task.aum is None:
            raise MethodError("aum needs the margins recorded during pretraining (task.aum), which are None: this "
                              "theta* was not trained by gex.pipeline.pretrained_task, or was cached before margins "
                              "were recorded (use a new paths.cache)")
        if len(task.aum) != len(task.train):
            raise MethodError(f"task.aum has {len(task.aum)} entries but task.train has {len(task.train)}")
        super().fit(task)
        return self

    def self_influence(self, data: LabeledData) -> Tensor:
        """``-AUM`` of each sample of ``data`` (which must be training samples), float64 ``(n,)``."""
        task = self._require_fit()
        return -task.aum.detach().cpu().double()[task.train_rows(data, self.name)]
