"""LiSSA (Agarwal et al. 2017; Koh & Liang 2017) inverse-Hessian-vector products (docs/baselines.md#lissa, docs/decisions.md#where-we-differ-from-the-authors).

For a right-hand side ``v`` (a per-sample gradient: eval-mode BN, un-augmented, no weight decay, at theta*):
``h_0 = v``, ``h_{j+1} = v + (1 - damping) h_j - H_j h_j / scale`` for ``depth`` steps, with ``H_j`` the Hessian
of the mean eval-mode loss of a fresh seeded mini-batch of the training set (or of the whole set,
``batch_size=None``); the estimate is ``h_depth / scale``, averaged over ``repeats`` runs. It approximates
``(H + scale * damping I)^-1 v``: compare with ``if_exact(damping=scale * damping)``.

Deviations from the authors (docs/official_code.md#9-lissa-never-terminates): the loop terminates (fixed depth, one pass over the scored samples);
the HVP has no weight decay (the authors' included it; that equals extra damping ``wd``); mini-batches are
un-augmented by default (``augment=True`` for the authors' augmented stream); one seeded mini-batch sequence per
repeat is shared by all right-hand sides, so scores do not depend on ``chunk_size``.

Self-influence ``g_i . h(g_i)`` (one recursion per sample, a chunk at a time); pairwise ``g_train . h(g_test)``
(one recursion per test sample). Positive pairwise = proponent.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from gex.attribution import MethodError, register
from gex.ihvp import (
    check_curvature,
    check_hvp_mode,
    check_vec_chunk,
    curvature_block,
    curvature_matvec,
    lissa_recursion,
    resolve_vec_chunk,
)
from gex.projection import GradientBilinear, Transform
from gex.train import batch_stream

__all__ = ["LiSSA"]


@register("lissa")
class LiSSA(GradientBilinear):
    """``g^T h(g)`` with ``h`` the LiSSA estimate of ``(H + scale * damping I)^-1 g``.

    Args:
        depth: recursion steps J (the authors: 10).
        scale: divides the Hessian; must exceed about half its largest eigenvalue (the authors: 10).
        damping: in [0, 1) (the authors: 0); the effective damping of H is ``scale * damping``.
        repeats: independent recursions averaged (the authors: 1).
        batch_size: mini-batch per step; None = the whole training set (deterministic, the exact Neumann series).
        augment: draw mini-batches from the augmented train view (the authors) instead of the un-augmented one.
        curvature: ``hessian`` or ``ggn``.
        seed: fixes the mini-batch sequence; None = the task's run seed.
        chunk_size: right-hand sides (samples) per block recursion; does not change the scores.
        vec_chunk: right-hand sides per ``vmap`` call inside a product; None = the whole block; ``auto`` = 1 for
            a model with convolutions, else None (``gex.ihvp.resolve_vec_chunk``).
        hvp_mode: how Hessian products are formed (``gex.ihvp.HVP_MODES``; the same scores up to round-off):
            ``rev-rev`` (dattri's default; ~2x faster on BN MLPs on CPU) or ``fwd-rev``.
    """

    def __init__(self, depth: int = 50, scale: float = 10.0, damping: float = 0.0, repeats: int = 1,
                 batch_size: int | None = 128, augment: bool = False, curvature: str = "hessian",
                 seed: int | None = None, chunk_size: int = 256, vec_chunk: int | str | None = "auto",
                 hvp_mode: str = "rev-rev"):
        check_curvature(curvature, "lissa.curvature")
        check_hvp_mode(hvp_mode, "lissa.hvp_mode")
        if scale <= 0 or not 0 <= damping < 1:
            raise MethodError(f"lissa needs scale > 0 and 0 <= damping < 1, got scale={scale}, damping={damping}")
        for key, value in (("depth", depth), ("repeats", repeats), ("batch_size", batch_size or 1),
                           ("chunk_size", chunk_size)):
            if value < 1:
                raise MethodError(f"lissa.{key} must be >= 1, got {value}")
        check_vec_chunk(vec_chunk, "lissa.vec_chunk")
        self.depth, self.scale, self.damping, self.repeats = depth, scale, damping, repeats
        self.batch_size, self.augment, self.curvature, self.seed = batch_size, augment, curvature, seed
        self.chunk_size, self.vec_chunk, self.hvp_mode = chunk_size, vec_chunk, hvp_mode

    def _products(self, repeat: int) -> Iterator:
        """Per-step curvature products: the full set, or the seeded mini-batch stream of ``repeat``."""
        task = self._require_fit()
        model, loss = task.model, task.loss
        vec_chunk = resolve_vec_chunk(model, self.vec_chunk)
        if self.batch_size is None:
            full = curvature_matvec(model, task.train, loss, self.curvature, vec_chunk=vec_chunk,
                                    mode=self.hvp_mode)
            while True:
                yield full
        seed = task.seed if self.seed is None else self.seed
        gen = torch.Generator().manual_seed(seed * 1_000_003 + repeat)
        for batch in batch_stream(task.train, self.batch_size, self.augment, gen, task.device):
            yield lambda v, b=batch: curvature_block(model, b.x, b.y, v, loss, self.curvature, vec_chunk,
                                                     self.hvp_mode)

    def solve(self, grads: Tensor) -> Tensor:
        """``(b, P)`` rows ``g`` -> rows ``h(g)``, the mean over repeats."""
        total = torch.zeros_like(grads)
        for r in range(self.repeats):
            total += lissa_recursion(grads, self._products(r), self.depth, self.scale, self.damping)
        return total / self.repeats

    def transform(self) -> Transform:
        """``T = h``, the LiSSA estimate: self-influence ``g_i . h(g_i)``, pairwise ``g_train . h(g_test)``."""
        return self.solve
