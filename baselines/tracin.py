"""TracInCP (Pruthi et al. 2020) with exact per-sample gradients over the trajectory checkpoints (docs/baselines.md#tracin-and-tracinrp).

``I(z, z') = sum_c w_c g_c(z) . g_c(z')`` with ``g_c`` the gradient of a sample's eval-mode loss (the
checkpoint's BN running statistics, un-augmented, no weight decay) at checkpoint ``c``; self-influence
``sum_c w_c ||g_c(z)||^2``. ``weighting="lr"`` takes ``w_c`` = the learning rate in force at checkpoint ``c``
(TracInCP); ``"mean"`` takes ``w_c = 1/C`` (the authors' unweighted mean). Positive pairwise = proponent.

Deviation: the authors' ``tracin`` ignores cross-influence; here it is the same sum over pairs.
"""
from __future__ import annotations

from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData
from gex.projection import (
    WEIGHTINGS,
    gradient_cross_products,
    gradient_self_products,
    trajectory_weights,
    using_state,
)
from gex.train import clone_model

__all__ = ["TracIn"]


@register("tracin")
class TracIn(Attributor):
    """Checkpoint-weighted sums of exact per-sample gradient dot products.

    Args:
        weighting: ``lr`` (TracInCP, the default) or ``mean`` (the authors' unweighted mean).
        chunk_size: samples per per-sample-gradient chunk (does not change the scores).
    """

    def __init__(self, weighting: str = "lr", chunk_size: int = 256):
        if weighting not in WEIGHTINGS:
            raise MethodError(f"tracin.weighting={weighting!r} is unknown; valid choices: {list(WEIGHTINGS)}")
        if chunk_size < 1:
            raise MethodError(f"tracin.chunk_size must be >= 1, got {chunk_size}")
        self.weighting, self.chunk_size = weighting, chunk_size
        self.weights_: list[float] = []

    def fit(self, task: InfluenceTask) -> "TracIn":
        """Read the checkpoint weights; a private copy of the model hosts each checkpoint in turn."""
        super().fit(task)
        try:
            self.weights_ = trajectory_weights([c.lr for c in task.trajectory], self.weighting)
        except ValueError as err:
            raise MethodError(f"tracin: {err}") from None
        self._container = clone_model(task.model)
        return self

    def self_influence(self, data: LabeledData) -> Tensor:
        """``sum_c w_c ||g_c(z_i)||^2``, ``(n,)``."""
        task = self._require_fit()
        total = 0.0
        for ckpt, w in zip(task.trajectory, self.weights_):
            with using_state(self._container, ckpt.state) as model:
                total = total + w * gradient_self_products(model, data, task.loss, self.chunk_size)
        return total

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """``sum_c w_c g_c(train) . g_c(test)``, ``(n_train, n_test)``; positive = proponent."""
        task = self._require_fit()
        total = 0.0
        for ckpt, w in zip(task.trajectory, self.weights_):
            with using_state(self._container, ckpt.state) as model:
                total = total + w * gradient_cross_products(model, train, test, task.loss, self.chunk_size)
        return total
