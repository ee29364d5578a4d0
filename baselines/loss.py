"""Training loss at theta* (docs/decisions.md#what-the-cpu-pilot-taught-us): the trivial baseline every method must beat.

A mislabeled sample that the model has not memorized has a high loss on its noisy label; once memorized (as the
paper's long pretraining does, docs/decisions.md#what-the-cpu-pilot-taught-us) the loss no longer separates it, which is what influence methods are for.
"""
from __future__ import annotations

from torch import Tensor

from gex.attribution import Attributor, MethodError, register
from gex.data import LabeledData
from gex.evaluation import per_sample_losses

__all__ = ["Loss"]


@register("loss")
class Loss(Attributor):
    """Eval-mode per-sample loss at theta* with the label trained on; higher = worse fitted.

    Args:
        batch_size: samples per forward pass (does not change the scores).
    """

    def __init__(self, batch_size: int = 1024):
        if batch_size < 1:
            raise MethodError(f"loss.batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def self_influence(self, data: LabeledData) -> Tensor:
        """``loss(f(x_i; theta*), y_i)`` in eval mode, un-augmented, ``(n,)``."""
        task = self._require_fit()
        return per_sample_losses(task.model, data, task.loss, self.batch_size)
