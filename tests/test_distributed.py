"""Scale-out: two gloo ranks on the CPU each stream their block of per-sample gradients, and the gathered norms and
projections equal the single-process ones; the helpers are no-ops without a process group."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gex.data import LabeledData
from gex.distributed import (DistInfo, distributed_context, env_info, gather_rows, shard_rows, world_info)
from gex.influence import iter_grad_chunks
from gex.models import build_model

TOL_FLOAT32 = 1e-5   # relative: per-sample gradients in float32 with different chunk boundaries
N, K, DIM = 37, 4, 6  # odd N: the two blocks differ in size
CHUNK = 5             # crosses the shard boundary at row 19


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    """A tiny BN CNN (eval mode, non-trivial BN statistics) and random data, both fixed by seeds."""
    model = build_model("cnn_small", (1, 6, 6), K, widths=(2, 3), hidden=5, pool_to=2, seed=0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(0.1)
            m.running_var.fill_(2.0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 1, 6, 6, generator=gen), torch.randint(0, K, (N,), generator=gen)
    return model.eval(), LabeledData(x, y, y.clone(), K)


def _scores(distributed: bool) -> dict[str, torch.Tensor]:
    """Per-sample squared gradient norms and a fixed random projection of every gradient, with their rows."""
    model, data = _setup()
    proj = torch.randn(sum(p.numel() for p in model.parameters()), DIM, generator=torch.Generator().manual_seed(1))
    rows, norms, projected = [], [], []
    for r, g in iter_grad_chunks(model, data, "ce", CHUNK, distributed=distributed):
        rows.append(r)
        norms.append(g.pow(2).sum(1))
        projected.append(g @ proj)
    return {"rows": torch.cat(rows), "norms": torch.cat(norms), "projected": torch.cat(projected)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed_context(backend="gloo", timeout_s=60) as info:
        assert info == DistInfo(rank, world, rank)
        local = _scores(distributed=True)
        assert torch.equal(local["rows"], shard_rows(N, rank, world))
        gathered = {k: gather_rows(v) for k, v in local.items()}
        gathered["counts"] = gather_rows(torch.tensor([len(local["rows"])]), all_ranks=True)
        if rank == 0:
            torch.save(gathered | {"local_rows": local["rows"]}, out)
        else:
            assert gathered["norms"] is None and gathered["counts"] is not None


def test_two_gloo_ranks_equal_one_process(tmp_path: Path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got, ref = torch.load(out), _scores(distributed=False)
    assert torch.equal(got["counts"], torch.tensor([19, 18]))
    assert torch.equal(got["local_rows"], torch.arange(19))
    assert torch.equal(got["rows"], torch.arange(N))             # data order after the gather
    for key in ("norms", "projected"):
        torch.testing.assert_close(got[key], ref[key], rtol=TOL_FLOAT32, atol=TOL_FLOAT32 * ref[key].abs().max())
    assert ref["norms"].min() > 0


@pytest.mark.parametrize("n,world", [(37, 2), (5, 3), (2, 4), (0, 2)])
def test_shard_rows_cover_every_row_once_in_order(n, world):
    blocks = [shard_rows(n, r, world) for r in range(world)]
    assert torch.equal(torch.cat(blocks), torch.arange(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    t = torch.arange(6.0).reshape(3, 2)
    with distributed_context() as info:
        assert info == DistInfo() and info.is_main and world_info() == DistInfo()
        assert gather_rows(t) is t
        assert torch.equal(shard_rows(7), torch.arange(7))


def test_misuse_is_one_line_error(monkeypatch):
    with pytest.raises(ValueError, match=r"backend='mpi' is unknown; valid choices: \['gloo', 'nccl'\]"):
        with distributed_context(backend="mpi"):
            pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT unset"):
        with distributed_context():
            pass
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2 are inconsistent"):
        env_info()
    with pytest.raises(ValueError, match="shard_rows: need n >= 0 and 0 <= rank < world_size"):
        shard_rows(5, 3, 2)
