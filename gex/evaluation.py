"""Forward passes that score samples: eval-mode per-sample losses under theta*, under many parameter sets (GEX's
members, one at a time or stacked under ``vmap``), and under the linearized network (JVPs; GEX-lin, la_kfac).

Everything is evaluated in eval mode (BN running statistics), on un-augmented data, in fixed order.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from gex.data import LabeledData, iter_batches
from gex.losses import per_sample_loss
from gex.params import model_device, model_state, vector_to_params
from gex.utils import progress

__all__ = ["per_sample_losses", "losses_for_states", "losses_for_states_batched", "linearized_losses"]


@torch.no_grad()
def per_sample_losses(model: nn.Module, data: LabeledData, loss: str = "ce", batch_size: int = 1024) -> Tensor:
    """Eval-mode loss of every sample with its label in ``data.y``, shape ``(n,)`` on CPU."""
    model.eval()
    device = model_device(model)
    out = [per_sample_loss(model(b.x), b.y, loss).float().cpu() for b in iter_batches(data, batch_size, device=device)]
    return torch.cat(out)


def losses_for_states(model: nn.Module, states: Sequence[dict[str, Tensor]] | Iterator[dict[str, Tensor]],
                      data: LabeledData, loss: str = "ce", batch_size: int = 1024, desc: str = "losses") -> Tensor:
    """Per-sample eval losses under each state dict in turn (one loaded at a time), shape ``(n, M)``.

    ``model`` is used as the container and restored afterwards.
    """
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    columns = []
    try:
        for state in progress(states, desc=desc):
            model.load_state_dict(state)
            columns.append(per_sample_losses(model, data, loss, batch_size))
    finally:
        model.load_state_dict(original)
    return torch.stack(columns, dim=1)


@torch.no_grad()
def losses_for_states_batched(model: nn.Module, states: Sequence[dict[str, Tensor]] | Iterator[dict[str, Tensor]],
                              data: LabeledData, loss: str = "ce", batch_size: int = 1024, members_per_pass: int = 8,
                              desc: str = "losses") -> Tensor:
    """``losses_for_states`` with up to ``members_per_pass`` states evaluated together, shape ``(n, M)``.

    The states of a pass are stacked and ``functional_call`` runs under ``vmap`` over them, so each batch is read
    once per pass instead of once per state; memory grows with ``members_per_pass`` (activations of that many
    models on one batch). Equal to ``losses_for_states`` up to float rounding. ``model`` is only the container:
    it is not changed.

    Args:
        model: the architecture (eval mode is set).
        states: M state dicts (loaded lazily, ``members_per_pass`` at a time).
        data: samples, with labels ``data.y``.
        loss: ``ce`` or ``bce``.
        batch_size: samples per forward.
        members_per_pass: states stacked per pass over the data.
        desc: progress-bar label.

    Raises:
        ValueError: ``members_per_pass`` < 1.
    """
    if members_per_pass < 1:
        raise ValueError(f"members_per_pass={members_per_pass!r} is invalid; it must be a positive integer")
    model.eval()
    device, keys = model_device(model), set(model.state_dict().keys())
    fn = lambda p, xb: functional_call(model, p, (xb,))  # noqa: E731
    columns, chunk = [], []
    for state in progress(states, desc=desc):
        chunk.append(state)
        if len(chunk) == members_per_pass:
            columns.append(_stacked_eval(fn, chunk, keys, data, loss, batch_size, device))
            chunk = []
    if chunk:
        columns.append(_stacked_eval(fn, chunk, keys, data, loss, batch_size, device))
    return torch.cat(columns, dim=1)


def _stacked_eval(fn, chunk, keys, data, loss, batch_size, device) -> Tensor:
    """``(n, k)`` eval losses of the k states of ``chunk``, one vmapped forward per batch."""
    stacked = {key: torch.stack([s[key] for s in chunk]).to(device) for key in keys}
    out = []
    for batch in iter_batches(data, batch_size, device=device):
        logits = vmap(fn, in_dims=(0, None))(stacked, batch.x)                       # (k, b, K)
        k, b = logits.shape[:2]
        losses = per_sample_loss(logits.flatten(0, 1), batch.y.repeat(k), loss).view(k, b)
        out.append(losses.T.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def linearized_losses(model: nn.Module, data: LabeledData, deltas: Sequence[Tensor], loss: str = "ce",
                      batch_size: int = 1024, desc: str = "linearized losses") -> Tensor:
    """Per-sample losses of the linearized network ``f(theta*) + J (delta)`` for each flat ``delta``.

    Args:
        model: at theta*, eval mode (theta*'s BN statistics are used for every delta).
        data: samples, with labels ``data.y``.
        deltas: M flat ``(P,)`` parameter offsets theta_m - theta*.
        loss: ``ce`` or ``bce``.
        batch_size: samples per JVP.

    Returns:
        ``(n, M)`` losses.
    """
    model.eval()
    params, frozen = model_state(model)
    device = model_device(model)
    columns = []
    for delta in progress(deltas, desc=desc):
        tangent = vector_to_params(model, delta.to(device))
        out = []
        for batch in iter_batches(data, batch_size, device=device):
            f = lambda p: functional_call(model, (p, frozen), (batch.x,))  # noqa: E731
            logits, jf = jvp(f, (params,), (tangent,))
            out.append(per_sample_loss(logits + jf, batch.y, loss).float().cpu())
        columns.append(torch.cat(out))
    return torch.stack(columns, dim=1)
