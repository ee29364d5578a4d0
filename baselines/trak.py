"""TRAK (Park et al. 2023) over the last ``num_checkpoints`` pretraining checkpoints.

At checkpoint c: ``phi_c(z) = V_c grad f_c(z)``, the gradient of TRAK's model output function
``f = log(p / (1 - p))`` (p = the probability of the label ``y``: softmax for ``ce``, the label's sigmoid for
``bce``, where f is the label's logit) projected by a ``(proj_dim, P)`` Gaussian matrix ``V_c``
(``gex.projection.GaussianProjector``, one seed per checkpoint as TRAK's per-model projections); the kernel
``K_c = (Phi_c^T Phi_c + lambda_c I)^-1`` of the train set's features (``lambda_c = damping * tr(Phi_c^T Phi_c) / N``,
0 = TRAK's plain inverse, taken as a pseudo-inverse); ``Q_c(z) = 1 - p_c(z)``. Scores (TRAK's ensemble):

    I(z_i, z_j) = mean_c Q_c(z_i)  *  mean_c phi_c(z_j)^T K_c phi_c(z_i)

positive = the train sample raises the test sample's correct-class margin, i.e. lowers its loss (a proponent).
Self-influence is the same form with z_j = z_i, computed per sample (no n x n matrix). When ``proj_dim >= N``
and ``damping = 0`` every train sample's leverage ``phi^T K phi`` is 1, so self-influence degenerates to the mean
``Q`` (1 - p): keep ``proj_dim`` below the train size (TRAK's regime).

    scores = TRAK(num_checkpoints=5, proj_dim=512).fit(task).self_influence(task.train)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData, iter_batches
from gex.distributed import gather_rows, shard_rows
from gex.params import model_state, num_params
from gex.projection import GaussianProjector, using_state
from gex.train import clone_model
from gex.utils import progress

__all__ = ["TRAK", "margin", "correct_probability", "margin_grads", "spectrum"]

_SEED_SALT = 11_003  # V_c's seed = run seed * this + checkpoint index (independent of other methods' streams)
_PINV_RTOL = torch.finfo(torch.float64).eps  # undamped: drop s^2 below eps * max(n, d) * max s^2 (torch.linalg.pinv's rule)
# The spectrum comes from eigh of the smaller Gram matrix (2-4x faster than the SVD on a CPU) while cond(Phi) stays
# below this: its float64 error, ~eps * cond^2, is then <= 1e-8 relative and no direction is near the pinv cut-off;
# beyond it (and for rank-deficient Phi) the SVD is used.
_GRAM_MAX_COND = 1e4
Kernel = tuple[Tensor, Tensor, float]        # (W (d, r), 1 / (s^2 + lambda) (r,), lambda)


def margin(logits: Tensor, y: Tensor, loss: str) -> Tensor:
    """TRAK's output function ``log(p / (1 - p))`` of each row, ``(b,)``, computed stably from the logits."""
    z_y = logits.gather(-1, y[:, None]).squeeze(-1)
    if loss == "bce":
        return z_y
    is_label = torch.arange(logits.shape[-1], device=logits.device) == y[:, None]  # vmap-safe one-hot
    others = logits.masked_fill(is_label, float("-inf"))
    return z_y - others.logsumexp(-1)


def correct_probability(logits: Tensor, y: Tensor, loss: str) -> Tensor:
    """p, the probability of label y (softmax for ``ce``, the label's sigmoid for ``bce``), ``(b,)``."""
    probs = logits.softmax(-1) if loss == "ce" else logits.sigmoid()
    return probs.gather(-1, y[:, None]).squeeze(-1)


def _margin_fn(model: nn.Module, frozen: dict[str, Tensor], loss: str) -> Callable:
    def fn(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return margin(functional_call(model, (params, frozen), (x[None],)), y[None], loss).squeeze(0)
    return fn


def spectrum(phi: Tensor, gram: bool = True, max_cond: float = _GRAM_MAX_COND) -> tuple[Tensor, Tensor]:
    """Singular values ``s (r,)`` and right singular vectors ``W (d, r)`` of ``phi (n, d)``, r = min(n, d), in some
    order (``phi = U diag(s) W^T``): with ``gram``, from eigh of ``phi^T phi`` (n >= d) or of ``phi phi^T`` (then
    ``W = phi^T U / s``, orthonormal only up to ~eps * cond^2) while ``cond(phi) <= max_cond``; else from the SVD.
    Both give the same ``W diag(f(s)) W^T`` up to ~eps * cond^2."""
    small = phi.shape[0] < phi.shape[1]
    if gram:
        values, vectors = torch.linalg.eigh(phi @ phi.T if small else phi.T @ phi)
        if values[0] > values[-1] / max_cond ** 2:  # else ill-conditioned or rank-deficient: the Gram lost too much
            s = values.sqrt()
            return s, (phi.T @ vectors) / s if small else vectors
    _, s, wt = torch.linalg.svd(phi, full_matrices=False)
    return s, wt.T


def margin_grads(model: nn.Module, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """Per-sample gradients of the margin, flattened in ``params_vector`` order, ``(b, P)`` (eval mode)."""
    model.eval()
    params, frozen = model_state(model)
    grads = vmap(grad(_margin_fn(model, frozen, loss)), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[n].reshape(len(x), -1) for n in params], dim=1)


@register("trak")
class TRAK(Attributor):
    """TRAK with trajectory checkpoints as its ensemble.

    Args:
        num_checkpoints: the last k checkpoints of ``task.trajectory`` (1..len(trajectory)).
        proj_dim: d, Gaussian projection dimension (CPU 512; TRAK uses 2048+ on GPUs).
        damping: ``lambda_c = damping * tr(Phi^T Phi) / N`` (0 = TRAK's plain (pseudo-)inverse).
        seed: fixes the projections; None = the run seed.
        chunk_size: samples per per-sample-gradient chunk (does not change the scores).
        max_block_mb: memory budget of one block of V's rows. A budget that holds all of V (d x P x 4 bytes)
            keeps it for the whole pass over a checkpoint instead of regenerating it for every chunk, the main
            cost when P is large; it is freed before the next checkpoint, so one V is held at a time. The 2 GB
            default holds d = 512 for up to ~1M parameters (the 60k preset's 826k).
    """

    def __init__(self, num_checkpoints: int = 5, proj_dim: int = 512, damping: float = 0.0, seed: int | None = None,
                 chunk_size: int = 256, max_block_mb: float = 2048.0):
        for key, value in (("num_checkpoints", num_checkpoints), ("proj_dim", proj_dim), ("chunk_size", chunk_size)):
            if not (isinstance(value, int) and value >= 1):
                raise MethodError(f"trak.{key}={value!r} is invalid; it must be an integer >= 1")
        if not damping >= 0 or not max_block_mb > 0:
            raise MethodError(f"trak: damping={damping!r} must be >= 0 and max_block_mb={max_block_mb!r} > 0")
        self.num_checkpoints, self.proj_dim, self.damping, self.seed = num_checkpoints, proj_dim, float(damping), seed
        self.chunk_size, self.max_block_mb = chunk_size, max_block_mb
        self.states_: list[dict[str, Tensor]] = []
        self.projectors_: list[GaussianProjector] = []
        self.kernels_: list[Kernel] = []
        self._memo: dict[int, tuple[LabeledData, Tensor, Tensor]] = {}

    def fit(self, task: InfluenceTask) -> "TRAK":
        """Project the train set's margin gradients at each checkpoint and invert its kernel."""
        super().fit(task)
        available = len(task.trajectory)
        if available < self.num_checkpoints:
            raise MethodError(f"trak.num_checkpoints={self.num_checkpoints} but task.trajectory holds {available} "
                              f"checkpoints; lower it or pretrain with more train.ckpt_fracs")
        self.states_ = [c.state for c in task.trajectory[-self.num_checkpoints:]]
        seed = task.seed if self.seed is None else self.seed
        dtype = next(task.model.parameters()).dtype
        self.projectors_ = [GaussianProjector(num_params(task.model), self.proj_dim, seed * _SEED_SALT + c, task.device,
                                              dtype, self.max_block_mb) for c in range(self.num_checkpoints)]
        self._container = clone_model(task.model)
        self._memo.clear()
        phi, _ = self.features(task.train)
        self.kernels_ = [self._kernel(p) for p in phi]
        return self

    def _kernel(self, phi: Tensor) -> Kernel:
        """``(Phi^T Phi + lambda I)^+`` in spectral form from the thin SVD ``Phi = U diag(s) W^T`` (float64):
        ``W diag(1 / (s^2 + lambda)) W^T + (I - W W^T) / lambda`` (the last term only when lambda > 0; with
        lambda = 0 directions with ``s^2 <= rtol * max s^2`` are dropped, a pseudo-inverse). Costs O(n d min(n, d)),
        never a d x d inverse."""
        # the damped kernel's (I - W W^T) / lambda term needs W orthonormal to round-off, which the small Gram's
        # W = Phi^T U / s (n < d) is not: that case keeps the SVD
        s, w = spectrum(phi.to(self.task.device, torch.float64), gram=self.damping == 0 or len(phi) >= phi.shape[1])
        lam = float(self.damping * s.pow(2).sum() / len(phi))  # tr(Phi^T Phi) = sum s^2
        keep = s.pow(2) > _PINV_RTOL * max(phi.shape) * s.max() ** 2 if lam == 0 else s >= 0
        return w[:, keep], 1 / (s[keep] ** 2 + lam), lam

    @staticmethod
    def _bilinear(a: Tensor, b: Tensor, kernel: Kernel) -> Tensor:
        """``a K b^T`` for features ``a (n_a, d)``, ``b (n_b, d)``: float64 on the kernel's device, returned on CPU."""
        w, inv, lam = kernel
        a, b = a.to(w), b.to(w)
        aw, bw = a @ w, b @ w
        out = (aw * inv) @ bw.T
        return (out + (a @ b.T - aw @ bw.T) / lam if lam > 0 else out).cpu()

    @staticmethod
    def _quadratic(a: Tensor, kernel: Kernel) -> Tensor:
        """``a_i K a_i^T`` per row, ``(n_a,)``, without the n_a x n_a matrix."""
        w, inv, lam = kernel
        a = a.to(w)
        aw = a @ w
        out = (aw.pow(2) * inv).sum(1)
        return (out + (a.pow(2).sum(1) - aw.pow(2).sum(1)) / lam if lam > 0 else out).cpu()

    def features(self, data: LabeledData) -> tuple[Tensor, Tensor]:
        """``(Phi (C, n, d), Q (C, n))`` of ``data`` at each checkpoint, on CPU (memoized per data object)."""
        task = self._require_fit()
        entry = self._memo.get(id(data))
        if entry is not None and entry[0] is data:
            return entry[1], entry[2]
        phis, qs = [], []
        for state, projector in zip(self.states_, self.projectors_):
            with using_state(self._container, state) as model:
                phi, q = self._project(model, data, projector, task)
            projector.release()  # a budget that keeps all of V would otherwise keep it at every checkpoint
            phis.append(phi), qs.append(q)
        self._memo[id(data)] = (data, torch.stack(phis), torch.stack(qs))
        return self._memo[id(data)][1:]

    def _project(self, model: nn.Module, data: LabeledData, projector: GaussianProjector,
                 task: InfluenceTask) -> tuple[Tensor, Tensor]:
        # under torchrun each rank projects its block of rows; the blocks are gathered to every rank in data order
        rows = shard_rows(len(data))
        mine = data if len(rows) == len(data) else data.subset(rows)
        dtype = next(model.parameters()).dtype  # a rank without rows still sends the right shape and dtype
        phi, q = [torch.empty(0, projector.dim, dtype=dtype)], [torch.empty(0, dtype=dtype)]
        total = -(-len(mine) // self.chunk_size)
        for batch in progress(iter_batches(mine, self.chunk_size, device=task.device), "trak grads", total):
            phi.append(projector.project(margin_grads(model, batch.x, batch.y, task.loss)).cpu())
            with torch.no_grad():
                q.append((1 - correct_probability(model(batch.x), batch.y, task.loss)).cpu())
        return gather_rows(torch.cat(phi), all_ranks=True), gather_rows(torch.cat(q), all_ranks=True)

    def self_influence(self, data: LabeledData) -> Tensor:
        """``mean_c Q_c(z_i) * mean_c phi_ci^T K_c phi_ci``, shape ``(n,)``, >= 0; higher = more influential."""
        self._require_fit()
        phi, q = self.features(data)
        quad = torch.stack([self._quadratic(p, k) for p, k in zip(phi, self.kernels_)]).mean(0)
        return (q.mean(0).double() * quad).to(q.dtype)

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """``mean_c Q_c(train) * mean_c Phi_c(train) K_c Phi_c(test)^T``, ``(n_train, n_test)``; positive =
        proponent."""
        self._require_fit()
        (phi_tr, q), (phi_te, _) = self.features(train), self.features(test)
        kernel = torch.stack([self._bilinear(a, b, k) for a, k, b in zip(phi_tr, self.kernels_, phi_te)]).mean(0)
        return (q.mean(0).double()[:, None] * kernel).to(q.dtype)

    def influence_on_mean_test(self, train: LabeledData, test: LabeledData) -> Tensor:
        """Influence on the mean test output, ``(n_train,)`` = ``influence(train, test).mean(1)`` without the matrix
        (the score is linear in the test features)."""
        self._require_fit()
        (phi_tr, q), (phi_te, _) = self.features(train), self.features(test)
        means = phi_te.mean(1, keepdim=True)                                              # (C, 1, d)
        kernel = torch.stack([self._bilinear(a, b, k)[:, 0] for a, k, b in zip(phi_tr, self.kernels_, means)]).mean(0)
        return (q.mean(0).double() * kernel).to(q.dtype)
