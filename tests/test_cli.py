"""A user's mistake on the command line: one line on stderr, exit status 2, nothing left on disk."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.launch import bad_choices

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.detect", "experiment=smoke", "logger=none",
           f"paths.cache={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_unknown_group_choices_are_named_with_the_valid_ones():
    assert bad_choices(["method=gex", "model=mlp", "seed=3", "+x=1", "method.eps=0"]) == []
    (message,) = bad_choices(["method=gex,nope"])
    assert message.startswith("method='nope' is unknown; valid choices: [") and "'gex'" in message
    assert bad_choices(["model=resnet"])[0].startswith("model='resnet' is unknown")


@pytest.mark.parametrize("override, expected", [
    ("method=nope", "error: method='nope' is unknown; valid choices:"),
    ("model=nope", "error: model='nope' is unknown; valid choices:"),
    pytest.param("device=cuda", "error: device=cuda but this machine has no CUDA; use device=auto or device=cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_bad_choice_is_one_line_and_exit_status_2(tmp_path, override, expected):
    out = _run(tmp_path, override)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith(expected)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("override, expected", [
    ("peers.pairs=[tracin,nope]", "error: peers.pairs has unknown ['nope']; valid: ["),
    ("peers.scored=-1", "error: peers.scored=-1 must be a number of samples >= 1, or 0"),
])
def test_a_bad_peer_option_is_one_line_and_exit_status_2(tmp_path, override, expected):
    cmd = [sys.executable, "-m", "experiments.peers", "experiment=smoke", override,
           f"paths.cache={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().startswith(expected)
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_an_empty_gradient_path_list_skips_that_table():
    from bench.config import BenchConfig
    from experiments.bench import _metrics, grad_path_table
    import pandas as pd
    grads = grad_path_table(None, BenchConfig(grad_paths=[]))
    assert grads.empty
    assert _metrics(pd.DataFrame(columns=["method", "status"]), grads, None) == {}


def test_the_demo_check_holds_a_fresh_demo_to_the_cross_cpu_tolerance(tmp_path):
    from bench.tolerance import TOLERANCE
    from experiments.demo_check import compare_records, main
    committed = [{"task": "detect", "method": "gex", "data": "fashion_mnist", "model": "cnn_small", "seed": 0,
                  "n_train": 10000, "auroc": 0.9940, "ap": 0.9497},
                 {"data": "fashion_mnist", "model": "cnn_small", "seed": 0, "n_train": 10000, "train_acc": 0.9999,
                  "noisy_fit": 0.9989, "test_acc": 0.90}]
    other_cpu = [dict(committed[0], auroc=0.9925, ap=0.9461), dict(committed[1], train_acc=0.9996, noisy_fit=0.9956)]
    assert all(r["ok"] for r in compare_records(other_cpu, committed)) and len(compare_records(other_cpu, committed)) == 5
    broken = [dict(committed[0], auroc=0.9940 - 1.5 * TOLERANCE["auroc"])]
    (auroc, ap) = compare_records(broken, committed)
    assert not auroc["ok"] and ap["ok"]
    assert compare_records([dict(committed[0], seed=1)], committed) == []       # no twin: nothing compared
    import json
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(broken[0]))
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "metrics.json").write_text(json.dumps(committed[0]))
    assert main([str(tmp_path / "run"), "--reference", str(tmp_path / "ref")]) == 1
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(other_cpu[0]))
    assert main([str(tmp_path / "run"), "--reference", str(tmp_path / "ref")]) == 0
