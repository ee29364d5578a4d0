"""Baseline influence methods, one module per method; importing this package registers them all by name."""
from __future__ import annotations

import importlib
import pkgutil

import gex.method  # noqa: F401  (registers gex, gex_lin and gex_mean_loss)

__all__: list[str] = []

# Import every method module so that ``gex.attribution.METHODS`` is complete.
for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
