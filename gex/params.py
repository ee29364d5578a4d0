"""Flat-parameter helpers shared by every method: names, counts, flat vectors and (params, buffers) dicts.

The flat order is ``model.named_parameters()`` order over trainable parameters; every ``(P,)`` vector in the
package (gradients, projections, HVPs, ensemble offsets) uses it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Params", "param_names", "num_params", "params_vector", "vector_to_params", "model_state", "model_device"]

Params = dict[str, Tensor]


def param_names(model: nn.Module) -> list[str]:
    """Names of trainable parameters, in ``model.named_parameters()`` order (the flat-vector order)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def num_params(model: nn.Module) -> int:
    """P, the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def params_vector(model: nn.Module) -> Tensor:
    """Trainable parameters as one flat vector ``(P,)`` (detached)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def vector_to_params(model: nn.Module, vec: Tensor) -> Params:
    """Split a flat ``(P,)`` vector into a name -> tensor dict shaped like the model's parameters."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = vec[start:start + p.numel()].view_as(p)
            start += p.numel()
    if start != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, model has {start} parameters")
    return out


def model_state(model: nn.Module) -> tuple[Params, Params]:
    """(trainable params, buffers + frozen params), detached, for ``functional_call``."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: b.detach() for n, b in model.named_buffers()}
    frozen.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    return params, frozen


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device
