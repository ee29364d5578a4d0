"""Curvature of the mean training loss and its inverse: explicit matrices for small models, batched
curvature-vector products, conjugate gradients, the LiSSA recursion and Arnoldi iteration with distillation.

The curvature is that of the eval-mode (BN running statistics), un-augmented, weight-decay-free mean loss
``L(theta) = (1/N) sum_i l_i(theta)`` at the model's parameters (docs/baselines.md#conventions):
- ``hessian``: ``d^2 L / d theta^2`` (forward-over-reverse products as ````hvp`` below``, or reverse-over-reverse:
  ``HVP_MODES``);
- ``ggn``: the generalized Gauss-Newton ``(1/N) sum_i J_i^T H_out,i J_i`` (``J_i`` = d logits / d theta,
  ``H_out,i`` = Hessian of the loss in the logits), positive semi-definite for CE and BCE.

Blocks of vectors are rows of a ``(k, P)`` tensor; a block of curvature products is one ``vmap`` over the rows,
so a block costs about as much as a few single products. Solvers never form more than ``(k, P)`` iterates; only
``explicit_curvature`` builds a ``(P, P)`` matrix, and it refuses above ``max_params``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from gex.attribution import MethodError
from gex.data import LabeledData, iter_batches
from gex.grads import mean_loss_fn
from gex.losses import per_sample_loss
from gex.params import model_device, model_state, num_params, vector_to_params

__all__ = ["hvp", "CURVATURES", "HVP_MODES", "check_curvature", "check_hvp_mode", "check_vec_chunk",
           "resolve_vec_chunk", "curvature_block", "curvature_matvec", "explicit_curvature", "DampedInverse",
           "conjugate_gradient", "lissa_recursion", "arnoldi_iteration", "distill", "top_eigenvalue"]

CURVATURES = ("hessian", "ggn")
# How a block of Hessian products is formed (the same numbers up to round-off):
# - fwd-rev: forward-over-reverse, jvp of the gradient per vector; the primal forward and backward are redone in
#   every product (within one vmap they are shared by its rows);
# - rev-rev: reverse-over-reverse as dattri's default: the gradient's graph is built once per batch and each row is
#   one backward through it. Measured on CPU: ~2x faster on BN MLPs; on cnn_small from 18% faster (64 samples x
#   8 vectors) to 8% slower (128 x 16), with ~30% less memory.
HVP_MODES = ("fwd-rev", "rev-rev")
MatVec = Callable[[Tensor], Tensor]  # (k, P) -> (k, P)


def check_curvature(curvature: str, owner: str = "curvature") -> None:
    """Raise a one-line MethodError naming ``owner`` when ``curvature`` is not one of ``CURVATURES``."""
    if curvature not in CURVATURES:
        raise MethodError(f"{owner}={curvature!r} is unknown; valid choices: {list(CURVATURES)}")


def check_hvp_mode(mode: str, owner: str = "mode") -> None:
    """Raise a one-line MethodError naming ``owner`` when ``mode`` is not one of ``HVP_MODES``."""
    if mode not in HVP_MODES:
        raise MethodError(f"{owner}={mode!r} is unknown; valid choices: {list(HVP_MODES)}")


def check_vec_chunk(vec_chunk: int | str | None, owner: str = "vec_chunk") -> None:
    """Raise a one-line MethodError naming ``owner`` unless ``vec_chunk`` is ``"auto"``, None or an integer >= 1."""
    if vec_chunk in ("auto", None):
        return
    if isinstance(vec_chunk, bool) or not isinstance(vec_chunk, int) or vec_chunk < 1:
        raise MethodError(f"{owner} must be auto, null or an integer >= 1, got {vec_chunk!r}")


def resolve_vec_chunk(model: nn.Module, vec_chunk: int | str | None, owner: str = "vec_chunk") -> int | None:
    """Vectors per ``vmap`` call: ``"auto"`` is 1 for a model with convolutions and None (all at once) otherwise.

    Measured on the CPU (docs/baselines.md#curvature-products): a ``vmap`` over the double-backward passes of a
    convolution took about twice as long as one vector at a time, while on a small MLP one ``vmap`` over all
    vectors was about 5x faster than a loop.

    Raises:
        MethodError: anything but ``"auto"``, None or an integer >= 1 (``check_vec_chunk``).
    """
    check_vec_chunk(vec_chunk, owner)
    if vec_chunk == "auto":
        return 1 if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) else None
    return vec_chunk


def _flat(tree: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([tree[n].reshape(-1) for n in names])


def curvature_block(model: nn.Module, x: Tensor, y: Tensor, vectors: Tensor, loss: str = "ce",
                    curvature: str = "hessian", vec_chunk: int | None = None, mode: str = "fwd-rev") -> Tensor:
    """Curvature of the batch-mean eval loss on ``(x, y)`` times each row of ``vectors``.

    Args:
        model: eval mode (BN running statistics).
        x: inputs ``(b, ...)``.
        y: labels ``(b,)``.
        vectors: ``(k, P)`` directions, flat in ``gex.params`` order.
        loss: ``ce`` or ``bce``.
        curvature: ``hessian`` or ``ggn``.
        vec_chunk: rows per ``vmap`` call (bounds memory at ``vec_chunk`` x activations); None = all.
        mode: how Hessian products are formed, one of ``HVP_MODES`` (the same numbers up to round-off; GGN
            products always take ``J v`` forward and ``J^T`` backward).

    Returns:
        ``(k, P)`` products, one per row.
    """
    check_curvature(curvature)
    check_hvp_mode(mode)
    model.eval()
    params, frozen = model_state(model)
    names = list(params)
    logits_fn = lambda p: functional_call(model, (p, frozen), (x,))  # noqa: E731
    if curvature == "hessian":
        grad_fn = grad(lambda p: per_sample_loss(logits_fn(p), y, loss).mean())
        if mode == "rev-rev":  # H is symmetric: H v = (v^T H)^T, one backward through the gradient's graph
            back = vjp(grad_fn, params)[1]
            one = lambda v: _flat(back(vector_to_params(model, v))[0], names)  # noqa: E731
        else:
            one = lambda v: _flat(jvp(grad_fn, (params,), (vector_to_params(model, v),))[1], names)  # noqa: E731
    else:
        logits, vjp_fn = vjp(logits_fn, params)
        logits = logits.detach()
        out_grad = grad(lambda z: per_sample_loss(z, y, loss).sum())

        def one(v: Tensor) -> Tensor:
            jv = jvp(logits_fn, (params,), (vector_to_params(model, v),))[1]   # J v, (b, K)
            h_jv = jvp(out_grad, (logits,), (jv,))[1] / len(x)                  # H_out J v / b
            return _flat(vjp_fn(h_jv)[0], names)
    return vmap(one, chunk_size=vec_chunk)(vectors)


def curvature_matvec(model: nn.Module, data: LabeledData, loss: str = "ce", curvature: str = "hessian",
                     damping: float = 0.0, batch_size: int = 1024, vec_chunk: int | None = None,
                     mode: str = "fwd-rev") -> MatVec:
    """Rows ``v`` -> rows ``(C + damping I) v``, ``C`` the curvature of the mean eval loss over all of ``data``.

    Args:
        model: at theta*, eval mode.
        data: the samples whose mean loss is differentiated (the eval view, fixed order).
        loss: ``ce`` or ``bce``.
        curvature: ``hessian`` or ``ggn``.
        damping: added multiple of the identity.
        batch_size: samples per forward pass (does not change the result beyond round-off).
        vec_chunk: rows per ``vmap`` call.
        mode: how Hessian products are formed, one of ``HVP_MODES`` (see ``curvature_block``).

    Returns:
        A function mapping ``(k, P)`` to ``(k, P)``; it reads the model's parameters at each call.
    """
    check_curvature(curvature)
    check_hvp_mode(mode)
    device = next(model.parameters()).device

    def matvec(vectors: Tensor) -> Tensor:
        vectors = vectors.to(device)
        total = torch.zeros_like(vectors)
        for batch in iter_batches(data, batch_size, device=device):
            block = curvature_block(model, batch.x, batch.y, vectors, loss, curvature, vec_chunk, mode)
            total += block * len(batch.rows)
        return total / len(data) + damping * vectors
    return matvec


def explicit_curvature(model: nn.Module, data: LabeledData, loss: str = "ce", curvature: str = "hessian",
                       batch_size: int = 1024, max_params: int = 5000, block: int = 128) -> Tensor:
    """The explicit ``(P, P)`` Hessian or GGN of the mean eval loss over ``data``, symmetrized.

    Built from products with ``block`` unit vectors at a time (columns of the identity; memory ``block`` x the
    activations of ``batch_size`` samples).

    Raises:
        MethodError: ``P > max_params`` (the matrix would be too large to build and factor).
    """
    p = num_params(model)
    if p > max_params:
        raise MethodError(f"explicit curvature needs P <= max_params={max_params}, the model has P={p}; "
                          f"use if_cg, lissa or arnoldi, or raise max_params")
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    matvec = curvature_matvec(model, data, loss, curvature, batch_size=batch_size)
    rows = []
    for start in range(0, p, block):
        stop = min(p, start + block)
        eye = torch.zeros(stop - start, p, dtype=dtype, device=device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        rows.append(matvec(eye))
    full = torch.cat(rows)
    return (full + full.T) / 2


class DampedInverse:
    """``(C + damping I)^-1`` through a Cholesky factor of an explicit curvature matrix (factored in float64).

    Args:
        matrix: symmetric ``(P, P)`` curvature.
        damping: added multiple of the identity.

    Raises:
        MethodError: ``C + damping I`` is not positive definite (the message gives its smallest eigenvalue and
            the damping that would fix it).
    """

    def __init__(self, matrix: Tensor, damping: float):
        matrix = matrix.double()
        eye = torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
        factor, info = torch.linalg.cholesky_ex(matrix + damping * eye)
        if int(info) > 0:
            lowest = float(torch.linalg.eigvalsh(matrix)[0])
            raise MethodError(f"damping={damping}: H + damping*I is not positive definite (smallest eigenvalue of "
                              f"H is {lowest:.4g}); use damping > {max(0.0, -lowest):.4g}")
        self.factor = factor

    def solve(self, vectors: Tensor) -> Tensor:
        """``(k, P)`` rows ``v`` -> rows ``(C + damping I)^-1 v`` (in the dtype and device of ``vectors``)."""
        return torch.cholesky_solve(vectors.to(self.factor).T, self.factor).T.to(vectors)


def conjugate_gradient(matvec: MatVec, rhs: Tensor, tol: float = 1e-6, max_iter: int = 100) -> tuple[Tensor, dict]:
    """Solve ``A x = b`` for each row ``b`` of ``rhs`` by independent conjugate-gradient runs (one block).

    Args:
        matvec: ``(k, P) -> (k, P)``, symmetric positive definite ``A``.
        rhs: ``(k, P)`` right-hand sides.
        tol: stop a row when ``||b - A x|| <= tol ||b||``.
        max_iter: products with ``A`` at most.

    Returns:
        (``(k, P)`` solutions, ``{"iterations", "max_rel_residual"}``). A warning is issued when a row did not
        reach ``tol``.

    Raises:
        MethodError: ``p^T A p <= 0`` was met (``A`` is not positive definite; damp more).
    """
    # Each row is solved at unit norm and scaled back (A x = b is linear in b): a sample fitted to ~1e-20 loss has a
    # gradient so small that p^T A p underflows to 0 in float32, which would read as a non-positive curvature.
    # The row norm itself is taken after dividing by the row's largest entry, so that it cannot under- or overflow.
    peak = rhs.abs().amax(dim=1)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    unit_norm = (rhs / peak[:, None]).norm(dim=1)
    scale = peak * torch.where(unit_norm > 0, unit_norm, torch.ones_like(unit_norm))
    x = torch.zeros_like(rhs)
    r = rhs / peak[:, None] / (scale / peak)[:, None]
    p = r.clone()
    norm_b = r.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    rs = (r * r).sum(1)
    active = rs.sqrt() > tol * norm_b
    it = 0
    while active.any() and it < max_iter:
        ap = matvec(p)
        pap = (p * ap).sum(1)
        if bool((pap[active] <= 0).any()):
            raise MethodError("conjugate gradients met p^T (H + damping I) p <= 0: the damped curvature is not "
                              "positive definite; increase damping")
        alpha = torch.where(active, rs / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rs))
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs.sqrt() > tol * norm_b)
        it += 1
    rel = float((rs.sqrt() / norm_b).max()) if len(rhs) else 0.0
    if active.any():
        warnings.warn(f"conjugate gradients stopped at max_iter={max_iter} with relative residual {rel:.3g} > "
                      f"tol={tol}; raise max_iter or damping", stacklevel=2)
    return x * scale[:, None], {"iterations": it, "max_rel_residual": rel}


def lissa_recursion(vectors: Tensor, products: Iterator[MatVec], depth: int, scale: float,
                    damping: float, max_growth: float = 10.0) -> Tensor:
    """LiSSA: ``h_0 = v``, ``h_{j+1} = v + (1 - damping) h_j - C_j h_j / scale``; returns ``h_depth / scale``.

    At its fixed point ``h / scale = (C + scale * damping I)^-1 v``: the effective damping is ``scale * damping``.
    It converges when ``scale`` exceeds about half the largest curvature eigenvalue. While every eigenvalue of
    the step map lies in [-1, 1], ``||h_J|| <= (J + 1) ||v||``; beyond ``max_growth`` times that bound the
    recursion is declared divergent.

    Args:
        vectors: ``(k, P)`` right-hand sides ``v``.
        products: yields, per step, the curvature product ``C_j`` (e.g. of a fresh mini-batch) as a matvec.
        depth: number of steps J (fixed, so the loop always terminates).
        scale: the division factor (> 0).
        damping: in [0, 1).
        max_growth: tolerated excess over the non-divergent bound (mini-batch curvatures fluctuate).

    Returns:
        ``(k, P)`` estimates of ``(C + scale * damping I)^-1 v``.

    Raises:
        MethodError: the iterates diverged (scale too small).
    """
    h = vectors.clone()
    for _ in range(depth):
        h = vectors + (1.0 - damping) * h - next(products)(h) / scale
    bound = max_growth * (depth + 1) * vectors.norm(dim=1)
    if not bool(torch.isfinite(h).all()) or bool((h.norm(dim=1) > bound).any()):
        raise MethodError(f"lissa diverged with scale={scale} (||h|| grew beyond {max_growth} x (depth+1) ||v||); "
                          f"use a scale above half the largest Hessian eigenvalue")
    return h / scale


def arnoldi_iteration(matvec: Callable[[Tensor], Tensor], start: Tensor, n_iter: int,
                      breakdown_tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Arnoldi iteration with full Gram-Schmidt (applied twice, for orthogonality in finite precision).

    ``n_iter - 1`` products (as the authors): basis ``q_0 .. q_{n_iter-1}`` and the ``(n_iter, n_iter - 1)``
    Hessenberg matrix. Stops early when ``h_{n+1,n} < breakdown_tol`` (an invariant subspace was found).

    Args:
        matvec: ``(P,) -> (P,)`` symmetric operator.
        start: ``(P,)`` start vector (normalized here).
        n_iter: basis size asked for (>= 2).
        breakdown_tol: threshold on the new vector's norm.

    Returns:
        (basis ``(m, P)``, Hessenberg ``(m, m - 1)``), ``m <= n_iter``; on breakdown, ``m - 1`` products were made
        and the last basis row is zero (as the authors).
    """
    basis = [start / start.norm()]
    hess = torch.zeros(n_iter, n_iter - 1, dtype=start.dtype)
    for n in range(n_iter - 1):
        w = matvec(basis[n])
        q = torch.stack(basis)
        for _ in range(2):  # "twice is enough" re-orthogonalization
            coef = q @ w
            w = w - coef @ q
            hess[: n + 1, n] += coef.cpu()
        norm = w.norm()
        hess[n + 1, n] = norm.cpu()
        if norm < breakdown_tol:
            basis.append(torch.zeros_like(w))
            return torch.stack(basis), hess[: n + 2, : n + 1]
        basis.append(w / norm)
    return torch.stack(basis), hess


def distill(basis: Tensor, hess: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Ritz pairs of an Arnoldi run (Schioppa et al.; docs/baselines.md#arnoldi).

    Drops the Hessenberg's last row, keeps the tridiagonal band, symmetrizes, takes ``eigh`` and keeps the
    ``top_k`` largest (algebraic) eigenvalues with their Ritz vectors ``u_k = sum_j U_jk q_j``.

    Args:
        basis: ``(m, P)`` Arnoldi basis.
        hess: ``(m, m - 1)`` Hessenberg matrix.
        top_k: pairs to keep (at most ``m - 1``).

    Returns:
        (eigenvalues ``(k,)`` descending, Ritz vectors ``(k, P)``).
    """
    square = hess[:-1]
    band = torch.triu(torch.tril(square, 1), -1)
    sym = (band + band.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    keep = min(top_k, len(values))
    values, vectors = values.flip(0)[:keep], vectors.flip(1)[:, :keep]
    ritz = vectors.T.to(basis) @ basis[: len(square)]
    return values.to(basis), ritz


def top_eigenvalue(matvec: Callable[[Tensor], Tensor], start: Tensor, iters: int = 20) -> float:
    """Largest-magnitude eigenvalue of a symmetric operator by power iteration (``iters`` products)."""
    v = start / start.norm()
    value = 0.0
    for _ in range(iters):
        w = matvec(v)
        value = float(v @ w)
        v = w / w.norm().clamp_min(torch.finfo(w.dtype).tiny)
    return abs(value)


def hvp(model: nn.Module, data: LabeledData, vec: Tensor, loss: str = "ce", batch_size: int = 1024) -> Tensor:
    """Hessian of the mean eval-mode loss over ``data`` times ``vec`` (forward-over-reverse), flat ``(P,)``.

    Pass a one-batch ``LabeledData`` (``data.subset(rows)``) for a stochastic mini-batch HVP.
    """
    model.eval()
    params, frozen = model_state(model)
    tangent = vector_to_params(model, vec.to(model_device(model)))
    total = torch.zeros_like(vec, device=model_device(model))
    for batch in iter_batches(data, batch_size, device=model_device(model)):
        fn = grad(mean_loss_fn(model, frozen, loss, batch.x, batch.y))
        _, hv = jvp(fn, (params,), (tangent,))
        total += torch.cat([hv[n].reshape(-1) for n in params]) * len(batch.rows)
    return total / len(data)

