"""Primitives every influence method shares: flat parameters, per-sample losses for many parameter sets,
per-sample gradients streamed in chunks, Hessian-vector products and JVPs of the linearized network.

Everything is evaluated in eval mode (BN running statistics), on un-augmented data, without weight decay,
unless stated. Nothing here ever holds an N x P matrix: gradients come in chunks of ``chunk_size`` rows.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from gex.data import LabeledData, iter_batches
from gex.losses import per_sample_loss
from gex.utils import progress

__all__ = ["param_names", "params_vector", "vector_to_params", "model_state", "per_sample_losses",
           "losses_for_states", "losses_for_states_batched", "iter_grad_chunks", "per_sample_grads", "hvp", "loss_grad",
           "linearized_losses", "num_params", "loss_deviations"]

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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def per_sample_losses(model: nn.Module, data: LabeledData, loss: str = "ce", batch_size: int = 1024) -> Tensor:
    """Eval-mode loss of every sample with its label in ``data.y``, shape ``(n,)`` on CPU."""
    model.eval()
    device = _device(model)
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
    device, keys = _device(model), set(model.state_dict().keys())
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


def _sample_loss_fn(model: nn.Module, frozen: Params, loss: str) -> Callable[[Params, Tensor, Tensor], Tensor]:
    def fn(params: Params, x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (params, frozen), (x.unsqueeze(0),))
        return per_sample_loss(logits, y.unsqueeze(0), loss).squeeze(0)
    return fn


def per_sample_grads(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce",
                     params: Params | None = None) -> Tensor:
    """Gradients of each sample's eval-mode loss, flattened, shape ``(b, P)`` (``vmap(grad)`` reference path).

    Args:
        model: in eval mode (BN uses running statistics, so samples do not interact).
        x: inputs ``(b, ...)``.
        y: labels ``(b,)``.
        loss: ``ce`` or ``bce``.
        params: parameters to differentiate at (default: the model's own).
    """
    model.eval()
    own, frozen = model_state(model)
    params = own if params is None else params
    grads = vmap(grad(_sample_loss_fn(model, frozen, loss)), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[n].reshape(len(x), -1) for n in params], dim=1)


def iter_grad_chunks(model: nn.Module, data: LabeledData, loss: str = "ce", chunk_size: int = 256,
                     desc: str = "per-sample grads", grad_backend: str = "auto",
                     distributed: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Stream per-sample gradients over the eval view.

    Args:
        model: put in eval mode.
        data: samples, with labels ``data.y``.
        loss: ``ce`` or ``bce``.
        chunk_size: samples per chunk (the gradients do not depend on it).
        desc: progress-bar label.
        grad_backend: ``auto`` (per-layer hooks when every parameterized module has a rule, else
            ``vmap(grad)``), ``hooks`` or ``vmap``; see ``gex.grads``.
        distributed: under an initialized ``torch.distributed`` group, stream only this rank's contiguous block of
            rows (``gex.distributed.shard_rows``); gather per-row results with ``gex.distributed.gather_rows``.

    Yields:
        (rows ``(b,)``: positions in ``data``, gradients ``(b, P)`` on the model's device), in data order.
    """
    from gex.distributed import shard_rows
    from gex.grads import per_sample_grads_fast, resolve_backend  # imported here: gex.grads imports this module

    resolve_backend(model, grad_backend)  # fail on a bad backend before any work
    device = _device(model)
    rows = shard_rows(len(data)) if distributed else None
    if rows is not None and len(rows) == len(data):
        rows = None  # one process: no copy of the data
    part = data if rows is None else data.subset(rows)
    total = -(-len(part) // chunk_size)
    for batch in progress(iter_batches(part, chunk_size, device=device), desc=desc, total=total):
        grads = per_sample_grads_fast(model, batch.x, batch.y, loss, grad_backend)
        yield (batch.rows if rows is None else rows[batch.rows]), grads


def _mean_loss_fn(model: nn.Module, frozen: Params, loss: str, x: Tensor, y: Tensor):
    def fn(params: Params) -> Tensor:
        return per_sample_loss(functional_call(model, (params, frozen), (x,)), y, loss).mean()
    return fn


def loss_grad(model: nn.Module, data: LabeledData, loss: str = "ce", batch_size: int = 1024) -> Tensor:
    """Gradient of the mean eval-mode loss over ``data``, flat ``(P,)``."""
    model.eval()
    params, frozen = model_state(model)
    total = torch.zeros(num_params(model), device=_device(model))
    for batch in iter_batches(data, batch_size, device=_device(model)):
        g = grad(_mean_loss_fn(model, frozen, loss, batch.x, batch.y))(params)
        total += torch.cat([g[n].reshape(-1) for n in params]) * len(batch.rows)
    return total / len(data)


def hvp(model: nn.Module, data: LabeledData, vec: Tensor, loss: str = "ce", batch_size: int = 1024) -> Tensor:
    """Hessian of the mean eval-mode loss over ``data`` times ``vec`` (forward-over-reverse), flat ``(P,)``.

    Pass a one-batch ``LabeledData`` (``data.subset(rows)``) for a stochastic mini-batch HVP.
    """
    model.eval()
    params, frozen = model_state(model)
    tangent = vector_to_params(model, vec.to(_device(model)))
    total = torch.zeros_like(vec, device=_device(model))
    for batch in iter_batches(data, batch_size, device=_device(model)):
        fn = grad(_mean_loss_fn(model, frozen, loss, batch.x, batch.y))
        _, hv = jvp(fn, (params,), (tangent,))
        total += torch.cat([hv[n].reshape(-1) for n in params]) * len(batch.rows)
    return total / len(data)


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
    device = _device(model)
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


def loss_deviations(member_losses: Tensor, reference: Tensor, eps: float) -> Tensor:
    """GEX's loss deviations ``L[i, m] - max(l_i(theta*), eps)``, shape ``(n, M)``.

    The clamp applies to the reference only (as the authors): a well-fit sample whose member losses stay small
    deviates by about ``-eps``, which sets the score floor ``eps**2``.

    Args:
        member_losses: ``(n, M)`` per-sample losses under each member (or linearized member).
        reference: ``(n,)`` losses at theta*.
        eps: the clamp tau (0 disables it).
    """
    return member_losses - reference.clamp(min=eps).unsqueeze(1)
