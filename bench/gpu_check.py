"""The GPU check (``make gpu-check``): detection on the device next to the committed CPU records, SGD-step
throughput of the paper's GEX recipe (ResNet-18 on CIFAR-shaped and VGG on MNIST-shaped synthetic tensors), and a
two-process NCCL run where two GPUs exist.

The detection runs go through the command-line entry points as subprocesses (``python -m experiments.pretrain``,
``python -m experiments.detect -m ...``): their ``metrics.json`` is the interface, so this module never imports
``experiments`` (imports run ``gex`` < ``baselines`` < ``bench`` < ``experiments``).

Throughput counts only the SGD steps of one member's fine-tuning (``gex.train.sgd_steps`` /
``stacked_sgd_steps`` on synthetic batches already on the device): no data loading, BN refresh or evaluation pass.
FLOPs per sample are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of a
training step (convolutions and matrix products; the optimizer's elementwise update is not counted).

``settings_for(dry_run=True)`` is the same code path at CPU sizes (the smoke preset, a tiny batch, k in {1, 2},
compile skipped), which the test suite runs so that the check cannot rot.

The record (``record.json``): ``environment`` (torch, CUDA, cuDNN, device name and count, TF32 flags),
``settings``, ``tolerance``, ``paper`` (M, steps, goal); ``detection``: ``pretrain`` and ``methods[<name>]``, each
with ``device`` and ``cpu`` values (AUROC, AP, walls), the committed ``cpu_record`` it was matched to and its
``cpu_config_diff``, ``delta``, ``within`` and ``within_tolerance``, then ``torchrun``; ``throughput[<model>]``:
``flops_per_sample``, ``rows`` (one per variant: steps/s, member-steps/s, samples/s, TFLOP/s, projected wall,
peak memory, or a ``skipped`` / ``failed`` status with its reason), ``best``, ``projected_wall_s``,
``meets_goal``; ``failed`` lists what did not run.
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from bench.tolerance import TOLERANCE
from gex.data import Batch
from gex.losses import per_sample_loss
from gex.models import build_model, count_parameters
from gex.runs import atomic_write_text
from gex.train import TrainConfig, sgd_steps, snapshot, stack_states, stacked_sgd_steps

__all__ = ["DETECT_METHODS", "TOLERANCE", "GOAL_WALL_S", "PAPER_MEMBERS", "PAPER_STEPS", "Variant",
           "ModelSpec", "CheckSettings", "settings_for", "cuda_missing_reason", "find_reference", "compare",
           "train_flops_per_sample", "measure_variant", "throughput", "detection", "run_check", "render_table",
           "write_outputs", "RECORD_NAME", "TABLE_NAME"]

DETECT_METHODS = ("gex", "el2n", "loss", "tracin_rp", "trak")

# Cross-device tolerance: the spread of AUROC / AP we measured between CPUs for the same seed (issue: make
# gpu-check); a GPU run is not bitwise equal to a CPU run (other kernels, TF32 convolutions), only this close.

PAPER_MEMBERS, PAPER_STEPS = 32, 800   # the paper's GEX: M = 32 members x 800 fine-tuning steps at batch 1,024
GOAL_WALL_S = 300.0                    # the goal for those steps on one GPU (5 minutes)

RECORD_NAME, TABLE_NAME = "record.json", "table.md"

# Record fields that say two detection records measured the same setting (their values must agree).
DETECT_MATCH = ("task", "data", "n_train", "noise_kind", "noise_rate", "model", "seed", "method", "score_kind")
PRETRAIN_MATCH = ("task", "data", "n_train", "model", "seed")
# Config sections compared key by key (shared keys only: records older than a new option lack it).
CONFIG_SECTIONS = ("data", "noise", "model", "train", "method")

GPU_DETECT_KEYS = ("auroc", "ap", "wall_s_fit", "wall_s_score", "wall_s_pretrain", "wall_s")
GPU_PRETRAIN_KEYS = ("train_acc", "noisy_fit", "test_acc", "wall_s", "wall_s_train")
TAIL_CHARS = 2000                      # stderr kept in the record when a subprocess fails


@dataclass(frozen=True)
class Variant:
    """One way of running the training step.

    Attributes:
        name: label in the record and table.
        members: k models trained together (``stacked_sgd_steps`` under vmap); 0 = one plain model
            (``sgd_steps``, where the speed switches apply).
        amp_bf16: bf16 autocast of the forward.
        channels_last: channels-last memory format (plain model only).
        compile: ``torch.compile`` (plain model only).
    """

    name: str
    members: int = 0
    amp_bf16: bool = False
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A model of the throughput part: ``build_model(name, input_shape, num_classes)``."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    label: str


@dataclass
class CheckSettings:
    """Sizes and switches of one check (``settings_for`` builds the GPU and the dry-run ones).

    Attributes:
        dry_run: the CPU smoke version (tiny sizes, ``experiment=smoke``).
        device: ``cuda`` or ``cpu``.
        methods: detection methods, one multirun.
        detect_overrides: extra Hydra overrides of the pretrain and detect runs (both: the same theta*).
        models: the throughput models.
        batch: samples per step (per member).
        warmup_steps: untimed steps first (the compiled variant compiles there).
        timed_steps: steps timed after the warm-up (k batched members: ``timed_steps // k``, at least 2).
        flop_batch: batch of the counted step (FLOPs are linear in the batch).
        variants: the single-model settings and the batched-member settings.
        skip_compile: reason to skip ``torch.compile`` variants (None = run them).
        torchrun: try the two-process NCCL run (needs two CUDA devices).
        timeout_s: limit of each subprocess.
        lr: learning rate of the timed steps (the paper's GEX fine-tuning LR).
    """

    dry_run: bool
    device: str
    methods: tuple[str, ...] = DETECT_METHODS
    detect_overrides: tuple[str, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    batch: int = 1024
    warmup_steps: int = 5
    timed_steps: int = 20
    flop_batch: int = 8
    variants: tuple[Variant, ...] = ()
    skip_compile: str | None = None
    torchrun: bool = True
    timeout_s: float = 900.0
    lr: float = 0.05


MODELS = (ModelSpec("resnet18", (3, 32, 32), 10, "ResNet-18, CIFAR-shaped 3x32x32"),
          ModelSpec("vgg", (1, 28, 28), 10, "VGG, MNIST-shaped 1x28x28"))


def _variants(members: tuple[int, ...]) -> tuple[Variant, ...]:
    """fp32, bf16, channels_last, both, both + compile, and k batched members in fp32 and bf16.

    ``torch.compile`` runs once, on top of the other two switches: each compile costs the better part of a minute
    of the check's budget, and a compile in fp32 alone would only tell how much of the gain needs bf16.
    """
    single = (Variant("fp32"), Variant("bf16", amp_bf16=True), Variant("channels_last", channels_last=True),
              Variant("bf16+channels_last", amp_bf16=True, channels_last=True),
              Variant("bf16+channels_last+compile", amp_bf16=True, channels_last=True, compile=True))
    stacked = tuple(Variant(f"members k={k} {p}", members=k, amp_bf16=p == "bf16")
                    for p in ("fp32", "bf16") for k in members)
    return single + stacked


def settings_for(dry_run: bool) -> CheckSettings:
    """The GPU check's settings, or the dry run's (CPU, smoke preset, tiny batch, k in {1, 2}, no compile)."""
    if not dry_run:
        return CheckSettings(dry_run=False, device="cuda", models=MODELS, variants=_variants((1, 2, 4, 8)))
    # train.epochs=5: 20 smoke steps leave 5 distinct trajectory checkpoints, which trak's default asks for
    return CheckSettings(dry_run=True, device="cpu", detect_overrides=("experiment=smoke", "train.epochs=5",
                                                                      "threads=1"),
                         models=MODELS, batch=4, warmup_steps=1, timed_steps=2, flop_batch=2,
                         variants=_variants((1, 2)), torchrun=False, timeout_s=300.0,
                         skip_compile="dry run on CPU: inductor takes minutes to compile these models on a CPU; "
                                      "the GPU check runs it")


def cuda_missing_reason() -> str | None:
    """None when a CUDA device is usable, else one line saying why the check cannot run."""
    if torch.cuda.is_available():
        return None
    built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"no CUDA device visible (torch {torch.__version__}, {built}); the GPU check needs one "
            f"(--dry-run runs its CPU smoke version)")


def _say(message: str) -> None:
    """One progress line per stage, silent under CI."""
    if not os.environ.get("CI"):
        print(f"[gpu-check] {message}", flush=True)


def _finite(value: Any) -> float | None:
    """A JSON-safe float: None for missing, NaN or infinite values (JSON has no NaN)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------ committed CPU records

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    """A run's resolved ``config.yaml`` as plain dicts; empty when missing or unreadable (matching then rests on
    the record fields alone)."""
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 (OSError, or one of the YAML parser's / OmegaConf's several error types)
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _same(a: Any, b: Any) -> bool:
    """Equal values, numbers compared as floats (older records stored ``10000.0`` for 10000)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _config_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, list[Any]]:
    """``section.key -> [ours, theirs]`` for the shared keys of ``CONFIG_SECTIONS`` whose values differ."""
    diff: dict[str, list[Any]] = {}
    for section in CONFIG_SECTIONS:
        a, b = ours.get(section) or {}, theirs.get(section) or {}
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        for key in sorted(set(a) & set(b)):
            if not _same(a[key], b[key]):
                diff[f"{section}.{key}"] = [a[key], b[key]]
    return diff


def find_reference(record: dict[str, Any], config: dict[str, Any], pattern: str,
                   match: tuple[str, ...] = DETECT_MATCH) -> dict[str, Any]:
    """The committed record of the same setting as ``record``.

    Candidates are the ``metrics.json`` files under ``pattern`` (a glob) whose ``match`` fields all equal
    ``record``'s; among several, the one whose ``config.yaml`` agrees with ``config`` on the most shared keys wins
    (a tie is ambiguous and gives no reference).

    Args:
        record: the device run's metrics.
        config: the device run's resolved ``config.yaml`` (a dict; may be empty).
        pattern: e.g. ``<repo>/results/detect/*/*/metrics.json``.
        match: the fields that must agree.

    Returns:
        ``{"path", "metrics", "config_diff"}`` with ``path`` None and a ``reason`` when there is none.
    """
    wanted = {k: record.get(k) for k in match}
    if any(v is None for v in wanted.values()):
        missing = sorted(k for k, v in wanted.items() if v is None)
        return {"path": None, "metrics": None, "reason": f"the device record lacks {missing}"}
    candidates = []
    for path in sorted(glob.glob(pattern)):
        metrics = _read_json(Path(path))
        if metrics and all(_same(metrics.get(k), v) for k, v in wanted.items()):
            diff = _config_diff(config, _read_yaml(Path(path).with_name("config.yaml")))
            candidates.append((len(diff), path, metrics, diff))
    if not candidates:
        return {"path": None, "metrics": None, "reason": f"no committed record with {wanted}"}
    candidates.sort(key=lambda c: c[0])
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        tied = [c[1] for c in candidates if c[0] == candidates[0][0]]
        return {"path": None, "metrics": None, "reason": f"ambiguous: {tied} match equally"}
    _, path, metrics, diff = candidates[0]
    return {"path": path, "metrics": metrics, "config_diff": diff}


def compare(device: dict[str, Any], cpu: dict[str, Any] | None,
            tolerance: dict[str, float] = TOLERANCE) -> dict[str, Any]:
    """Device minus CPU for each metric of ``tolerance`` that the device record holds, and whether each difference
    lies within it.

    Returns:
        ``{"delta": {m: d}, "within": {m: bool}, "within_tolerance": bool}``, the values None without a CPU record.
    """
    delta, within = {}, {}
    for metric, tol in ((m, t) for m, t in tolerance.items() if m in device):
        a, b = _finite(device.get(metric)), _finite((cpu or {}).get(metric))
        delta[metric] = None if a is None or b is None else a - b
        within[metric] = None if delta[metric] is None else abs(delta[metric]) <= tol
    flags = list(within.values())
    return {"delta": delta, "within": within,
            "within_tolerance": None if any(f is None for f in flags) else all(flags)}


# ------------------------------------------------------------------ the entry points as subprocesses

def _run_cli(args: list[str], cwd: Path, log: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``sys.executable args`` in ``cwd``, output to ``log``; returns rc, wall, the command and on failure the
    tail of the output."""
    env = dict(os.environ, GEX_QUIET="1", WANDB_MODE="offline", WANDB_SILENT="true")
    cmd = [sys.executable, *args]
    start = time.perf_counter()
    with open(log, "wb") as handle:
        try:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = None
    result = {"command": " ".join(["python", *args]), "rc": rc, "wall_s": time.perf_counter() - start}
    if rc != 0:
        text = Path(log).read_text(errors="replace")
        result["output_tail"] = text[-TAIL_CHARS:]
        result["error"] = f"timed out after {timeout_s:.0f} s" if rc is None else f"exit status {rc}"
    return result


def _pick(metrics: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float | None]:
    return {k: _finite(metrics.get(k)) for k in keys}


def _detection_entry(run_dir: Path, results: Path) -> dict[str, Any]:
    """The device metrics of one detect run, its committed CPU counterpart and the comparison."""
    metrics = _read_json(run_dir / "metrics.json") or {}
    ref = find_reference(metrics, _read_yaml(run_dir / "config.yaml"), str(results / "detect/*/*/metrics.json"))
    cpu = ref["metrics"]
    return {"status": "ok", "device": _pick(metrics, GPU_DETECT_KEYS),
            "cpu": None if cpu is None else _pick(cpu, GPU_DETECT_KEYS),
            "cpu_record": _relative(ref["path"], results.parent), "cpu_missing_reason": ref.get("reason"),
            "cpu_config_diff": ref.get("config_diff"), **compare(metrics, cpu)}


def _relative(path: str | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def detection(settings: CheckSettings, repo: Path, work: Path, results: Path | None = None) -> dict[str, Any]:
    """Pretrain theta* and run the detection methods on ``settings.device`` through the entry points.

    Args:
        settings: the check's settings.
        repo: the repository root (working directory of the subprocesses).
        work: scratch folder for the Hydra runs and the artefact cache (fresh: pretraining is measured).
        results: the committed results (default ``repo / "results"``).

    Returns:
        The ``detection`` part of the record.
    """
    results = results or repo / "results"
    cache = work / "cache"
    common = [f"paths.cache={cache}", "logger=none", f"device={settings.device}", *settings.detect_overrides]
    out: dict[str, Any] = {"overrides": list(settings.detect_overrides), "methods": {}}

    _say(f"pretraining theta* on {settings.device}")
    pre_dir = work / "pretrain"
    run = _run_cli(["-m", "experiments.pretrain", f"hydra.run.dir={pre_dir}", *common], repo,
                   work / "pretrain.log", settings.timeout_s)
    pre = _read_json(pre_dir / "metrics.json")
    entry: dict[str, Any] = {"run": run, "status": "ok" if run["rc"] == 0 and pre else "failed"}
    if pre:
        ref = find_reference(pre, _read_yaml(pre_dir / "config.yaml"), str(results / "pretrain/*/metrics.json"),
                             PRETRAIN_MATCH)
        entry |= {"device": _pick(pre, GPU_PRETRAIN_KEYS),
                  "cpu": None if ref["metrics"] is None else _pick(ref["metrics"], GPU_PRETRAIN_KEYS),
                  "cpu_record": _relative(ref["path"], results.parent), "cpu_missing_reason": ref.get("reason")}
    out["pretrain"] = entry
    if entry["status"] != "ok":
        out["detect_run"] = {"status": "skipped", "reason": "pretraining failed"}
        out["methods"] = {m: {"status": "missing", "reason": "pretraining failed"} for m in settings.methods}
        out["torchrun"] = {"status": "skipped", "reason": "pretraining failed"}
        return out

    _say(f"detection on {settings.device}: {', '.join(settings.methods)}")
    sweep = work / "detect"
    run = _run_cli(["-m", "experiments.detect", "-m", f"method={','.join(settings.methods)}",
                    f"hydra.sweep.dir={sweep}", *common], repo, work / "detect.log", settings.timeout_s)
    out["detect_run"] = run
    found = {}
    for path in sorted(sweep.glob("*/metrics.json")):
        method = (_read_json(path) or {}).get("method")
        if method:
            found[method] = path.parent
    for method in settings.methods:
        out["methods"][method] = (_detection_entry(found[method], results) if method in found else
                                  {"status": "missing", "reason": run.get("error", "no metrics.json written")})
    out["torchrun"] = _torchrun(settings, repo, work, common, out["methods"].get("gex"))
    return out


def _torchrun(settings: CheckSettings, repo: Path, work: Path, common: list[str],
              single: dict[str, Any] | None) -> dict[str, Any]:
    """GEX by two ``torchrun`` processes (NCCL) on the cached theta*, against the one-process run."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not settings.torchrun or settings.device != "cuda":
        return {"status": "skipped", "reason": f"needs two CUDA devices (device={settings.device}, dry run)"}
    if count < 2:
        return {"status": "skipped", "reason": f"needs two CUDA devices, found {count}"}
    _say("torchrun: gex in two processes (NCCL)")
    run_dir = work / "torchrun"
    run = _run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "experiments.detect", "method=gex", f"hydra.run.dir={run_dir}", *common], repo,
                   work / "torchrun.log", settings.timeout_s)
    metrics = _read_json(run_dir / "metrics.json")
    if run["rc"] != 0 or not metrics:
        return {"status": "failed", "run": run, "reason": run.get("error", "no metrics.json written")}
    return {"status": "ok", "run": run, "device": _pick(metrics, GPU_DETECT_KEYS),
            "one_process": None if not single else single.get("device"),
            **compare(metrics, None if not single else single.get("device"))}


# ------------------------------------------------------------------ throughput of the training step

def _synthetic(spec: ModelSpec, batch: int, device: torch.device, distinct: int = 2) -> list[Batch]:
    """``distinct`` random batches on ``device`` (seeded), cycled by the streams: no data loading is timed."""
    gen = torch.Generator().manual_seed(0)
    return [Batch(rows=torch.arange(batch, device=device),
                  x=torch.randn(batch, *spec.input_shape, generator=gen).to(device),
                  y=torch.randint(spec.num_classes, (batch,), generator=gen).to(device), targets=None, weights=None)
            for _ in range(distinct)]


def train_flops_per_sample(spec: ModelSpec, device: torch.device, batch: int) -> float:
    """FLOPs of one training step's forward + backward per sample, counted by ``FlopCounterMode`` at ``batch``.

    Convolution and matrix-product FLOPs are linear in the batch, so a small counted batch gives the per-sample
    count of any batch.
    """
    model = build_model(spec.name, spec.input_shape, spec.num_classes, seed=0).to(device).train()
    data = _synthetic(spec, batch, device, distinct=1)[0]
    with FlopCounterMode(display=False) as counter:
        per_sample_loss(model(data.x), data.y, "ce").mean().backward()
    return counter.get_total_flops() / batch


class _StepClock:
    """``on_step`` callback: synchronized timestamps after the last warm-up step and after the last step."""

    def __init__(self, device: torch.device, warmup: int, total: int):
        self.device, self.warmup, self.total = device, warmup, total
        self.start = time.perf_counter()
        self.warm: float | None = None
        self.end: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, step: int, batch: Batch, logits: torch.Tensor, lr: float) -> None:
        # stacked_sgd_steps calls once per member: only the first call of a step reads the clock
        if step == self.warmup - 1 and self.warm is None:
            self.warm = self._now()
        elif step == self.total - 1 and self.end is None:
            self.end = self._now()


def _skip_reason(variant: Variant, settings: CheckSettings, device: torch.device) -> str | None:
    if variant.compile and settings.skip_compile:
        return settings.skip_compile
    if variant.amp_bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support"
    return None


def _steps(variant: Variant, settings: CheckSettings) -> tuple[int, int]:
    """(warm-up, timed) steps of a variant. A step of k members does k models' work, so fewer of them time as
    precisely (at least 2); their warm-up compiles nothing (vmapped steps are never compiled), so 2 steps do."""
    if not variant.members:
        return settings.warmup_steps, settings.timed_steps
    return min(settings.warmup_steps, 2), max(2, settings.timed_steps // variant.members)


def measure_variant(spec: ModelSpec, variant: Variant, settings: CheckSettings, device: torch.device,
                    flops_per_sample: float | None) -> dict[str, Any]:
    """Steps per second of one variant (warm-up steps untimed, then timed steps; see ``_steps``), its achieved
    TFLOP/s and the projected wall of the paper's ``PAPER_MEMBERS x PAPER_STEPS`` member-steps.

    A variant the device or the project refuses (bf16 off CUDA, switches under vmap) or that fails (out of memory,
    a compiler error) is returned with ``status`` ``skipped`` / ``failed`` and a one-line ``reason``.
    """
    row: dict[str, Any] = {"variant": variant.name, **dataclasses.asdict(variant)}
    reason = _skip_reason(variant, settings, device)
    if reason:
        return row | {"status": "skipped", "reason": reason}
    warmup, timed = _steps(variant, settings)
    total = warmup + timed
    row |= {"warmup_steps": warmup, "timed_steps": timed}
    recipe = TrainConfig(epochs=1, steps=total, batch_size=settings.batch, lr=settings.lr, momentum=0.9,
                         weight_decay=5e-4, warmup_frac=0.0, schedule="warmup_cosine", amp_bf16=variant.amp_bf16,
                         channels_last=variant.channels_last, compile=variant.compile)
    if device.type == "cuda":  # the previous variant's tensors are gone: start from an empty pool and peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    batches = _synthetic(spec, settings.batch, device)
    clock = None
    try:
        if variant.members:
            models = [build_model(spec.name, spec.input_shape, spec.num_classes, seed=j)
                      for j in range(variant.members)]
            stacked = stack_states(models[0], [snapshot(m) for m in models], device)
            container = models[0].to(device)
            clock = _StepClock(device, warmup, total)
            stacked_sgd_steps(container, stacked, [itertools.cycle(batches) for _ in range(variant.members)],
                              total, recipe, on_step=clock, desc=variant.name)
        else:
            model = build_model(spec.name, spec.input_shape, spec.num_classes, seed=0).to(device)
            clock = _StepClock(device, warmup, total)
            sgd_steps(model, itertools.cycle(batches), total, recipe, on_step=clock, desc=variant.name)
    except ValueError as err:  # the project refuses the combination (e.g. bf16 autocast off CUDA)
        return row | {"status": "skipped", "reason": str(err).splitlines()[0]}
    except Exception as err:  # noqa: BLE001 (out of memory, a compiler failure: recorded, the others still run)
        first = (str(err).splitlines() or [""])[0]
        return row | {"status": "failed", "reason": f"{type(err).__name__}: {first}"}
    seconds = clock.end - clock.warm
    steps_per_s = timed / seconds
    member_steps_per_s = steps_per_s * max(1, variant.members)
    samples_per_s = member_steps_per_s * settings.batch
    return row | {
        "status": "ok", "warmup_s": clock.warm - clock.start, "timed_s": seconds, "steps_per_s": steps_per_s,
        "member_steps_per_s": member_steps_per_s, "samples_per_s": samples_per_s,
        "tflops": None if flops_per_sample is None else samples_per_s * flops_per_sample / 1e12,
        "projected_wall_s": PAPER_MEMBERS * PAPER_STEPS / member_steps_per_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def throughput(settings: CheckSettings, device: torch.device) -> dict[str, Any]:
    """The ``throughput`` part of the record: per model, FLOPs per sample, one row per variant, the best row."""
    out: dict[str, Any] = {}
    for spec in settings.models:
        _say(f"throughput: {spec.label}, batch {settings.batch}")
        start = time.perf_counter()
        flops = train_flops_per_sample(spec, device, settings.flop_batch)
        rows = []
        for variant in settings.variants:
            rows.append(measure_variant(spec, variant, settings, device, flops))
            if variant.compile and rows[-1]["status"] != "skipped":
                import torch._dynamo  # already loaded by the compile; imported here only to name it
                torch._dynamo.reset()  # frees the compiled graphs before the next variants
        ok = [r for r in rows if r["status"] == "ok"]
        best = max(ok, key=lambda r: r["member_steps_per_s"]) if ok else None
        out[spec.name] = {
            "label": spec.label, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes,
            "batch": settings.batch, "params": count_parameters(build_model(spec.name, spec.input_shape,
                                                                            spec.num_classes)),
            "flops_per_sample": flops, "flop_batch": settings.flop_batch, "rows": rows,
            "best": None if best is None else best["variant"],
            "projected_wall_s": None if best is None else best["projected_wall_s"],
            "goal_s": GOAL_WALL_S,
            "meets_goal": None if best is None else best["projected_wall_s"] <= GOAL_WALL_S,
            "wall_s": time.perf_counter() - start}
    return out


# ------------------------------------------------------------------ the record and the table

def _git(repo: Path) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"


def _environment(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else
            (platform.processor() or platform.machine() or "cpu"),
            "device_count": torch.cuda.device_count() if cuda else 0,
            "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
            "torch_threads": torch.get_num_threads(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}


def _failures(record: dict[str, Any]) -> list[str]:
    """What did not run as it should: failed subprocesses, missing methods, failed variants."""
    det, failed = record["detection"], []
    if det["pretrain"]["status"] != "ok":
        failed.append("pretrain")
    failed += [f"detect:{m}" for m, e in det["methods"].items() if e["status"] != "ok"]
    if det["torchrun"]["status"] == "failed":
        failed.append("torchrun")
    for name, part in record["throughput"].items():
        failed += [f"{name}:{r['variant']}" for r in part["rows"] if r["status"] == "failed"]
    return failed


def run_check(settings: CheckSettings, repo: Path) -> dict[str, Any]:
    """Run the whole check and return the record (nothing written; see ``write_outputs``)."""
    device = torch.device(settings.device)
    start = time.perf_counter()
    record: dict[str, Any] = {
        "kind": "gpu_check", "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dry_run": settings.dry_run, "git": _git(repo), "environment": _environment(device),
        "settings": dataclasses.asdict(settings),
        "tolerance": dict(TOLERANCE) | {"source": "the cross-CPU spread of AUROC / AP measured for one seed"},
        "paper": {"members": PAPER_MEMBERS, "steps": PAPER_STEPS, "batch": 1024, "goal_s": GOAL_WALL_S}}
    with tempfile.TemporaryDirectory(prefix="gex-gpu-check-") as work:
        record["detection"] = detection(settings, repo, Path(work))
    record["detection"]["wall_s"] = time.perf_counter() - start
    record["throughput"] = throughput(settings, device)
    record["failed"] = _failures(record)
    record["wall_s"] = time.perf_counter() - start
    return record


def _num(value: Any, fmt: str = ".4f") -> str:
    return "—" if value is None else format(value, fmt)


def _delta(value: Any) -> str:
    return "—" if value is None else f"{value:+.4f}"


def _yes(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "**no**")


def render_table(record: dict[str, Any]) -> str:
    """The Markdown report of a record: detection next to the CPU records, then one throughput table per model."""
    env, det, tol = record["environment"], record["detection"], record["tolerance"]
    lines = [f"# GPU check: {env['device_name']}" + (" (dry run on CPU)" if record["dry_run"] else ""), "",
             f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; git {record['git']}; "
             f"{record['created_utc']}; total {record['wall_s']:.0f} s.", ""]
    overrides = " ".join(det["overrides"]) or "the defaults"
    lines += ["## Detection on the device vs the committed CPU records (same seed)", "",
              f"Setting: {overrides}. Within tolerance = |AUROC diff| <= {tol['auroc']} and |AP diff| <= "
              f"{tol['ap']} ({tol['source']}).", "",
              "| method | AUROC device | AUROC CPU | diff | AP device | AP CPU | diff | within | fit s device | "
              "fit s CPU | score s device | score s CPU |", "|---|" + "---:|" * 11]
    for method, e in det["methods"].items():
        if e["status"] != "ok":
            lines.append(f"| {method} | {e['status']}: {e.get('reason', '')} |" + " |" * 10)
            continue
        g, c = e["device"], e["cpu"] or {}
        lines.append(f"| {method} | {_num(g['auroc'])} | {_num(c.get('auroc'))} | {_delta(e['delta']['auroc'])} | "
                     f"{_num(g['ap'])} | {_num(c.get('ap'))} | {_delta(e['delta']['ap'])} | "
                     f"{_yes(e['within_tolerance'])} | {_num(g['wall_s_fit'], '.1f')} | "
                     f"{_num(c.get('wall_s_fit'), '.1f')} | {_num(g['wall_s_score'], '.1f')} | "
                     f"{_num(c.get('wall_s_score'), '.1f')} |")
    pre = det["pretrain"]
    lines += ["", "| pretraining theta* | train acc | noisy fit | test acc | wall s |", "|---|---:|---:|---:|---:|"]
    if pre["status"] == "ok":
        for label, values in (("device", pre.get("device")), ("CPU", pre.get("cpu"))):
            v = values or {}
            lines.append(f"| {label} | {_num(v.get('train_acc'))} | {_num(v.get('noisy_fit'))} | "
                         f"{_num(v.get('test_acc'))} | {_num(v.get('wall_s'), '.1f')} |")
    else:
        lines.append(f"| device | failed: {pre['run'].get('error', '')} | | | |")
    refs = sorted({e.get("cpu_record") for e in det["methods"].values() if e.get("cpu_record")})
    lines += ["", f"CPU records: {', '.join(refs) or 'none match this setting'}"
                  + (f"; pretraining: {pre['cpu_record']}" if pre.get("cpu_record") else "")
                  + f". Detection part: {det['wall_s']:.0f} s.", ""]
    tr = det["torchrun"]
    if tr["status"] == "ok":
        lines.append(f"torchrun, 2 processes (NCCL), gex: AUROC {_num(tr['device']['auroc'])} / AP "
                     f"{_num(tr['device']['ap'])}, diff to one process {_delta(tr['delta']['auroc'])} / "
                     f"{_delta(tr['delta']['ap'])}, within: {_yes(tr['within_tolerance'])}; wall "
                     f"{_num(tr['run']['wall_s'], '.1f')} s.")
    else:
        lines.append(f"torchrun, 2 processes (NCCL): {tr['status']}: {tr.get('reason', '')}.")
    paper = record["paper"]
    for part in record["throughput"].values():
        lines += ["", f"## SGD steps: {part['label']}, batch {part['batch']} per member", "",
                  f"{part['params']:,} parameters; {part['flops_per_sample'] / 1e9:.3f} GFLOP per sample for "
                  f"forward + backward (FlopCounterMode). Projected wall = {paper['members']} members x "
                  f"{paper['steps']} steps / member-steps per s (SGD steps only). Measured in "
                  f"{part['wall_s']:.0f} s.", "",
                  "| setting | steps/s | member-steps/s | samples/s | TFLOP/s | M x steps wall s | peak GiB | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in part["rows"]:
            status = "ok" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            lines.append(f"| {r['variant']} | {_num(r.get('steps_per_s'), '.2f')} | "
                         f"{_num(r.get('member_steps_per_s'), '.2f')} | {_num(r.get('samples_per_s'), ',.0f')} | "
                         f"{_num(r.get('tflops'), '.2f')} | {_num(r.get('projected_wall_s'), ',.0f')} | "
                         f"{_num(r.get('peak_mem_gib'), '.1f')} | {status} |")
        if part["best"] is None:
            lines += ["", "Best: none ran."]
        else:
            verdict = "meets" if part["meets_goal"] else "misses"
            lines += ["", f"Best: {part['best']}, projected {part['projected_wall_s']:,.0f} s for "
                          f"{paper['members']} x {paper['steps']} steps: {verdict} the {part['goal_s']:.0f} s goal."]
    if record["failed"]:
        lines += ["", f"Failed: {', '.join(record['failed'])}."]
    return "\n".join(lines) + "\n"


def write_outputs(record: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``record.json`` and ``table.md`` into ``out`` atomically; returns their paths."""
    out = Path(out)
    record_path, table_path = out / RECORD_NAME, out / TABLE_NAME
    atomic_write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", record_path)
    atomic_write_text(render_table(record), table_path)
    return record_path, table_path
