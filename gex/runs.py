"""Content-addressed artefact cache with atomic writes and loud errors on missing or corrupt artefacts.

An artefact (a pretrained checkpoint, an ensemble member, curvature factors) lives at
``<root>/<kind>/<key>/<name>.pt`` where ``key`` hashes the resolved config parts that determine it. Each artefact
directory holds ``spec.json``, the config that produced it; reuse compares it and refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ArtifactError", "ArtifactMismatchError", "config_key", "atomic_save", "atomic_write_text",
           "load_artifact", "ArtifactCache"]

log = logging.getLogger(__name__)


class ArtifactError(ValueError):
    """A missing, truncated or unreadable artefact."""


class ArtifactMismatchError(ArtifactError):
    """An artefact exists but was produced by a different config."""


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _plain(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 1.0 and 1 must hash the same
    return obj


def config_key(spec: Any) -> str:
    """A stable 16-hex-digit hash of a config (dict, dataclass or OmegaConf container already resolved)."""
    text = json.dumps(_plain(spec), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tensors_digest(*tensors: torch.Tensor | None) -> str:
    """16 hex digits identifying the contents of ``tensors`` in order (shape, dtype and values; None counts)."""
    digest = hashlib.sha256()
    for t in tensors:
        if t is None:
            digest.update(b"none;")
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)};".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: no half-written file ever exists."""
    _atomic(Path(path), lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write text atomically."""
    _atomic(Path(path), lambda handle: handle.write(text.encode()))


def load_artifact(path: str | Path, what: str = "artefact") -> Any:
    """``torch.load(weights_only=True)`` with a one-line error naming the file when missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing {what}: {path} does not exist (run the stage that produces it, "
                            f"e.g. python -m experiments.pretrain with the same config)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated files
        raise ArtifactError(f"unreadable {what}: {path} ({type(err).__name__}: {err}); delete it and rerun") from None


class ArtifactCache:
    """Artefacts under ``root``, keyed by the hash of their spec.

    Args:
        root: cache directory (``paths.cache``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def directory(self, kind: str, spec: Any) -> Path:
        """``<root>/<kind>/<key>``, with ``spec.json`` written (or checked) there."""
        plain = _plain(spec)
        folder = self.root / kind / config_key(plain)
        spec_file = folder / "spec.json"
        if spec_file.is_file():
            stored = json.loads(spec_file.read_text())
            if stored != json.loads(json.dumps(plain, default=str)):
                raise ArtifactMismatchError(f"{folder} holds a different config: stored {stored} vs asked {plain}")
        else:
            atomic_write_text(json.dumps(plain, indent=2, sort_keys=True, default=str), spec_file)
        return folder

    def path(self, kind: str, spec: Any, name: str) -> Path:
        """Path of artefact ``name`` of ``kind`` for ``spec``."""
        return self.directory(kind, spec) / f"{name}.pt"

    def load(self, kind: str, spec: Any, name: str) -> Any | None:
        """The cached artefact, or None when absent (a corrupt one is an error)."""
        path = self.path(kind, spec, name)
        if not path.exists():
            return None
        log.info("reusing %s %s from %s", kind, name, path)
        return load_artifact(path, f"{kind} {name}")

    def save(self, kind: str, spec: Any, name: str, obj: Any) -> Path:
        """Store ``obj`` atomically and return its path."""
        path = self.path(kind, spec, name)
        atomic_save(obj, path)
        return path
