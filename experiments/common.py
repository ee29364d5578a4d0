"""Wiring shared by every entry point: typed configs from Hydra, the W&B logger, run records, one-line errors."""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from gex.attribution import InfluenceTask, MethodError
from gex.data import DataBundle, DataConfig, NoiseConfig, load_data
from gex.distributed import DistInfo, barrier, distributed_context, main_first, same_on_ranks
from gex.models import ModelConfig
from gex.pipeline import pretrained_task
from gex.runs import ArtifactCache, ArtifactError, atomic_save, atomic_write_text
from gex.train import TrainConfig
from gex.utils import resolve_device, seed_everything

__all__ = ["Settings", "settings_from", "typed_config", "RunLogger", "RunRecord", "entry_point", "load_task", "UsageError",
           "versions"]

log = logging.getLogger("gex")

# Collective timeout under torchrun (seconds): the other ranks wait at a barrier while rank 0 pretrains theta*,
# so it must exceed the longest pretraining; GEX_DIST_TIMEOUT_S overrides it.
DIST_TIMEOUT_S = 24 * 3600.0


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


def _remove_if_empty(path: Path) -> None:
    try:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    except OSError:
        pass


def _dist_timeout_s() -> float:
    """``GEX_DIST_TIMEOUT_S`` when set, else ``DIST_TIMEOUT_S``."""
    value = os.environ.get("GEX_DIST_TIMEOUT_S", "")
    try:
        return float(value) if value else DIST_TIMEOUT_S
    except ValueError:
        raise UsageError(f"GEX_DIST_TIMEOUT_S={value!r} is not a number of seconds; unset it or give e.g. 7200") from None


def _run_job(fn: Callable, job: str, cfg: DictConfig, run_dir: Path, info: DistInfo) -> None:
    """One rank's run: build the logger, call ``fn``, turn bad input into one line and exit status 2.

    Only rank 0 logs to W&B and announces the run directory; the others get a disabled logger.
    """
    logger, ok, start = None, False, time.perf_counter()
    try:
        logger = RunLogger(cfg, run_dir, job)
        if not info.is_main:
            logger.mode = "disabled"
        metrics = fn(cfg, run_dir, logger)
        logger.summary(metrics)
        ok = True
    except (ValueError, FileNotFoundError, NotImplementedError, ArtifactError, MethodError) as err:
        print(f"error: {err}" if info.world_size == 1 else f"error (rank {info.rank}): {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if logger is not None:
            logger.finish()
        if ok and info.is_main:
            print(f"[{job}] done in {time.perf_counter() - start:.1f}s; run written to {run_dir}")
        elif not ok:
            _remove_if_empty(run_dir)


def _run_other_rank(fn: Callable, job: str, cfg: DictConfig, hydra_dir: Path, info: DistInfo) -> None:
    """A non-zero rank computes like rank 0 but writes into a scratch folder that is deleted afterwards; the
    Hydra run directory it was given (its own when the timestamps differ, else rank 0's) is removed if empty."""
    try:
        with tempfile.TemporaryDirectory(prefix=f"gex-{job}-rank{info.rank}-") as scratch:
            _run_job(fn, job, cfg, Path(scratch), info)
        barrier()  # rank 0 has written its record: a directory shared with it is not empty any more
    finally:
        _remove_if_empty(hydra_dir)


def entry_point(job: str) -> Callable[[Callable[[DictConfig, Path, RunLogger], dict]], Callable[[DictConfig], None]]:
    """Wrap ``fn(cfg, run_dir, logger) -> metrics`` for ``hydra.main``.

    Bad input (any ``ValueError``/``FileNotFoundError``/``NotImplementedError`` raised while building or running)
    becomes one line on stderr and exit status 2, and an empty run directory is removed. In ``finally`` W&B is
    closed and the run directory printed.

    Under ``torchrun`` (``WORLD_SIZE > 1``) a process group is opened around ``fn`` (gloo on CPU, nccl on CUDA
    with ``cuda`` = this rank's GPU); every rank computes, and only rank 0 writes the run record, its figures and
    the W&B run (see ``_run_other_rank``).
    """
    def wrap(fn):
        @functools.wraps(fn)
        def main(cfg: DictConfig) -> None:
            from hydra.core.hydra_config import HydraConfig
            loaded_revision()
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            try:
                with distributed_context(timeout_s=_dist_timeout_s()) as info:
                    if info.is_main:
                        _run_job(fn, job, cfg, run_dir, info)
                        barrier()
                    else:
                        _run_other_rank(fn, job, cfg, run_dir, info)
            except ValueError as err:  # the launch environment (RANK, WORLD_SIZE, MASTER_*); fn's own: _run_job
                _remove_if_empty(run_dir)
                print(f"error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
        return main
    return wrap
