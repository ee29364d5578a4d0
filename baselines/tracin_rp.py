"""TracInRP (docs/baselines.md#tracin-and-tracinrp): TracIn through ONE Gaussian projection shared by all trajectory checkpoints.

``I(z, z') = sum_c w_c (1/d) sum_k (g_c(z) . v_k)(g_c(z') . v_k)`` with ``v_k`` the rows of a d x P
standard-Gaussian matrix (d = 20 as the authors), ``g_c`` the gradient of a sample's eval-mode loss (the
checkpoint's BN statistics, un-augmented, no weight decay) at checkpoint ``c``. ``weighting="mean"`` (default,
the authors: ``w_c = 1/C``, no learning rates) or ``"lr"`` (TracInCP's learning-rate weights). As d grows the
score tends to ``tracin`` with the same weighting.

Deviation (docs/official_code.md#11-sum-versus-mean-over-projections): the authors' cross-influence sums over k while self-influence averages; both average
here. The authors' V comes from ``PRNGKey(42)``; ours from ``seed`` (default: the run seed).
"""
from __future__ import annotations

import torch
from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData
from gex.params import num_params
from gex.projection import (
    WEIGHTINGS,
    GaussianProjector,
    project_trajectory,
    trajectory_weights,
)
from gex.train import clone_model

__all__ = ["TracInRP"]


@register("tracin_rp")
class TracInRP(Attributor):
    """Checkpoint-weighted, projected gradient dot products.

    Args:
        dim: d, projection directions (the paper: 20).
        weighting: ``mean`` (the authors) or ``lr``.
        seed: fixes V; None = the task's run seed.
        chunk_size: samples per per-sample-gradient chunk (does not change the scores).
        max_block_mb: memory budget of one block of V's rows.
    """

    def __init__(self, dim: int = 20, weighting: str = "mean", seed: int | None = None, chunk_size: int = 256,
                 max_block_mb: float = 256.0):
        if weighting not in WEIGHTINGS:
            raise MethodError(f"tracin_rp.weighting={weighting!r} is unknown; valid choices: {list(WEIGHTINGS)}")
        for key, value in (("dim", dim), ("chunk_size", chunk_size)):
            if value < 1:
                raise MethodError(f"tracin_rp.{key} must be >= 1, got {value}")
        if max_block_mb <= 0:
            raise MethodError(f"tracin_rp.max_block_mb must be positive, got {max_block_mb}")
        self.dim, self.weighting, self.seed = dim, weighting, seed
        self.chunk_size, self.max_block_mb = chunk_size, max_block_mb
        self.weights_: Tensor | None = None

    def fit(self, task: InfluenceTask) -> "TracInRP":
        """Read the checkpoint weights and fix V (drawn lazily, block by block)."""
        super().fit(task)
        try:
            weights = trajectory_weights([c.lr for c in task.trajectory], self.weighting)
        except ValueError as err:
            raise MethodError(f"tracin_rp: {err}") from None
        self.weights_ = torch.tensor(weights, dtype=torch.float64)
        seed = task.seed if self.seed is None else self.seed
        self.projector_ = GaussianProjector(num_params(task.model), self.dim, seed, task.device,
                                            max_block_mb=self.max_block_mb)
        self._container = clone_model(task.model)
        return self

    def projections(self, data: LabeledData) -> Tensor:
        """``p^c_ik = g_c(z_i) . v_k``, ``(C, n, d)`` on CPU."""
        task = self._require_fit()
        states = [c.state for c in task.trajectory]
        return project_trajectory(self._container, states, data, self.projector_, task.loss, self.chunk_size)

    def self_influence(self, data: LabeledData) -> Tensor:
        """``sum_c w_c (1/d) sum_k (p^c_ik)^2``, ``(n,)``."""
        p = self.projections(data)
        return torch.einsum("c,cn->n", self.weights_.to(p), p.pow(2).mean(2))

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """``sum_c w_c (1/d) sum_k p^c_ik p^c_jk``, ``(n_train, n_test)``; positive = proponent."""
        a, b = self.projections(train), self.projections(test)
        return torch.einsum("c,cik,cjk->ij", self.weights_.to(a), a, b) / self.dim
