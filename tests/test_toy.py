"""The Fig. 2 toy: the multirun CLI end to end (every metric present and in range), leave-one-out caching and
resume, the exact-IF positive-definiteness message, and one-line config errors."""
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_task
from hydra import compose, initialize_config_dir

import experiments.toy as toy
from experiments.scaffold import UsageError, register_methods
from gex.runs import ArtifactCache

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ("loo", "if_exact", "if_exact_a1", "gex", "gex_lin", "loss")
TINY = ["train.epochs=30", "model.options.hidden=8", "model.options.depth=1", "task.loo_points=4",
        "task.dampings=[1.0,100.0]", "method.num_members=2", "method.ft_step=5", "logger=none"]


@pytest.fixture(scope="module")
def toy_task():
    """two_circles (210 points, clean labels), BN MLP hidden 8, 30 full-batch epochs."""
    register_methods()
    return make_task(data="two_circles", n_train=None, n_test=None, noise="none", rate=0.0,
                     options={"hidden": 8, "depth": 1}, epochs=30, batch_size=256, lr=0.5, ckpt_fracs=[1.0])


@pytest.mark.slow
def test_multirun_over_seeds_writes_every_metric_in_range(tmp_path):
    env = dict(os.environ, GEX_QUIET="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "experiments.toy", "-m", "seed=0,1", *TINY, f"paths.cache={tmp_path / 'cache'}",
           f"hydra.sweep.dir={tmp_path / 'runs'}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads((tmp_path / "runs" / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert [r["seed"] for r in records] == [0, 1] and records[0]["gex.auroc"] != records[1]["gex.auroc"]
    for metrics in records:
        for name in ESTIMATORS:
            assert 0 <= metrics[f"{name}.auroc"] <= 1 and 0 <= metrics[f"{name}.ap"] <= 1, name
            assert -1 <= metrics[f"{name}.spearman_loo"] <= 1 and -1 <= metrics[f"{name}.pearson_loo"] <= 1, name
        assert metrics["loo.spearman_loo"] == pytest.approx(1.0) and metrics["n_loo"] == 4
        assert metrics["loo.refit_gap"] < 1e-6  # the LOO retrain recipe reproduces theta*
        assert metrics["gex.eps"] == 0.0 and metrics["task"] == "toy" and metrics["n_influential"] == 10
    run_dir = tmp_path / "runs" / "0"
    scores = torch.load(run_dir / "scores.pt")
    assert set(ESTIMATORS) | {"self_influence", "is_influential"} <= set(scores)
    assert int(torch.isfinite(scores["loo"]).sum()) == 4 and torch.equal(scores["self_influence"], scores["gex"])
    assert (run_dir / "toy_scores.png").stat().st_size > 0 and (run_dir / "toy_hist.png").stat().st_size > 0


def test_toy_config_composes_with_the_paper_setting():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("toy")
    assert (cfg.data.name, cfg.noise.kind, cfg.model.name, cfg.task.name) == ("two_circles", "none", "mlp", "toy")
    assert cfg.task.main_damping == 100.0 and 100.0 in cfg.task.dampings and cfg.method.name == "gex"
    assert cfg.train.batch_size >= cfg.data.toy_typical * 2 + cfg.data.toy_influential  # full batch


def test_loo_is_cached_point_by_point_and_resumes(toy_task, tmp_path, monkeypatch):
    task = dataclasses.replace(toy_task, cache=ArtifactCache(tmp_path), cache_spec={"toy": 1})
    calls = []
    original = toy._retrain_without
    monkeypatch.setattr(toy, "_retrain_without", lambda t, row: calls.append(row) or original(t, row))
    first = toy.loo_self_influence(task, torch.tensor([0, 209]))
    assert calls == [0, 209] and int(torch.isfinite(first).sum()) == 2
    second = toy.loo_self_influence(task, torch.tensor([0, 100, 209]))
    assert calls == [0, 209, 100]  # only the new point is retrained
    assert second[0] == first[0] and second[209] == first[209] and math.isnan(second[1])
    # the stored value is the loss change of a retrain without the point
    assert second[100] == pytest.approx(original(task, 100) - float(
        toy.per_sample_losses(task.model, task.train.subset(torch.tensor([100])), task.loss)[0]), abs=1e-6)


def test_non_positive_definite_damping_is_reported_and_gives_nan(toy_task, caplog):
    with caplog.at_level(logging.WARNING, logger="gex"):
        scores = toy.if_exact_scores(toy_task, [0.0, 100.0], 100.0)
    assert "if_exact_a0 skipped" in caplog.text and "not positive definite" in caplog.text
    assert torch.isnan(scores["if_exact_a0"]).all() and torch.isfinite(scores["if_exact"]).all()
    assert (scores["if_exact"] > 0).all()


def test_helpers():
    assert toy.loo_rows(210, None).tolist() == list(range(210)) and toy.loo_rows(5, 9).tolist() == list(range(5))
    assert toy.loo_rows(210, 4).tolist() == [0, 70, 139, 209]
    assert [toy.damping_key(a, 100.0) for a in (100.0, 1.0, 0.01, 1e-5)] == [
        "if_exact", "if_exact_a1", "if_exact_a0p01", "if_exact_a1em05"]


@pytest.mark.parametrize("override,match", [
    ("task.main_damping=5.0", r"task.dampings=.* must .*contain task.main_damping=5.0"),
    ("task.loo_points=1", r"task.loo_points=1 must be >= 2"),
    ("method=loss", r"method=loss: the toy runs gex and gex_lin")])
def test_bad_config_is_a_one_line_error(tmp_path, override, match):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("toy", overrides=[*TINY, f"paths.cache={tmp_path}", "data.toy_typical=20", override])
    with pytest.raises(UsageError, match=match):
        toy.run(cfg, tmp_path / "run", toy.RunLogger(cfg, tmp_path / "run", "toy"))
