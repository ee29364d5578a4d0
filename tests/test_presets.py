"""Presets (configs/experiment), per-method budgets, entry-point configs and launchers: each composes, the CPU
presets build their typed settings, and the smoke preset runs as a Hydra multirun sweep over methods."""
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import detect
from experiments.detect import DetectConfig
from experiments.prune import PruneConfig
from experiments.relabel import RelabelConfig
from experiments.scaffold import RunLogger, method_from_cfg, settings_from, task_config
from experiments.separate import SeparateConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
BUDGETS = sorted(p.stem for p in (CONFIGS / "experiment" / "budget").glob("*.yaml"))
CPU_PRESETS = [p for p in PRESETS if p.startswith("cpu_") or p == "smoke"]
EXPECTED = {"paper_mnist_vgg", "paper_cifar10_resnet18", "paper_cifar100_resnet18", "paper_cifar100_resnet18_noise30",
            "paper_cifar10n", "paper_cifar100n", "paper_prune_mnist", "paper_separate_mnist_svhn", "cpu_fmnist10k",
            "cpu_fmnist60k", "cpu_mnist5k", "cpu_digits", "cpu_prune_fmnist", "cpu_separate", "smoke"}
COMMAND = re.compile(r"python -m experiments\.(detect|relabel|prune|separate)\b")
RUNTIME = re.compile(r"\b(seconds|min|h)\b")


def _compose(config: str, *overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config, overrides=list(overrides), return_hydra_config=hydra_cfg)


def _header(preset: str) -> tuple[str, str]:
    """The preset's leading comment block, and the entry point its command names."""
    lines = (CONFIGS / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_", f"{preset}: the package header must be the first line"
    comment = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), lines[1:]))
    match = COMMAND.search(comment)
    assert match, f"{preset}: the opening comment must give the command (python -m experiments.<task> ...)"
    return comment, match.group(1)


TASK_OPTIONS = {"detect": DetectConfig, "relabel": RelabelConfig, "prune": PruneConfig, "separate": SeparateConfig}


def test_every_expected_preset_exists():
    assert EXPECTED <= set(PRESETS), sorted(EXPECTED - set(PRESETS))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_its_entry_point_and_states_a_runtime(preset):
    comment, job = _header(preset)
    assert "Expected" in comment and RUNTIME.search(comment), f"{preset}: the opening comment gives no runtime"
    cfg = _compose(job, f"experiment={preset}")
    assert cfg.task.name == job
    assert task_config(cfg.task, job, TASK_OPTIONS[job]).name == job
    method = method_from_cfg(cfg.method)  # a budget key the method does not take would fail here
    assert method.name == "gex"


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_cpu_presets_build_their_typed_settings(preset, tmp_path):
    _, job = _header(preset)
    settings = settings_from(_compose(job, f"experiment={preset}", f"paths.cache={tmp_path}"))
    assert settings.device.type in ("cpu", "cuda") and settings.train.epochs > 0
    assert settings.noise.kind == ("none" if job in ("prune", "separate") else "symmetric")


def test_budgets_belong_to_presets_and_apply_to_their_method_only():
    for budget in BUDGETS:  # <preset>_<method>, for a method of the GEX family
        method = next((m for m in ("gex_clamped", "gex") if budget.endswith(f"_{m}")), None)
        assert method is not None and budget[:-len(method) - 1] in PRESETS, budget
        keys = set(OmegaConf.load(CONFIGS / "method" / f"{method}.yaml"))
        assert set(OmegaConf.load(CONFIGS / "experiment" / "budget" / f"{budget}.yaml")) <= keys, budget
    paper = _compose("detect", "experiment=paper_mnist_vgg")
    assert (paper.method.num_members, paper.method.ft_step, paper.method.ft_batch_size) == (32, 800, 1024)
    prune = _compose("prune", "experiment=paper_prune_mnist")
    assert (prune.method.ft_schedule, prune.method.ft_lr) == ("constant", 0.01)
    other = _compose("detect", "experiment=paper_mnist_vgg", "method=loss")
    loss_yaml = OmegaConf.load(CONFIGS / "method" / "loss.yaml")
    assert OmegaConf.to_container(other.method) == OmegaConf.to_container(loss_yaml)
    assert _compose("detect", "experiment=smoke", "method.num_members=3").method.num_members == 3  # command line wins


def test_entry_configs_fix_task_and_data_and_the_command_line_wins():
    assert _compose("prune").noise.kind == "none" and _compose("prune").task.fractions == [0.1, 0.2, 0.3, 0.4]
    separate = _compose("separate", "experiment=smoke")
    assert (separate.data.name, separate.noise.kind, separate.data.n_train) == ("mixed", "none", 200)
    assert _compose("detect", "experiment=smoke").data.name == "digits"
    assert _compose("prune", "noise=symmetric").noise.kind == "symmetric"


@pytest.mark.parametrize("launcher,target,key,value", [
    ("joblib_local", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs", 2),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "timeout_min", 240),
])
def test_launchers_compose_without_submitting(launcher, target, key, value):
    cfg = _compose("detect", f"hydra/launcher={launcher}", hydra_cfg=True)
    assert cfg.hydra.launcher._target_ == target and cfg.hydra.launcher[key] == value


def test_smoke_preset_runs_as_a_multirun_sweep_over_methods(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.detect", "-m", "experiment=smoke", "logger=none",
                           "method=loss,random", "threads=1", f"paths.cache={tmp_path / 'cache'}",
                           f"paths.runs={tmp_path / 'runs'}"], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GEX_QUIET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = sorted((tmp_path / "runs" / "multirun" / "detect").glob("*/*/metrics.json"))
    assert len(records) == 2  # each job its own run directory
    metrics = [json.loads(p.read_text()) for p in records]
    assert sorted(m["method"] for m in metrics) == ["loss", "random"]
    assert all(0.0 <= m["auroc"] <= 1.0 and m["data"] == "digits" for m in metrics)
    assert metrics[0]["noise_rate_realized"] == metrics[1]["noise_rate_realized"]


def test_smoke_detect_logs_to_a_wandb_offline_run(tmp_path):
    cfg = _compose("detect", "experiment=smoke", "method=loss", "logger=wandb", "logger.mode=offline",
                   f"paths.cache={tmp_path / 'cache'}")
    logger = RunLogger(cfg, tmp_path / "r", "detect")
    try:
        metrics = detect.run(cfg, tmp_path / "r", logger)
        logger.summary(metrics)
    finally:
        logger.finish()
    assert 0.0 <= metrics["auroc"] <= 1.0
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_demo_methods_are_registered_and_configured():
    """`make demo`'s method list names real methods, each with its configs/method/<name>.yaml."""
    import re

    import baselines  # noqa: F401  (registers every baseline)
    import gex.method  # noqa: F401  (registers the GEX family)
    from gex.attribution import METHODS
    line = re.search(r"^DEMO_METHODS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    names = line.group(1).split(",")
    assert len(names) >= 10 and "gex" in names and "loss" in names
    for name in names:
        assert name in METHODS and (ROOT / "configs" / "method" / f"{name}.yaml").is_file(), name
