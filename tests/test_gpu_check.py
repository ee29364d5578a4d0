"""The GPU check (``python -m experiments.gpu_check``): its CPU dry run end to end, the one-line exit 2 without
CUDA, and how it finds the committed CPU record of the setting it ran."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check
from experiments.gpu_check import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTING = {"task": "detect", "data": "fashion_mnist", "n_train": 10000, "noise_kind": "symmetric",
                   "noise_rate": 0.1, "model": "cnn_small", "seed": 0, "score_kind": "self"}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.gpu_check", *args], capture_output=True, text=True,
                          check=False, cwd=ROOT, env=dict(os.environ, **env), timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dry_run_writes_the_record_and_the_table(tmp_path):
    out = tmp_path / "gpu"
    assert main(["--dry-run", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["record.json", "table.md"]  # no temporary files left
    record = json.loads((out / "record.json").read_text())
    assert {"kind", "created_utc", "dry_run", "git", "environment", "settings", "tolerance", "paper", "detection",
            "throughput", "failed", "wall_s"} <= set(record)
    assert record["dry_run"] is True and record["failed"] == []
    assert {"torch", "cuda", "device_name"} <= set(record["environment"])
    assert record["tolerance"]["auroc"] == 0.02 and record["tolerance"]["ap"] == 0.05

    det = record["detection"]
    assert det["pretrain"]["status"] == "ok"
    assert all(_finite(det["pretrain"]["device"][k]) for k in ("train_acc", "noisy_fit", "test_acc", "wall_s"))
    assert list(det["methods"]) == list(gpu_check.DETECT_METHODS)
    for method, entry in det["methods"].items():
        assert entry["status"] == "ok", (method, entry)
        assert all(_finite(entry["device"][k]) for k in ("auroc", "ap", "wall_s_fit", "wall_s_score")), method
        assert 0 <= entry["device"]["auroc"] <= 1
        assert entry["cpu"] is None and entry["within_tolerance"] is None  # nothing committed for the smoke preset
    assert det["torchrun"]["status"] == "skipped" and det["torchrun"]["reason"]

    assert set(record["throughput"]) == {"resnet18", "vgg"}
    for name, part in record["throughput"].items():
        assert part["flops_per_sample"] > 0 and _finite(part["flops_per_sample"])
        rows = {r["variant"]: r for r in part["rows"]}
        for variant in ("fp32", "channels_last", "members k=1 fp32", "members k=2 fp32"):
            row = rows[variant]
            assert row["status"] == "ok", (name, row)
            for key in ("steps_per_s", "member_steps_per_s", "samples_per_s", "tflops", "projected_wall_s"):
                assert _finite(row[key]) and row[key] > 0, (name, variant, key)
        assert rows["members k=2 fp32"]["member_steps_per_s"] == pytest.approx(
            2 * rows["members k=2 fp32"]["steps_per_s"])
        for variant in ("bf16", "bf16+channels_last+compile", "members k=2 bf16"):  # refused or skipped on CPU
            assert rows[variant]["status"] == "skipped" and rows[variant]["reason"], (name, variant)
        assert part["best"] in rows and _finite(part["projected_wall_s"]) and isinstance(part["meets_goal"], bool)

    table = (out / "table.md").read_text()
    assert "| method | AUROC device | AUROC CPU |" in table and "| setting | steps/s |" in table
    assert all(f"| {m} |" in table for m in gpu_check.DETECT_METHODS)
    assert "ResNet-18" in table and "VGG" in table and "torchrun" in table


def test_without_cuda_prints_one_line_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu"
    result = _cli("--out", str(out), CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "CUDA" in result.stderr
    assert result.stdout == "" and not out.exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    result = _cli("--bogus")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    result = _cli("--dry-run", "--out", str(tmp_path / "file"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("method", gpu_check.DETECT_METHODS)
def test_the_committed_cpu_record_of_the_default_setting_is_found(method):
    ref = gpu_check.find_reference(DEFAULT_SETTING | {"method": method}, {},
                                   str(ROOT / "results/detect/*/*/metrics.json"))
    assert ref["path"] is not None, ref.get("reason")
    assert Path(ref["path"]).relative_to(ROOT / "results/detect").parts[1] == f"{method}_s0"
    assert ref["metrics"]["n_train"] == 10000 and ref["metrics"]["seed"] == 0


def test_the_committed_pretraining_record_is_found_and_other_settings_are_not():
    pre = gpu_check.find_reference({"task": "pretrain", "data": "fashion_mnist", "n_train": 10000,
                                    "model": "cnn_small", "seed": 0}, {}, str(ROOT / "results/pretrain/*/metrics.json"),
                                   gpu_check.PRETRAIN_MATCH)
    assert pre["path"] is not None and Path(pre["path"]).parent.name == "fmnist10k_s0"
    smoke = gpu_check.find_reference(DEFAULT_SETTING | {"method": "gex", "data": "digits", "n_train": 200}, {},
                                     str(ROOT / "results/detect/*/*/metrics.json"))
    assert smoke["path"] is None and smoke["reason"]


def test_several_candidates_are_told_apart_by_their_config(tmp_path):
    for name, eps in (("a", 0.05), ("b", 0.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(DEFAULT_SETTING | {"method": "gex"}))
        (tmp_path / name / "config.yaml").write_text(f"method:\n  name: gex\n  eps: {eps}\n")
    record = DEFAULT_SETTING | {"method": "gex"}
    ref = gpu_check.find_reference(record, {"method": {"name": "gex", "eps": 0.0, "new_option": 1}},
                                   str(tmp_path / "*/metrics.json"))
    assert Path(ref["path"]).parent.name == "b" and ref["config_diff"] == {}
    tied = gpu_check.find_reference(record, {}, str(tmp_path / "*/metrics.json"))
    assert tied["path"] is None and "ambiguous" in tied["reason"]


def test_compare_applies_the_cross_device_tolerance():
    got = gpu_check.compare({"auroc": 0.95, "ap": 0.80}, {"auroc": 0.96, "ap": 0.86})
    assert got["delta"]["auroc"] == pytest.approx(-0.01) and got["within"] == {"auroc": True, "ap": False}
    assert got["within_tolerance"] is False
    assert gpu_check.compare({"auroc": 0.95, "ap": 0.80}, None)["within_tolerance"] is None
