"""Scale-out: two gloo ranks on the CPU each stream their block of per-sample gradients, and the gathered norms and
projections equal the single-process ones; the per-sample-gradient methods (grad_dot, randproj, tracin, tracin_rp)
score the same under 2 ranks as in one process, each rank streaming only its block; GEX's chains split over
the ranks; ``torchrun`` runs of
``experiments.detect`` write one run record equal to the single-process one; the helpers are no-ops without a
process group."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gex import projection
from gex.data import DataConfig, LabeledData, NoiseConfig, load_data
from gex.distributed import (
    DistInfo,
    distributed_context,
    env_info,
    gather_rows,
    main_first,
    same_on_ranks,
    shard_rows,
    world_info,
)
from gex.grads import iter_grad_chunks
from gex.models import ModelConfig, build_model
from gex.pipeline import pretrained_task
from gex.runs import ArtifactCache
from gex.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]

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


def _primitives_on_rank(rank: int, world: int, out: Path) -> None:
    local = _scores(distributed=True)
    assert torch.equal(local["rows"], shard_rows(N, rank, world))
    gathered = {k: gather_rows(v) for k, v in local.items()}
    gathered["counts"] = gather_rows(torch.tensor([len(local["rows"])]), all_ranks=True)
    if rank == 0:
        torch.save(gathered | {"local_rows": local["rows"]}, out)
    else:
        assert gathered["norms"] is None and gathered["counts"] is not None


def _worker(rank: int, world: int, port: int, out_dir: str, cache_root: str, bundle) -> None:
    """One rank of the shared 2-rank run: the primitives, ``main_first``/``same_on_ranks``, then the methods."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GEX_QUIET="1")
    torch.set_num_threads(1)
    with distributed_context(backend="gloo", timeout_s=120) as info:
        assert info == DistInfo(rank, world, rank)
        _primitives_on_rank(rank, world, Path(out_dir) / "primitives.pt")
        _ordering_on_rank(info, Path(out_dir) / "rank0_was_first")
        task = _tiny_task(cache_root, bundle)
        _methods_on_rank(Path(out_dir) / f"methods{rank}.pt", task)
        _gex_on_rank(Path(out_dir) / f"gex{rank}.pt", task)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, object]:
    """Run ``_worker`` on 2 gloo ranks once (spawning costs most of the time); returns its output folder and
    the single-process tiny task, trained here and cached so that the ranks load the very same theta*."""
    out = tmp_path_factory.mktemp("two_ranks")
    bundle = load_data(TINY_DATA, TINY_NOISE, 0)
    task = _tiny_task(str(out / "cache"), bundle)
    mp.spawn(_worker, args=(2, _free_port(), str(out), str(out / "cache"), bundle), nprocs=2, join=True)
    return out, task


def test_two_gloo_ranks_equal_one_process(two_ranks):
    got, ref = torch.load(two_ranks[0] / "primitives.pt"), _scores(distributed=False)
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
    from experiments.launch import _dist_timeout_s
    monkeypatch.setenv("GEX_DIST_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="GEX_DIST_TIMEOUT_S='soon' is not a number of seconds"):
        _dist_timeout_s()
    monkeypatch.setenv("GEX_DIST_TIMEOUT_S", "90")
    assert _dist_timeout_s() == 90.0


# ------------------------------------------------------------------------------ methods under 2 gloo ranks

N_TRAIN, N_TEST, METHOD_CHUNK = 61, 5, 8  # odd N_TRAIN: blocks of 31 and 30 rows; chunks cross the boundary


TINY_DATA, TINY_NOISE = DataConfig(name="digits", n_train=N_TRAIN, n_test=N_TEST), NoiseConfig(rate=0.2)


def _tiny_task(cache_root: str, bundle=None):
    """digits 61 train / 5 test, BN MLP (hidden 8), 3 epochs with 5 trajectory checkpoints; theta* from the cache
    (the parent trains it once, so every process scores the very same parameters). The parent passes its data
    ``bundle`` to the ranks, which saves each of them loading scikit-learn."""
    bundle = load_data(TINY_DATA, TINY_NOISE, 0) if bundle is None else bundle
    recipe = TrainConfig(epochs=3, batch_size=16, lr=0.1, bn_batches=2)
    return pretrained_task(bundle, ModelConfig("mlp", options={"hidden": 8, "depth": 1}), recipe, seed=0,
                           device="cpu", cache=ArtifactCache(cache_root))


def _method_scores(task) -> dict[str, torch.Tensor]:
    """Self-influence of four per-sample-gradient methods and grad_dot's pairwise influence ``(N_TRAIN, N_TEST)``."""
    from baselines.grad_dot import (
        GradDot,  # imported here: spawned ranks import this module, keep that cheap
    )
    from baselines.randproj import RandProj
    from baselines.tracin import TracIn
    from baselines.tracin_rp import TracInRP
    from baselines.trak import TRAK
    train, test = task.train, task.test
    grad_dot = GradDot(chunk_size=METHOD_CHUNK).fit(task)
    return {"grad_dot": grad_dot.self_influence(train), "grad_dot_cross": grad_dot.influence(train, test),
            "randproj": RandProj(dim=6, chunk_size=METHOD_CHUNK).fit(task).self_influence(train),
            "tracin": TracIn(chunk_size=METHOD_CHUNK).fit(task).self_influence(train),
            "tracin_rp": TracInRP(dim=6, chunk_size=METHOD_CHUNK).fit(task).self_influence(train),
            "trak": TRAK(proj_dim=6, chunk_size=METHOD_CHUNK).fit(task).self_influence(train)}


def _count_streamed_rows(seen: list[torch.Tensor]) -> None:
    """Record the rows of every sharded gradient stream (``distributed=True``) of ``gex.projection``."""
    plain = projection.iter_grad_chunks

    def counting(*args, **kwargs):
        for rows, grads in plain(*args, **kwargs):
            if kwargs.get("distributed"):
                seen.append(rows.cpu())
            yield rows, grads
    projection.iter_grad_chunks = counting


def _ordering_on_rank(info: DistInfo, marker: Path) -> None:
    """``main_first`` runs rank 0's block before the others'; ``same_on_ranks`` answers alike on every rank."""
    with main_first():
        if info.is_main:
            time.sleep(0.3)  # the other rank would see no marker if it did not wait
            marker.write_text("0")
        else:
            assert marker.exists()
    assert same_on_ranks(torch.tensor([1.5, -2.0])) and not same_on_ranks(torch.tensor([float(info.rank)]))


def _methods_on_rank(out: Path, task) -> None:
    seen: list[torch.Tensor] = []
    _count_streamed_rows(seen)
    scores = _method_scores(task)
    torch.save(scores | {"streamed": torch.cat(seen).unique()}, out)


GEX_OPTIONS = {"num_members": 4, "num_chains": 2, "ft_step": 3, "ft_batch_size": 16, "bn_batches": 2}


def _gex_scores(task) -> torch.Tensor:
    from gex.method import GEX
    return GEX(**GEX_OPTIONS).fit(task).self_influence(task.train)


def _gex_on_rank(out: Path, task) -> None:
    """GEX with 2 chains: with the shared cache each rank trains its own chain; record which members it trained."""
    from gex import ensemble
    trained, plain = [], ensemble.run_cycle

    def recording(task, cfg, start, index, on_step=None):
        trained.append(index)
        return plain(task, cfg, start, index, on_step)
    ensemble.run_cycle = recording
    torch.save({"scores": _gex_scores(task), "trained": torch.tensor(trained)}, out)


def test_ranks_run_main_first_in_order(two_ranks):
    assert (two_ranks[0] / "rank0_was_first").read_text() == "0"  # the asserts inside the ranks did the rest


def test_methods_under_two_gloo_ranks_equal_one_process(two_ranks):
    out, task = two_ranks
    assert len(task.trajectory) == 5
    ref = _method_scores(task)
    got = [torch.load(out / f"methods{r}.pt") for r in range(2)]
    for rank in range(2):  # each rank streamed exactly its own block of the training set
        assert torch.equal(got[rank].pop("streamed"), shard_rows(N_TRAIN, rank, 2))
    for key, want in ref.items():
        assert torch.equal(got[1][key], got[0][key]), key      # all_ranks gather: bitwise the same on every rank
        torch.testing.assert_close(got[0][key], want, rtol=TOL_FLOAT32, atol=TOL_FLOAT32 * want.abs().max())
        assert got[0][key].shape == want.shape and want.abs().max() > 0


def test_gex_chains_split_over_two_ranks_equal_one_process(two_ranks):
    """Chain c is trained by rank c % 2 only (members 0, 2 on rank 0; 1, 3 on rank 1); both ranks then score
    with all four members, as one process does with its own members (in memory: no cache is shared with it)."""
    out, task = two_ranks
    got = [torch.load(out / f"gex{r}.pt") for r in range(2)]
    assert got[0]["trained"].tolist() == [0, 2] and got[1]["trained"].tolist() == [1, 3]
    ref = _gex_scores(dataclasses.replace(task, cache=None))
    for rank in range(2):
        torch.testing.assert_close(got[rank]["scores"], ref, rtol=TOL_FLOAT32, atol=TOL_FLOAT32 * ref.abs().max())
    assert ref.abs().max() > 0


def test_one_process_is_the_plain_loop_bitwise(two_ranks):
    task = two_ranks[1]
    plain = torch.cat([g.pow(2).sum(1) for _, g in iter_grad_chunks(task.model, task.train, task.loss, METHOD_CHUNK)])
    assert torch.equal(projection.gradient_self_products(task.model, task.train, task.loss, METHOD_CHUNK), plain)
    empty = task.train.subset(torch.arange(0))  # a rank without rows still returns the right trailing shape
    got = projection.reduce_grad_rows(task.model, empty, lambda g: g[:, :3], (3,), task.loss, METHOD_CHUNK)
    assert got.shape == (0, 3) and got.dtype == torch.float32


# --------------------------------------------------------------------------------- torchrun end to end

DETECT = ["experiment=smoke", "method=grad_dot", "logger=none", "threads=1"]


def _single_process_detect(tmp_path: Path) -> tuple[dict, torch.Tensor]:
    """The reference: the same detect run in this process, with its own (cold) cache."""
    from hydra import compose, initialize_config_dir

    from experiments.detect import run
    from experiments.scaffold import RunLogger
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("detect", overrides=[*DETECT, f"paths.cache={tmp_path / 'cache_single'}"])
    run_dir = tmp_path / "single"
    run(cfg, run_dir, RunLogger(cfg, run_dir, "detect"))
    return json.loads((run_dir / "metrics.json").read_text()), torch.load(run_dir / "scores.pt")["self_influence"]


@pytest.mark.slow
def test_torchrun_detect_writes_one_record_equal_to_one_process(tmp_path: Path):
    runs, scratch = tmp_path / "runs", tmp_path / "scratch"
    scratch.mkdir()
    # Each rank gets its own Hydra run directory, as with timestamped defaults that differ between ranks.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "experiments.detect", *DETECT,
           f"paths.cache={tmp_path / 'cache'}", f"hydra.run.dir={runs}/rank" + "${oc.env:RANK}"]
    env = os.environ | {"GEX_QUIET": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in runs.iterdir()] == ["rank0"]          # rank 1's directory left no debris
    assert not list(scratch.glob("gex-*"))                          # nor its scratch folder
    assert done.stdout.count("run written to") == 1
    # rank 0 trained theta* into the cold cache while rank 1 waited; rank 1 then reused it (one "reusing" line)
    assert (done.stdout + done.stderr).count("reusing pretrain checkpoint") == 1
    metrics = json.loads((runs / "rank0" / "metrics.json").read_text())
    scores = torch.load(runs / "rank0" / "scores.pt")["self_influence"]
    ref_metrics, ref_scores = _single_process_detect(tmp_path)
    assert metrics["auroc"] == ref_metrics["auroc"] and metrics["ap"] == ref_metrics["ap"]
    torch.testing.assert_close(scores, ref_scores, rtol=TOL_FLOAT32, atol=TOL_FLOAT32 * ref_scores.abs().max())
