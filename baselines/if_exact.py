"""Classical influence functions with the explicit Hessian (or GGN) of the mean training loss (docs/method.md#the-method, docs/protocols.md#cpu-configurations).

``I(z, z') = g_z^T (H + damping I)^-1 g_z'`` with ``g`` the gradient of a sample's eval-mode loss (BN running
statistics, un-augmented, no weight decay) at theta*, and ``H`` the curvature of the mean eval-mode training loss
at theta*. Positive pairwise influence = the training sample lowers the test loss (a proponent): upweighting
``z`` by ``eps`` moves theta by ``-eps H^-1 g_z`` and the test loss by ``-eps g_test^T H^-1 g_z``.

Only for small models: the ``(P, P)`` matrix is built and Cholesky-factored, and ``P > max_params`` is refused.
It is the reference that ``if_cg``, ``lissa`` and ``arnoldi`` are checked against.
"""
from __future__ import annotations

from gex.attribution import InfluenceTask, MethodError, register
from gex.ihvp import DampedInverse, check_curvature, explicit_curvature
from gex.projection import GradientBilinear, Transform

__all__ = ["IFExact"]


@register("if_exact")
class IFExact(GradientBilinear):
    """``g^T (H + damping I)^-1 g`` with the explicit curvature at theta*.

    Args:
        damping: the multiple of the identity added to the curvature (the paper's toy: 100); must make
            ``H + damping I`` positive definite (the error says how much is needed).
        curvature: ``hessian`` (exact) or ``ggn`` (Gauss-Newton, positive semi-definite).
        max_params: refuse models with more parameters than this.
        chunk_size: samples per per-sample-gradient chunk (does not change the scores).
        batch_size: samples per forward pass when building the curvature (memory: 128 x batch_size x activations).
    """

    def __init__(self, damping: float = 0.1, curvature: str = "hessian", max_params: int = 5000,
                 chunk_size: int = 256, batch_size: int = 256):
        check_curvature(curvature, "if_exact.curvature")
        if damping < 0:
            raise MethodError(f"if_exact.damping must be >= 0, got {damping}")
        for key, value in (("max_params", max_params), ("chunk_size", chunk_size), ("batch_size", batch_size)):
            if value < 1:
                raise MethodError(f"if_exact.{key} must be >= 1, got {value}")
        self.damping, self.curvature, self.max_params = damping, curvature, max_params
        self.chunk_size, self.batch_size = chunk_size, batch_size
        self.inverse_: DampedInverse | None = None

    def fit(self, task: InfluenceTask) -> "IFExact":
        """Build the ``(P, P)`` curvature of the mean training loss at theta* and factor ``H + damping I``."""
        super().fit(task)
        matrix = explicit_curvature(task.model, task.train, task.loss, self.curvature, self.batch_size,
                                    self.max_params)
        self.inverse_ = DampedInverse(matrix, self.damping)
        return self

    def transform(self) -> Transform:
        """``T = (H + damping I)^-1`` from the factored matrix (after ``fit``)."""
        self._require_fit()
        return self.inverse_.solve
