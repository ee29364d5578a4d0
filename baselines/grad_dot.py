"""Gradient dot product at theta*: identity-Hessian influence, the d -> infinity limit of ``randproj``.

``I(z, z') = g_z . g_z'`` with ``g`` the gradient of a sample's eval-mode loss (BN running statistics,
un-augmented, no weight decay) at theta*; self-influence ``||g_z||^2``. Positive pairwise influence = proponent
(a gradient step on ``z`` lowers the loss of ``z'`` to first order).
"""
from __future__ import annotations

from gex.attribution import MethodError, register
from gex.projection import GradientBilinear

__all__ = ["GradDot"]


@register("grad_dot")
class GradDot(GradientBilinear):
    """Exact ``g(z) . g(z')`` at theta*.

    Args:
        chunk_size: samples per per-sample-gradient chunk (does not change the scores).
    """

    def __init__(self, chunk_size: int = 256):
        if chunk_size < 1:
            raise MethodError(f"grad_dot.chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
