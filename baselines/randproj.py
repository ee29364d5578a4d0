"""Random projection with H ~ I (docs/baselines.md#random-projection): ``I(z, z') = (1/d) sum_k (g_z . v_k)(g_z' . v_k)``.

``v_k`` are the rows of one d x P standard-Gaussian matrix (d = 20 as the authors), so the score is an unbiased
estimate of ``g_z . g_z'`` (``grad_dot``); ``g`` is the gradient of a sample's eval-mode loss (BN running
statistics, un-augmented, no weight decay) at theta*. Projections come from streamed per-sample gradients
(``gex.projection``), equal to the authors' JVPs.

Deviation (docs/official_code.md#11-sum-versus-mean-over-projections): the authors' cross-influence *sums* over k while their self-influence averages; here
both average, so pairwise is consistent with self-influence (its diagonal equals it). The authors' V is fixed by
``PRNGKey(42)``; ours by ``seed`` (default: the run seed).
"""
from __future__ import annotations

from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData
from gex.params import num_params
from gex.projection import GaussianProjector, project_gradients

__all__ = ["RandProj"]


@register("randproj")
class RandProj(Attributor):
    """Identity-Hessian influence through a Gaussian projection at theta*.

    Args:
        dim: d, projection directions (the paper: 20).
        seed: fixes V; None = the task's run seed.
        chunk_size: samples per per-sample-gradient chunk (does not change the scores).
        max_block_mb: memory budget of one block of V's rows (V is regenerated block by block when larger).
    """

    def __init__(self, dim: int = 20, seed: int | None = None, chunk_size: int = 256, max_block_mb: float = 256.0):
        for key, value in (("dim", dim), ("chunk_size", chunk_size)):
            if value < 1:
                raise MethodError(f"randproj.{key} must be >= 1, got {value}")
        if max_block_mb <= 0:
            raise MethodError(f"randproj.max_block_mb must be positive, got {max_block_mb}")
        self.dim, self.seed, self.chunk_size, self.max_block_mb = dim, seed, chunk_size, max_block_mb
        self.projector_: GaussianProjector | None = None

    def fit(self, task: InfluenceTask) -> "RandProj":
        """Fix V (drawn lazily, block by block)."""
        super().fit(task)
        seed = task.seed if self.seed is None else self.seed
        self.projector_ = GaussianProjector(num_params(task.model), self.dim, seed, task.device,
                                            max_block_mb=self.max_block_mb)
        return self

    def projections(self, data: LabeledData) -> Tensor:
        """``p_ik = g_i . v_k``, ``(n, d)`` on CPU."""
        task = self._require_fit()
        return project_gradients(task.model, data, self.projector_, task.loss, self.chunk_size)

    def self_influence(self, data: LabeledData) -> Tensor:
        """``(1/d) sum_k p_ik^2`` (unbiased for ``||g_i||^2``), ``(n,)``."""
        return self.projections(data).pow(2).mean(1)

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """``(1/d) sum_k p_ik p_jk``, ``(n_train, n_test)``; positive = proponent."""
        return self.projections(train) @ self.projections(test).T / self.dim
