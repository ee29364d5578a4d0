"""How an entry point runs: ``entry_point(job)(fn)`` wraps ``fn(cfg, run_dir, logger) -> metrics`` for
``hydra.main``, turning a user's mistake into one line on stderr and exit status 2, and running every rank of a
``torchrun`` launch (only rank 0 writes the record).
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from experiments.scaffold import RunLogger, UsageError, loaded_revision
from gex.attribution import MethodError
from gex.distributed import DistInfo, barrier, distributed_context
from gex.runs import ArtifactError

__all__ = ["entry_point", "cli", "bad_choices"]

# Collective timeout under torchrun (seconds): the other ranks wait at a barrier while rank 0 pretrains theta*,
# so it must exceed the longest pretraining; GEX_DIST_TIMEOUT_S overrides it.
DIST_TIMEOUT_S = 24 * 3600.0


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


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def bad_choices(overrides: list[str], configs: Path = CONFIGS) -> list[str]:
    """One message per ``group=name`` override whose config group has no ``name`` (sweeps ``a,b`` checked item by
    item; ``+``/``~`` overrides, ``null`` and keys that are not config groups are left to Hydra)."""
    messages = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key.startswith(("+", "~", "hydra")) or "." in key or value in ("null", ""):
            continue
        group = configs / key
        if not group.is_dir():
            continue
        valid = sorted(p.stem for p in group.glob("*.yaml"))
        for name in value.split(","):
            if name and not (group / f"{name}.yaml").is_file():
                messages.append(f"{key}={name!r} is unknown; valid choices: {valid}")
    return messages


def cli(main: Callable[[], None]) -> None:
    """Run a ``hydra.main`` function, first turning an unknown config-group choice (``method=nope``) into one line
    on stderr and exit status 2 (Hydra alone exits 1 with a longer message)."""
    messages = bad_choices(sys.argv[1:])
    if messages:
        print(f"error: {messages[0]}", file=sys.stderr)
        raise SystemExit(2)
    main()
