"""Per-sample-gradient paths side by side: our per-layer hooks, ``vmap(grad)`` and Opacus's GradSampleModule,
timed over the same chunks in alternation, with each path's largest difference from the ``vmap`` reference.
"""
from __future__ import annotations

import copy
import statistics
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bench.timing import stats, timed
from gex.grads import per_sample_grads, per_sample_grads_hooks
from gex.losses import per_sample_loss
from gex.params import param_names

__all__ = ["GRAD_PATHS", "opacus_grads", "freeze_norm_layers", "compare_grad_paths"]


GRAD_PATHS = ("hooks", "vmap", "opacus")



class _Opacus:
    """Opacus's ``GradSampleModule`` on a copy of the model (it adds hooks to the module it wraps).

    Opacus records activations only in training mode, so its layers are put in train mode and every BatchNorm back
    in eval mode (running statistics: the same function as the other paths). Opacus has no BatchNorm rule and
    refuses layers with buffers, so BatchNorm parameters must be frozen first (``freeze_norm_layers``).
    """

    def __init__(self, model: nn.Module):
        from opacus import GradSampleModule
        self.names = param_names(model)
        self.module = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum", strict=False)
        self.module.train()
        for layer in self.module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()

    def __call__(self, x: Tensor, y: Tensor, loss: str) -> Tensor:
        self.module.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # Opacus' module backward hooks warn when the input needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_sample_loss(self.module(x), y, loss).sum().backward()
        params = dict(self.module._module.named_parameters())
        return torch.cat([params[n].grad_sample.reshape(len(x), -1) for n in self.names], dim=1)



def opacus_grads(model: nn.Module) -> Callable[[Tensor, Tensor, str], Tensor] | str:
    """A ``(x, y, loss) -> (b, P)`` function backed by Opacus, or why there is none (a message)."""
    try:
        return _Opacus(model)
    except ImportError:
        return "opacus is not installed (pip install opacus)"
    except NotImplementedError as err:  # Opacus refuses layers with buffers, i.e. trainable BatchNorm
        return f"opacus cannot run this model ({str(err).strip()}); compared on the BN-frozen copy only"



def freeze_norm_layers(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorm affine parameters are frozen, so that Opacus (no BatchNorm rule) can run it."""
    frozen = copy.deepcopy(model)
    for module in frozen.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)
    return frozen



def _grad_fns(model: nn.Module, paths: list[str]) -> tuple[dict[str, Callable], dict[str, str]]:
    fns: dict[str, Callable] = {"hooks": lambda x, y, loss: per_sample_grads_hooks(model, x, y, loss),
                                "vmap": lambda x, y, loss: per_sample_grads(model, x, y, loss)}
    skipped = {}
    if "opacus" in paths:
        fn = opacus_grads(model)
        if isinstance(fn, str):
            skipped["opacus"] = fn
        else:
            fns["opacus"] = fn
    return {k: v for k, v in fns.items() if k in paths}, skipped



def _one_pass(fn: Callable, x: Tensor, y: Tensor, loss: str, chunk: int, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds of one per-sample-gradient pass over ``x``; each chunk is reduced to squared norms."""
    def work() -> None:
        for i in range(0, len(x), chunk):
            fn(x[i:i + chunk], y[i:i + chunk], loss).pow(2).sum(1)
    return timed(work, device)[:2]



def compare_grad_paths(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce", chunk: int = 256,
                       repeats: int = 3, paths: list[str] = list(GRAD_PATHS)) -> list[dict[str, Any]]:
    """Median wall time of one per-sample-gradient pass over ``x`` per path, and its error against ``vmap``.

    Every path is warmed up on the first chunk (which also gives its largest absolute difference from the
    ``vmap(grad)`` reference), then the repeats are interleaved across paths so that drifting machine load hits
    them alike.

    Returns:
        One row per path: ``path``, ``P``, ``wall_s``, ``cpu_s``, ``samples_per_s``, ``max_abs_err``,
        ``ratio_to_hooks`` and ``cpu_ratio_to_hooks``; a path that cannot run has a ``status`` instead.
    """
    model.eval()
    fns, skipped = _grad_fns(model, paths)
    ref = per_sample_grads(model, x[:chunk], y[:chunk], loss) if "vmap" in fns else None
    errs = {k: float((fn(x[:chunk], y[:chunk], loss) - ref).abs().max()) if ref is not None else float("nan")
            for k, fn in fns.items()}  # also each path's warm-up
    device, times = x.device, {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_one_pass(fn, x, y, loss, chunk, device))
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = []
    for k, v in times.items():
        wall = [w for w, _ in v]
        rows.append({"path": k, "P": size, "wall_s": statistics.median(wall), "wall_s_std": stats(wall)["std"],
                     "cpu_s": statistics.median(c for _, c in v), "samples_per_s": len(x) / statistics.median(wall),
                     "max_abs_err": errs[k]})
    hooks = next((r for r in rows if r["path"] == "hooks"), None)
    for row in rows:
        row["ratio_to_hooks"] = row["wall_s"] / hooks["wall_s"] if hooks else float("nan")
        row["cpu_ratio_to_hooks"] = row["cpu_s"] / hooks["cpu_s"] if hooks else float("nan")
    return rows + [{"path": k, "P": size, "status": why} for k, why in skipped.items()]
