"""The pretrain entry point end to end: run record, cache reuse, W&B offline, and one-line bad-input errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.pretrain import run
from experiments.scaffold import RunLogger, settings_from
from gex.data import DataConfig, NoiseConfig, load_data
from gex.models import ModelConfig
from gex.pipeline import pretrained_task
from gex.train import TrainConfig

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
TINY = ["data=digits", "data.n_train=150", "data.n_test=50", "model=mlp", "model.options.hidden=16", "train=smoke"]


def _compose(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.cache={tmp_path / 'cache'}", *overrides],
                       return_hydra_config=False)


def test_run_writes_the_record_and_the_second_run_reuses_the_checkpoint(tmp_path):
    cfg = _compose(tmp_path, "logger=none")
    first = run(cfg, tmp_path / "r1", RunLogger(cfg, tmp_path / "r1", "pretrain"))
    second = run(cfg, tmp_path / "r2", RunLogger(cfg, tmp_path / "r2", "pretrain"))
    metrics = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    for key in ("train_acc", "noisy_fit", "test_acc", "wall_s"):
        assert 0 <= metrics[key] and (key == "wall_s" or metrics[key] <= 1)
    assert (tmp_path / "r1" / "config.yaml").read_text().count("n_train: 150") == 1
    assert first["reused_checkpoint"] == 0 and second["reused_checkpoint"] == 1
    assert second["wall_s_train"] == 0.0
    assert {k: second[k] for k in ("train_acc", "test_acc")} == {k: first[k] for k in ("train_acc", "test_acc")}


def test_noisy_fit_counts_mislabeled_samples_predicted_as_their_noisy_label():
    data, noise = DataConfig(name="digits", n_train=100, n_test=30), NoiseConfig(rate=0.3)
    bundle = load_data(data, noise, 0)
    task = pretrained_task(bundle, ModelConfig("mlp", options={"hidden": 8}), TrainConfig(epochs=1, bn_batches=1),
                           seed=0, device="cpu")
    from gex.pipeline import pretrain_metrics
    from gex.train import eval_logits
    pred = eval_logits(task.model, task.train).argmax(-1)
    noisy = task.train.is_noisy
    assert pretrain_metrics(task)["noisy_fit"] == pytest.approx((pred[noisy] == task.train.y[noisy]).float().mean())


def test_wandb_offline_creates_a_local_run_and_no_network(tmp_path):
    cfg = _compose(tmp_path, "logger=wandb", "logger.mode=offline")
    env_before = os.environ.get("WANDB_BASE_URL")
    os.environ["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # any network attempt would fail loudly
    try:
        run(cfg, tmp_path / "r", logger := RunLogger(cfg, tmp_path / "r", "pretrain"))
        logger.summary({"x": 1.0})
        logger.finish()
    finally:
        os.environ.pop("WANDB_BASE_URL") if env_before is None else os.environ.update(WANDB_BASE_URL=env_before)
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_settings_reject_unknown_keys_and_values(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) data.colour"):
        settings_from(_compose(tmp_path, "+data.colour=red"))
    with pytest.raises(ValueError, match=r"noise.rate must be in \[0, 1\)"):
        settings_from(_compose(tmp_path, "noise.rate=1.5"))


@pytest.mark.parametrize("override,message", [
    ("data.name=nope", "data.name must be one of"),
    ("noise.kind=weird", "noise.kind"),
    ("train.epochs=0", "train.epochs must be positive"),
    ("model.name=transformer", "model.name='transformer' is unknown"),
    ("data.name=mnist", "data.download=true"),  # no MNIST files under an empty data root
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, override, message):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.pretrain", *TINY, "logger=wandb", f"paths.cache={tmp_path / 'c'}",
           f"paths.data={tmp_path / 'd'}", f"hydra.run.dir={run_dir}", override]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not run_dir.exists() and not (tmp_path / "c").exists()


def test_a_finished_run_with_another_config_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 99\n")
    (run_dir / "metrics.json").write_text('{"train_acc": 0.5}')
    cmd = [sys.executable, "-m", "experiments.pretrain", *TINY, "logger=none", f"paths.cache={tmp_path / 'c'}",
           f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 2 and "already holds a finished run with a different config" in out.stderr
    assert (run_dir / "metrics.json").read_text() == '{"train_acc": 0.5}'


def test_an_interrupted_pretraining_continues_from_the_cache_to_the_same_theta(tmp_path):
    from gex.runs import ArtifactCache
    data, noise = DataConfig(name="digits", n_train=100, n_test=30), NoiseConfig(rate=0.3)
    bundle = load_data(data, noise, 0)
    model, recipe = ModelConfig("mlp", options={"hidden": 8}), TrainConfig(epochs=6, batch_size=32, bn_batches=1)
    kw = dict(seed=0, device="cpu")
    reference = pretrained_task(bundle, model, recipe, **kw)

    def interrupt(row):
        if row["epoch"] == 4:
            raise KeyboardInterrupt

    cache = ArtifactCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        pretrained_task(bundle, model, recipe, **kw, cache=cache, log_fn=interrupt, resume_every_s=0)
    progress = list((tmp_path / "cache" / "pretrain").glob("*/progress.pt"))
    assert len(progress) == 1 and not list((tmp_path / "cache" / "pretrain").glob("*/checkpoint.pt"))
    resumed = pretrained_task(bundle, model, recipe, **kw, cache=cache, resume_every_s=0)
    ours, theirs = resumed.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert torch.equal(resumed.forgetting, reference.forgetting) and torch.equal(resumed.aum, reference.aum)
    assert not progress[0].exists() and progress[0].with_name("checkpoint.pt").is_file()


def test_the_recorded_revision_is_marked_dirty_only_when_code_differs_from_it(tmp_path):
    from experiments.scaffold import _git_revision
    assert _git_revision(tmp_path) == ""  # not a checkout
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    for name in ("gex/a.py", "results/r.json", "README.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "results/r.json").write_text("y")
    (tmp_path / "README.md").write_text("y")
    assert _git_revision(tmp_path) == head
    (tmp_path / "gex/a.py").write_text("y")
    assert _git_revision(tmp_path) == head + "-dirty"


def test_one_cache_keeps_two_noise_rates_apart_without_any_config(tmp_path):
    """The checkpoint cache is keyed by the data trained on: bundles at noise 0.1 and 0.3 through the library
    API, with one cache and no configs passed, give two checkpoints (not one theta* reused for both)."""
    from gex.runs import ArtifactCache
    model, recipe = ModelConfig("mlp", options={"hidden": 8}), TrainConfig(epochs=1, bn_batches=1)
    cache = ArtifactCache(tmp_path / "cache")
    data = DataConfig(name="digits", n_train=100, n_test=30)
    tasks = [pretrained_task(load_data(data, NoiseConfig(rate=rate), 0), model, recipe, seed=0, device="cpu",
                             cache=cache) for rate in (0.1, 0.3)]
    assert len(list((tmp_path / "cache" / "pretrain").glob("*/checkpoint.pt"))) == 2
    assert tasks[0].cache_spec["train_data"] != tasks[1].cache_spec["train_data"]
    again = pretrained_task(load_data(data, NoiseConfig(rate=0.3), 0), model, recipe, seed=0, device="cpu",
                            cache=cache)
    assert again.pretrain_wall_s == 0.0 and again.cache_spec == tasks[1].cache_spec
