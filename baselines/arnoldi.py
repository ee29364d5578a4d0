"""Arnoldi influence (Schioppa et al. 2022; the authors' ``arnoldi``, docs/baselines.md#arnoldi).

Fit: ``n_iter`` Arnoldi iterations (``n_iter - 1`` Hessian-vector products, full Gram-Schmidt) on the Hessian of
the mean eval-mode training loss at theta*, from a seeded random unit vector; distill (tridiagonal band,
symmetrize, ``eigh``) and keep the ``top_k`` largest eigenvalues ``lambda_k`` with Ritz vectors ``u_k``.
Scores, with ``g`` the gradient of a sample's eval-mode loss (BN running statistics, un-augmented, no weight
decay) at theta*:
- self-influence ``sum_k (g . u_k)^2 / (lambda_k + damping)``;
- pairwise ``sum_k (g_train . u_k)(g_test . u_k) / (lambda_k + damping)`` (positive = proponent).

Both **sum** over k, so that with every eigenpair kept the score is ``g^T (H + damping I)^-1 g`` (``if_exact``);
the authors' self-influence averages over k (a constant factor: same ranking) while their cross-influence sums
(docs/official_code.md#11-sum-versus-mean-over-projections). Pairs with ``lambda_k + damping <= 0`` are dropped with a warning (the authors got NaN).
``hvp_data="full"`` (default) uses the exact full-train Hessian; ``"minibatch"`` uses a fresh seeded mini-batch
per product as the authors (``augment=True`` for their augmented stream). ``damping`` is 0 as the authors.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData
from gex.ihvp import arnoldi_iteration, distill, hvp
from gex.params import num_params
from gex.projection import MatrixProjector, project_gradients
from gex.train import batch_stream

__all__ = ["Arnoldi"]

HVP_DATA = ("full", "minibatch")


@register("arnoldi")
class Arnoldi(Attributor):
    """Inverse-Hessian influence restricted to the top-k Ritz pairs of an Arnoldi run.

    Args:
        n_iter: Arnoldi basis size (the paper: 50; ``n_iter - 1`` HVPs).
        top_k: eigenpairs kept (the paper: 20).
        damping: added to each kept eigenvalue (0 as the authors).
        hvp_data: ``full`` (exact Hessian of the mean training loss) or ``minibatch`` (the authors).
        hvp_batch_size: mini-batch size for ``minibatch`` (and samples per forward pass for ``full``).
        augment: ``minibatch`` draws from the augmented train view.
        seed: fixes the start vector and mini-batches; None = the task's run seed.
        chunk_size: samples per per-sample-gradient chunk (does not change the scores).
    """

    def __init__(self, n_iter: int = 30, top_k: int = 10, damping: float = 0.0, hvp_data: str = "full",
                 hvp_batch_size: int = 1024, augment: bool = False, seed: int | None = None,
                 chunk_size: int = 256):
        if hvp_data not in HVP_DATA:
            raise MethodError(f"arnoldi.hvp_data={hvp_data!r} is unknown; valid choices: {list(HVP_DATA)}")
        if n_iter < 2 or top_k < 1 or damping < 0:
            raise MethodError(f"arnoldi needs n_iter >= 2, top_k >= 1, damping >= 0; got n_iter={n_iter}, "
                              f"top_k={top_k}, damping={damping}")
        for key, value in (("hvp_batch_size", hvp_batch_size), ("chunk_size", chunk_size)):
            if value < 1:
                raise MethodError(f"arnoldi.{key} must be >= 1, got {value}")
        self.n_iter, self.top_k, self.damping, self.hvp_data = n_iter, top_k, damping, hvp_data
        self.hvp_batch_size, self.augment, self.seed, self.chunk_size = hvp_batch_size, augment, seed, chunk_size
        self.eigenvalues_: Tensor | None = None

    def _spec(self, task: InfluenceTask) -> dict:
        keys = ("n_iter", "top_k", "hvp_data", "hvp_batch_size", "augment")
        return {"pretrain": task.cache_spec, "loss": task.loss, "method": self.name,
                "seed": task.seed if self.seed is None else self.seed, **{k: getattr(self, k) for k in keys}}

    def _operator(self, task: InfluenceTask, gen: torch.Generator):
        """``v -> H v``: full training set, or a fresh mini-batch of the seeded train view per call."""
        if self.hvp_data == "full":
            return lambda v: hvp(task.model, task.train, v, task.loss, self.hvp_batch_size)
        stream = batch_stream(task.train, self.hvp_batch_size, self.augment, gen, task.device)

        def op(v: Tensor) -> Tensor:
            batch = next(stream)
            data = replace(task.train.subset(batch.rows.to(task.train.x.device)), x=batch.x)
            return hvp(task.model, data, v, task.loss, self.hvp_batch_size)
        return op

    def _ritz(self, task: InfluenceTask) -> dict[str, Tensor]:
        seed = task.seed if self.seed is None else self.seed
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7)
        dtype = next(task.model.parameters()).dtype
        start = torch.randn(num_params(task.model), generator=gen, dtype=dtype).to(task.device)
        basis, hess = arnoldi_iteration(self._operator(task, gen), start, self.n_iter)
        values, vectors = distill(basis, hess, self.top_k)
        return {"eigenvalues": values.cpu(), "vectors": vectors.cpu()}

    def fit(self, task: InfluenceTask) -> "Arnoldi":
        """Run (or load from ``task.cache``) the Arnoldi iteration and keep the usable top-k Ritz pairs."""
        super().fit(task)
        cached = task.cache.load("arnoldi", self._spec(task), "ritz") if task.cache is not None else None
        if cached is None:
            cached = self._ritz(task)
            if task.cache is not None:
                task.cache.save("arnoldi", self._spec(task), "ritz", cached)
        values, vectors = cached["eigenvalues"], cached["vectors"]
        keep = values + self.damping > 0
        if not bool(keep.all()):
            warnings.warn(f"arnoldi: dropped {int((~keep).sum())} of {len(values)} Ritz pairs with "
                          f"eigenvalue + damping <= 0 (smallest {float(values.min()):.3g})", stacklevel=2)
        if not bool(keep.any()):
            raise MethodError("arnoldi: no Ritz pair has eigenvalue + damping > 0; raise damping or top_k")
        self.eigenvalues_ = values[keep]
        # Scaling by 1/sqrt(lambda + damping) turns both scores into plain dot products of the projections.
        scaled = vectors[keep] / (self.eigenvalues_ + self.damping).sqrt()[:, None]
        self.projector_ = MatrixProjector(scaled.to(task.device))
        return self

    def projections(self, data: LabeledData) -> Tensor:
        """``(g_i . u_k) / sqrt(lambda_k + damping)``, ``(n, k)`` on CPU."""
        task = self._require_fit()
        return project_gradients(task.model, data, self.projector_, task.loss, self.chunk_size)

    def self_influence(self, data: LabeledData) -> Tensor:
        """``sum_k (g_i . u_k)^2 / (lambda_k + damping)``, ``(n,)``."""
        return self.projections(data).pow(2).sum(1)

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """``sum_k (g_train . u_k)(g_test . u_k) / (lambda_k + damping)``, ``(n_train, n_test)``."""
        return self.projections(train) @ self.projections(test).T
