"""Multi-process scale-out with ``torch.distributed``: ranks from the environment (``torchrun``), contiguous row
shards, and per-row results gathered back in data order.

Per-sample work (gradients, their projections and norms) needs no communication until the end: each rank takes
one contiguous block of rows (``shard_rows``), streams its chunks (``iter_grad_chunks(..., distributed=True)``)
and reduces every gradient to a few numbers per row; ``gather_rows`` then concatenates the blocks in rank order,
which is data order. Outside a process group (one process, or ``WORLD_SIZE`` unset) every helper is a no-op.

    # torchrun --nproc_per_node=2 my_script.py   (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
    with distributed_context() as info:
        norms = torch.cat([g.pow(2).sum(1) for _, g in iter_grad_chunks(model, data, distributed=True)])
        norms = gather_rows(norms)        # (n,) on rank 0 in data order, None on the other ranks

Work that must happen once (training theta* into the cache) runs inside ``main_first()``: rank 0 does it while
the others wait, then they repeat it (a cache hit); ``same_on_ranks`` checks afterwards that they agree.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BACKENDS", "DistInfo", "env_info", "world_info", "shard_rows", "gather_rows", "distributed_context",
           "rank_device", "barrier", "main_first", "same_on_ranks"]

BACKENDS = ("gloo", "nccl")
_ENV_NEEDED = ("MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes records and receives gathered results."""
        return self.rank == 0


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer; unset it or let torchrun set "
                         f"it") from None


def env_info() -> DistInfo:
    """Rank, world size and local rank as ``torchrun`` sets them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    info = DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"RANK={info.rank}, WORLD_SIZE={info.world_size} are inconsistent; "
                         f"need 0 <= RANK < WORLD_SIZE")
    return info


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> DistInfo:
    """The initialized process group's view, or a single process (rank 0 of 1) when there is none."""
    if not _active():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def shard_rows(n: int, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """This rank's contiguous block of ``range(n)``, long ``(n_rank,)``; block sizes differ by at most one.

    Args:
        n: number of rows.
        rank, world_size: default to the process group's (all rows when there is none).
    """
    info = world_info()
    rank = info.rank if rank is None else rank
    world_size = info.world_size if world_size is None else world_size
    if n < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_rows: need n >= 0 and 0 <= rank < world_size, got n={n}, rank={rank}, "
                         f"world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return torch.arange(start, start + base + (rank < extra))


def _comm_device(tensor: Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo works on CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(tensor: Tensor, dst: int = 0, all_ranks: bool = False) -> Tensor | None:
    """Concatenate every rank's rows ``(n_rank, ...)`` in rank order (data order for ``shard_rows`` blocks).

    Ranks may hold different numbers of rows; trailing dimensions must agree. Every rank must call it.

    Args:
        tensor: this rank's rows.
        dst: the rank that receives the result.
        all_ranks: return the result on every rank instead of on ``dst`` only.

    Returns:
        ``(n, ...)`` on ``tensor``'s device on ``dst`` (every rank with ``all_ranks``), None on the others; the
        input itself outside a process group.
    """
    if not _active():
        return tensor
    device, dtype = _comm_device(tensor), tensor.dtype
    local = tensor.detach().to(device, torch.uint8 if dtype == torch.bool else dtype)  # gloo has no bool
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device))
    counts = [int(s) for s in sizes]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    if not all_ranks and dist.get_rank() != dst:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(tensor.device, dtype)


def rank_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env_info().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def distributed_context(backend: str | None = None, timeout_s: float = 1800.0) -> Iterator[DistInfo]:
    """Initialize a process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA); a no-op otherwise.

    The group is destroyed on exit. An already initialized group is used as it is (and left alone).

    Args:
        backend: ``gloo`` or ``nccl``; None picks nccl when CUDA is present, else gloo.
        timeout_s: collective timeout in seconds.

    Yields:
        DistInfo of this process.

    Raises:
        ValueError: unknown backend, or ``MASTER_ADDR`` / ``MASTER_PORT`` missing with ``WORLD_SIZE > 1``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; valid choices: {list(BACKENDS)}")
    info = env_info()
    if info.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        yield world_info()
        return
    missing = [k for k in _ENV_NEEDED if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={info.world_size} but {', '.join(missing)} unset; launch with torchrun "
                         f"or set them (e.g. MASTER_ADDR=127.0.0.1 MASTER_PORT=29500)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank_device())
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield world_info()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here; a no-op outside a process group."""
    if _active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks after it (e.g. rank 0 trains and caches, the others
    then load the cache); a no-op outside a process group. Every rank must enter it.

    Rank 0 releases the others even when its block raises, so that they fail the same way instead of waiting.
    """
    if not _active():
        yield
        return
    if dist.get_rank() != 0:
        dist.barrier()
        yield
        return
    try:
        yield
    finally:
        dist.barrier()


def same_on_ranks(values: Tensor) -> bool:
    """Whether every rank holds exactly the same ``values`` (any shape, same on each rank), on every rank.

    True outside a process group. Every rank must call it.
    """
    if not _active():
        return True
    everyone = gather_rows(values.detach().reshape(1, -1), all_ranks=True)
    return bool((everyone == everyone[:1]).all())
