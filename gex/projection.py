"""Streamed per-sample-gradient products and Gaussian random projections of them.

Per-sample gradients come from ``gex.grads.iter_grad_chunks`` (eval-mode BN, un-augmented, no weight decay),
``chunk_size`` rows at a time; nothing here holds an N x P matrix:
- ``gradient_self_products``: ``g_i . T(g_i)`` for every sample, memory O(chunk x P);
- ``gradient_cross_products``: ``g_train . T(g_test)`` as ``(n_train, n_test)``, streaming the train set once per
  chunk of test samples, memory O(chunk x P + n_train x n_test);
- ``GaussianProjector`` + ``project_gradients``: ``g_i . v_k`` for a d x P Gaussian matrix V that is held at most
  one block of rows at a time and regenerated from per-row seeds, memory O(chunk x P + block x P + N x d)
  (``MatrixProjector``: the same onto the rows of a given matrix, e.g. Ritz vectors);
- ``project_trajectory`` / ``using_state``: the same at each trajectory checkpoint (TracIn-style methods).

All of them stream the (train-side) rows through ``reduce_grad_rows``: under a ``torch.distributed`` group of
world size > 1 (``torchrun``, ``gex.distributed.distributed_context``) each rank streams only its contiguous
block of rows and the per-row results are gathered to every rank in data order, so that any algebra on them
afterwards runs identically everywhere; in one process it is a plain loop over the chunks.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from gex.attribution import Attributor
from gex.data import LabeledData
from gex.distributed import gather_rows
from gex.grads import iter_grad_chunks
from gex.params import num_params

__all__ = ["GaussianProjector", "MatrixProjector", "reduce_grad_rows", "project_gradients", "project_trajectory",
           "using_state", "gradient_self_products", "gradient_cross_products", "GradientBilinear", "WEIGHTINGS",
           "trajectory_weights"]

WEIGHTINGS = ("lr", "mean")
Transform = Callable[[Tensor], Tensor]  # (b, P) -> (b, P), e.g. an inverse-curvature solve
_SEED_STRIDE = 0x9E3779B1  # separates the row streams of different seeds


class GaussianProjector:
    """A ``(dim, num_params)`` matrix V of i.i.d. N(0, 1) entries, so ``E[(g . v_k)^2] = ||g||^2``.

    Row ``k`` is drawn on the CPU from its own generator seeded by ``(seed, k)``; the matrix is therefore the same
    whatever the block size or device. At most ``block_rows`` rows exist at once; when all ``dim`` rows fit in
    one block it is kept between calls (no regeneration).

    Args:
        num_params: P.
        dim: d, the number of projection directions.
        seed: fixes V.
        device: where blocks are used.
        dtype: dtype of the draws (blocks are cast to the gradients' dtype when projecting).
        max_block_mb: memory budget of one block of rows (at least one row is always made).
    """

    def __init__(self, num_params: int, dim: int, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_block_mb: float = 256.0):
        if num_params < 1 or dim < 1:
            raise ValueError(f"GaussianProjector needs num_params >= 1 and dim >= 1, got {num_params}, {dim}")
        if max_block_mb <= 0:
            raise ValueError(f"GaussianProjector.max_block_mb must be positive, got {max_block_mb}")
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self.device, self.dtype = torch.device(device), dtype
        row_bytes = num_params * torch.empty(0, dtype=dtype).element_size()
        self.block_rows = int(max(1, min(dim, max_block_mb * 2**20 // row_bytes)))
        self._kept: Tensor | None = None

    def release(self) -> None:
        """Drop a kept V (it is regenerated, identically, on the next use)."""
        self._kept = None

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of V, ``(stop - start, P)`` on ``device``."""
        out = torch.empty(stop - start, self.num_params, dtype=self.dtype)
        gen = torch.Generator()  # re-seeding one generator draws what a fresh one would, without its set-up cost
        for i, k in enumerate(range(start, stop)):
            gen.manual_seed((self.seed * _SEED_STRIDE + k) % 2**63)
            torch.randn(self.num_params, generator=gen, dtype=self.dtype, out=out[i])  # in place: no temporary row
        return out.to(self.device)

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, rows)`` blocks covering V in order, each at most ``block_rows`` rows."""
        if self.block_rows >= self.dim:
            if self._kept is None:
                self._kept = self.rows(0, self.dim)
            yield 0, self._kept
            return
        for start in range(0, self.dim, self.block_rows):
            yield start, self.rows(start, min(self.dim, start + self.block_rows))

    def project(self, grads: Tensor) -> Tensor:
        """``(b, P)`` rows ``g`` -> ``(b, d)`` entries ``g . v_k``."""
        if grads.shape[-1] != self.num_params:
            raise ValueError(f"gradients have {grads.shape[-1]} columns, the projector expects P={self.num_params}")
        out = torch.empty(len(grads), self.dim, dtype=grads.dtype, device=grads.device)
        for start, block in self.blocks():
            out[:, start:start + len(block)] = grads @ block.to(grads).T
        return out

    def dense(self) -> Tensor:
        """All of V, ``(d, P)`` (for tests and small models only)."""
        return self.rows(0, self.dim)


class MatrixProjector:
    """Projection onto the rows of a given ``(d, P)`` matrix (e.g. Ritz vectors), with the projector interface."""

    def __init__(self, rows: Tensor):
        if rows.dim() != 2:
            raise ValueError(f"MatrixProjector needs a (d, P) matrix, got shape {tuple(rows.shape)}")
        self.matrix = rows
        self.dim, self.num_params = rows.shape

    def project(self, grads: Tensor) -> Tensor:
        """``(b, P)`` rows ``g`` -> ``(b, d)`` entries ``g . u_k``."""
        return grads @ self.matrix.to(grads).T


Projector = GaussianProjector | MatrixProjector


def reduce_grad_rows(model: nn.Module, data: LabeledData, reduce: Callable[[Tensor], Tensor],
                     width: tuple[int, ...] = (), loss: str = "ce", chunk_size: int = 256,
                     desc: str = "per-sample grads") -> Tensor:
    """``reduce`` applied to every sample's gradient, chunk by chunk: the one streaming loop of this module.

    Under a process group of world size > 1 this rank streams only its block of rows (``gex.distributed``) and
    the blocks are gathered to every rank; one process streams every row (exactly the plain loop).

    Args:
        model: eval mode, at the parameters to differentiate at.
        data: samples (eval view, in order), labels ``data.y``.
        reduce: ``(b, P)`` gradients -> ``(b, *width)`` per-row results (in the gradients' dtype).
        width: trailing shape of ``reduce``'s output (needed for a rank that holds no rows).
        loss: ``ce`` or ``bce``.
        chunk_size: samples per gradient chunk.
        desc: progress-bar label.

    Returns:
        ``(n, *width)`` on CPU in data order, on every rank.
    """
    parts = [reduce(g).cpu() for _, g in iter_grad_chunks(model, data, loss, chunk_size, desc, distributed=True)]
    local = torch.cat(parts) if parts else torch.empty(0, *width, dtype=next(model.parameters()).dtype)
    return gather_rows(local, all_ranks=True)


def project_gradients(model: nn.Module, data: LabeledData, projector: Projector, loss: str = "ce",
                      chunk_size: int = 256) -> Tensor:
    """Projected per-sample gradients ``p_ik = g_i . v_k`` at the model's parameters.

    Args:
        model: eval mode; gradients of each sample's eval loss, no weight decay.
        data: samples (eval view, in order), labels ``data.y``.
        projector: V (``GaussianProjector`` or ``MatrixProjector``), with ``num_params`` = P of ``model``.
        loss: ``ce`` or ``bce``.
        chunk_size: samples per gradient chunk (does not change the result beyond round-off).

    Returns:
        ``(n, d)`` on CPU, in the gradients' dtype (on every rank; see ``reduce_grad_rows``).
    """
    if projector.num_params != num_params(model):
        raise ValueError(f"projector has num_params={projector.num_params}, the model has P={num_params(model)}")
    return reduce_grad_rows(model, data, projector.project, (projector.dim,), loss, chunk_size, "project")


@contextmanager
def using_state(model: nn.Module, state: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Load ``state`` (parameters and BN buffers) into ``model`` for the block, then restore the original."""
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state)
        model.eval()
        yield model
    finally:
        model.load_state_dict(original)


def trajectory_weights(lrs: Sequence[float], weighting: str) -> list[float]:
    """Checkpoint weights of TracIn-style sums: ``lr`` = each checkpoint's learning rate (TracInCP), ``mean`` =
    ``1/C`` (the authors' unweighted mean, docs/baselines.md#tracin-and-tracinrp).

    Raises:
        ValueError: no checkpoints, or an unknown ``weighting``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is unknown; valid choices: {list(WEIGHTINGS)}")
    if len(lrs) == 0:
        raise ValueError("no trajectory checkpoints (task.trajectory is empty); pretrain with train.ckpt_fracs set")
    return [float(lr) for lr in lrs] if weighting == "lr" else [1.0 / len(lrs)] * len(lrs)


def project_trajectory(model: nn.Module, states: Sequence[dict[str, Tensor]], data: LabeledData,
                       projector: Projector, loss: str = "ce", chunk_size: int = 256) -> Tensor:
    """``project_gradients`` at each state (e.g. ``[c.state for c in task.trajectory]``), one shared V.

    Returns:
        ``(C, n, d)`` on CPU; ``model`` is restored afterwards.
    """
    out = []
    for state in states:
        with using_state(model, state):
            out.append(project_gradients(model, data, projector, loss, chunk_size))
    return torch.stack(out)


def gradient_self_products(model: nn.Module, data: LabeledData, loss: str = "ce", chunk_size: int = 256,
                           transform: Transform | None = None) -> Tensor:
    """``g_i . T(g_i)`` for every sample (``T`` = identity by default: ``||g_i||^2``).

    Args:
        model: eval mode, at the parameters to differentiate at.
        data: samples, labels ``data.y``.
        loss: ``ce`` or ``bce``.
        chunk_size: samples per gradient chunk; ``T`` sees ``(chunk, P)`` blocks and must act row-wise.
        transform: ``(b, P) -> (b, P)``, e.g. an inverse-curvature solve.

    Returns:
        ``(n,)`` on CPU (on every rank; see ``reduce_grad_rows``).
    """
    def reduce(g: Tensor) -> Tensor:
        tg = g if transform is None else transform(g)
        return (g * tg.to(g)).sum(1)
    return reduce_grad_rows(model, data, reduce, (), loss, chunk_size, "self products")


def gradient_cross_products(model: nn.Module, train: LabeledData, test: LabeledData, loss: str = "ce",
                            chunk_size: int = 256, transform: Transform | None = None) -> Tensor:
    """``g_train_i . T(g_test_j)`` for all pairs, ``(n_train, n_test)`` on CPU.

    ``T`` is applied to test gradients only (``len(test)`` rows in total, on every rank); the train set is streamed
    once per chunk of ``chunk_size`` test samples (under a process group: each rank its block of train rows).
    """
    cols = []
    for _, gt in iter_grad_chunks(model, test, loss, chunk_size, "test grads"):
        tg = gt if transform is None else transform(gt).to(gt)
        cols.append(reduce_grad_rows(model, train, lambda g, tg=tg: g @ tg.T, (len(tg),), loss, chunk_size, "train grads"))
    return torch.cat(cols, dim=1)


class GradientBilinear(Attributor):
    """Base of the methods scoring ``g_z . T(g_z')`` at theta* (``T`` = identity or an inverse-curvature solve).

    A subclass sets ``chunk_size`` (samples per per-sample-gradient chunk) and overrides ``transform``; the streamed
    self- and pairwise products are shared here. Positive pairwise influence = proponent.
    """

    chunk_size: int = 256

    def transform(self) -> Transform | None:
        """``T``: ``(b, P)`` gradient rows -> rows (after ``fit``); None = identity."""
        return None

    def self_influence(self, data: LabeledData) -> Tensor:
        """``g_i . T(g_i)``, ``(n,)``."""
        task = self._require_fit()
        return gradient_self_products(task.model, data, task.loss, self.chunk_size, self.transform())

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """``g_train . T(g_test)``, ``(n_train, n_test)``; positive = proponent."""
        task = self._require_fit()
        return gradient_cross_products(task.model, train, test, task.loss, self.chunk_size, self.transform())
