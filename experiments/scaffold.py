"""Run scaffolding shared by every entry point: typed settings from the Hydra config, the method registry, theta*
as a task, the W&B logger, the run record, and ``start_run`` / ``finish_run`` around a task's own logic.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, build_method
from gex.data import DataBundle, DataConfig, NoiseConfig, load_data
from gex.distributed import main_first, same_on_ranks
from gex.models import ModelConfig
from gex.pipeline import pretrained_task
from gex.runs import ArtifactCache, atomic_save, atomic_write_text
from gex.train import TrainConfig
from gex.utils import peak_mem_mb, resolve_device, seed_everything, stage_timer

__all__ = ["UsageError", "typed_config", "task_config", "Settings", "settings_from", "load_task", "register_methods",
           "method_from_cfg", "has_pairwise", "require_pairwise", "RunLogger", "RunRecord", "versions", "TaskRun",
           "start_run", "record_fields", "finish_run"]

log = logging.getLogger("gex")


class UsageError(ValueError):
    """A bad request from the command line (impossible option, conflicting run directory, ...)."""


def typed_config(cls, node: Any, key: str):
    """Build dataclass ``cls`` from a config node; unknown keys are a one-line error listing the valid ones."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(f'{key}.{k}' for k in unknown)}; valid keys: {sorted(valid)}")
    return cls(**values)


def task_config(node: Any, job: str, cls: type):
    """The typed options ``cls`` of ``job`` from ``cfg.task``; a task meant for another entry point is a one-line
    error."""
    name = node.get("name") if node is not None else None
    if name != job:
        raise UsageError(f"task={name!r} does not fit python -m experiments.{job}; "
                         f"use task={job}, or python -m experiments.{name} for task={name}")
    return typed_config(cls, node, "task")


@dataclass
class Settings:
    """The typed view of a composed config: what every entry point builds objects from."""

    data: DataConfig
    noise: NoiseConfig
    model: ModelConfig
    train: TrainConfig
    seed: int
    device: torch.device
    cache: ArtifactCache


def settings_from(cfg: DictConfig) -> Settings:
    """Validate the shared groups; raises a one-line ``ValueError`` on any bad name or value."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    return Settings(data=typed_config(DataConfig, cfg.data, "data"), noise=typed_config(NoiseConfig, cfg.noise, "noise"),
                    model=typed_config(ModelConfig, cfg.model, "model"), train=typed_config(TrainConfig, cfg.train, "train"),
                    seed=int(cfg.seed), device=resolve_device(str(cfg.device)),
                    cache=ArtifactCache(cfg.paths.cache))


def load_task(s: Settings, logger: "RunLogger | None" = None) -> tuple[DataBundle, InfluenceTask]:
    """Data, then theta* (trained or reused from the cache), as an InfluenceTask."""
    seed_everything(s.seed)
    bundle = load_data(s.data, s.noise, s.seed)
    log_fn = (lambda row: logger.log({f"pretrain/{k}": v for k, v in row.items()})) if logger else None
    with main_first():  # under torchrun rank 0 trains and caches theta*, then the other ranks load it
        task = pretrained_task(bundle, s.model, s.train, seed=s.seed,
                               device=s.device, cache=s.cache, log_fn=log_fn)
    if not same_on_ranks(_fingerprint(task.model)):
        raise UsageError(f"the ranks hold different theta* (paths.cache={s.cache.root} is not shared by every "
                         f"rank?); put paths.cache on a filesystem every rank sees, or pretrain in one process first")
    return bundle, task


def _fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Sum and sum of squares of every state tensor, float64 ``(2 * len(state_dict),)``: equal models agree."""
    values = [v.detach().double() for v in model.state_dict().values()]
    return torch.stack([v.sum() for v in values] + [v.pow(2).sum() for v in values]).cpu()


def register_methods() -> None:
    """Import every method module, so the registry is complete (baselines/ and the GEX family)."""
    import baselines  # noqa: F401  (imports each baselines/<method>.py and the GEX family)


def method_from_cfg(node: Any) -> Attributor:
    """``build_method(cfg.method.name, **other keys)``; a bad option is a one-line ``MethodError``."""
    register_methods()
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    name = values.pop("name", None)
    try:
        return build_method(name, **values)
    except TypeError as err:  # an option the constructor does not take
        raise MethodError(f"method={name}: {err}; check configs/method/{name}.yaml") from None


def has_pairwise(method: Attributor) -> bool:
    """Whether the method has a pairwise form, decided before any work.

    No override of ``influence``/``influence_on_mean_test`` means none. A subclass may also override them only to
    refuse (e.g. ``gex_mean_loss``); probing the unfitted method shows that at no cost, since a real pairwise
    method first asks for ``fit`` (any error other than ``NotImplementedError`` counts as "has one").
    """
    cls = type(method)
    if (cls.influence is Attributor.influence
            and cls.influence_on_mean_test is Attributor.influence_on_mean_test):
        return False
    try:
        method.influence_on_mean_test(None, None)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001  (the usual answer before fit: "call fit(task) before scoring")
        return True
    return True


def require_pairwise(method: Attributor, option: str, fix: str) -> None:
    """Fail before any work when ``option`` asks a method without a pairwise form for one."""
    if not has_pairwise(method):
        raise MethodError(f"{option} needs pairwise influence, which method={method.name} does not have; {fix}")


class RunLogger:
    """W&B, offline by default; ``mode=disabled`` makes every call a no-op. Never touches the network offline."""

    def __init__(self, cfg: DictConfig, run_dir: Path, job: str):
        self.run = None
        self.cfg, self.run_dir, self.job = cfg, run_dir, job
        lcfg = cfg.get("logger") or {}
        self.mode = str(lcfg.get("mode", "disabled"))
        if self.mode not in ("online", "offline", "disabled"):
            raise UsageError(f"logger.mode={self.mode!r} is unknown; valid choices: ['disabled', 'offline', 'online']")

    def _start(self) -> bool:
        """Start W&B at the first thing logged, so that a run that fails validation leaves nothing behind."""
        if self.run is None and self.mode != "disabled":
            import wandb  # imported lazily: a disabled logger costs nothing
            os.environ.setdefault("WANDB_SILENT", "true")
            lcfg = self.cfg.logger
            self.run = wandb.init(mode=self.mode, dir=str(self.run_dir), project=lcfg.get("project", "gex-bench"),
                                  entity=lcfg.get("entity"), group=lcfg.get("group"),
                                  tags=list(lcfg.get("tags") or []), job_type=self.job,
                                  config=OmegaConf.to_container(self.cfg, resolve=True),
                                  settings=wandb.Settings(console="off", x_disable_stats=True))
        return self.run is not None

    def log(self, row: dict[str, Any]) -> None:
        if self._start():
            self.run.log(row)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self._start():
            self.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})

    def image(self, name: str, path: Path) -> None:
        if self._start():
            import wandb
            self.run.log({name: wandb.Image(str(path))})

    def table(self, name: str, frame) -> None:
        if self._start():
            import wandb
            self.run.log({name: wandb.Table(dataframe=frame)})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _git_revision(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """HEAD's short hash in ``root``, with ``-dirty`` when tracked code differs from it; "" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=5).stdout.strip()
    try:
        rev = git("rev-parse", "--short", "HEAD")
        code = ("gex", "baselines", "experiments", "configs")  # results/ and docs do not change what runs
        return rev + ("-dirty" if rev and git("status", "--porcelain", "--untracked-files=no", "--", *code) else "")
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def loaded_revision() -> str:
    """The revision of the code this process loaded: read once, as an entry point starts (``entry_point``), so a
    record names it even if the checkout moved on during the run; not at import (no git calls for library users)."""
    return _git_revision()


def versions() -> dict[str, str]:
    """Library versions and git revision for the record."""
    return {"torch": torch.__version__, "python": platform.python_version(), "git": loaded_revision() or "unknown",
            "host_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"}


class RunRecord:
    """A run directory: ``config.yaml`` (resolved), ``metrics.json``, ``scores.pt`` and figures.

    Refuses a directory that already holds a finished run with a different config (nothing is overwritten).
    """

    def __init__(self, run_dir: Path, cfg: DictConfig):
        self.dir = Path(run_dir)
        self.config_text = OmegaConf.to_yaml(cfg, resolve=True)
        existing = self.dir / "config.yaml"
        if (self.dir / "metrics.json").exists() and existing.exists() and existing.read_text() != self.config_text:
            raise UsageError(f"{self.dir} already holds a finished run with a different config; "
                             f"choose another hydra.run.dir or delete it")

    def write(self, metrics: dict[str, Any], scores: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the record atomically: scores first, metrics.json last (its presence marks a finished run)."""
        atomic_write_text(self.config_text, self.dir / "config.yaml")
        if scores is not None:
            atomic_save({k: v.detach().cpu() for k, v in scores.items()}, self.dir / "scores.pt")
        clean = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        atomic_write_text(json.dumps(clean, indent=2, sort_keys=True), self.dir / "metrics.json")
        return self.dir / "metrics.json"


@dataclass
class TaskRun:
    """What ``start_run`` built: typed settings, the run record, the fitted method, the data and theta*."""

    settings: Settings
    record: RunRecord
    method: Attributor
    bundle: DataBundle
    task: InfluenceTask
    times: dict[str, float]
    started: float


def start_run(cfg: DictConfig, run_dir: Path, logger: RunLogger, *, pairwise: Optional[tuple[str, str]] = None,
              check: Optional[Callable[[DataBundle], None]] = None) -> TaskRun:
    """Validate, then load theta* and fit the method (timed into ``times['fit']``).

    Args:
        cfg: the composed config.
        run_dir: the Hydra run directory (refused if it holds a finished run with another config).
        logger: W&B logger (pretraining curves go there).
        pairwise: ``(option, fix)`` when the task needs pairwise influence: checked before anything runs.
        check: called on the data before fitting (e.g. "are there noisy samples?").
    """
    started = time.perf_counter()
    settings = settings_from(cfg)
    record = RunRecord(run_dir, cfg)
    method = method_from_cfg(cfg.method)
    if pairwise is not None:
        require_pairwise(method, *pairwise)
    bundle, task = load_task(settings, logger)
    if check is not None:
        check(bundle)
    times: dict[str, float] = {}
    with stage_timer(times, "fit", settings.device):
        method.fit(task)
    log.info("[%s] fit in %.1fs", method.name, times["fit"])
    return TaskRun(settings, record, method, bundle, task, times, started)


def record_fields(cfg: DictConfig, run: TaskRun, job: str) -> dict[str, Any]:
    """The fields every task's ``metrics.json`` holds besides its metrics, and the method's diagnostics (GEX: the
    share of samples its clamp inverts, ``frac_clamp_inverted``, among others)."""
    s = run.settings
    return run.method.diagnostics() | {"method": run.method.name, "data": s.data.name, "model": s.model.name, "seed": s.seed, "task": job,
            "noise_kind": s.noise.kind, "noise_rate": s.noise.rate, "n_train": len(run.task.train),
            "wall_s_pretrain": run.task.pretrain_wall_s, "wall_s_fit": run.times.get("fit", 0.0),
            "wall_s_score": run.times.get("score", 0.0), "wall_s": time.perf_counter() - run.started,
            "peak_mem_mb": peak_mem_mb(s.device)} | versions()


def finish_run(run: TaskRun, logger: RunLogger, metrics: dict[str, Any], scores: dict[str, Tensor],
               figures: dict[str, Path]) -> dict[str, Any]:
    """Log the figures to W&B and write the record (metrics.json last: it marks a finished run)."""
    for name, path in figures.items():
        logger.image(name, path)
    run.record.write(metrics, scores)
    return metrics
