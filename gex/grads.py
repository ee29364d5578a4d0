"""Fast per-sample gradients: per-layer rules for Linear / Conv2d / eval-mode BatchNorm, ``vmap(grad)`` otherwise;
the streaming of per-sample gradients in chunks, and the gradient of the mean loss.

The hooks path runs one batched forward with forward hooks that keep each supported layer's input and output,
then one ``autograd.grad`` of the loss *summed* over the batch with respect to those outputs (so sample i's
output gradient is exactly the gradient of its own loss, unscaled by 1/b, and no parameter ``.grad`` is touched).
Each layer's per-sample parameter gradients follow in closed form (as Opacus and BackPACK do):

- Linear: ``dW_i = sum_t g_i[t] x_i[t]^T`` (an einsum / bmm), ``db_i = sum_t g_i[t]``;
- Conv2d: the input unfolded into columns (im2col), then ``dW_i = G_i U_i^T`` per group, ``db_i`` = sum over pixels;
- BatchNorm in eval mode (a fixed per-channel affine map): ``dw_i = sum_pix g_i * x_hat_i``, ``db_i = sum_pix g_i``.

Samples must not interact in the forward (eval-mode BN, no batch statistics), as in this module's
``vmap(grad)`` reference (``per_sample_grads``), which stays the tested ground truth and the fallback for any other parameterized
module, for shared parameters and for a layer called twice.

    g = per_sample_grads_fast(model, x, y, "ce")          # (b, P), hooks when every layer is supported
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gex.data import LabeledData, iter_batches
from gex.distributed import shard_rows
from gex.losses import per_sample_loss
from gex.params import Params, model_device, model_state, num_params, param_names
from gex.utils import progress

__all__ = ["GRAD_BACKENDS", "HookError", "unsupported_modules", "resolve_backend", "per_sample_grads",
           "per_sample_grads_hooks", "per_sample_grads_fast", "iter_grad_chunks", "loss_grad", "mean_loss_fn"]

log = logging.getLogger(__name__)

GRAD_BACKENDS = ("auto", "hooks", "vmap")
# Measured with bench/grads.py (cnn_small at 28x28, P = 83,674, 2,000 samples in chunks of 256, 2 CPU threads,
# torch 2.14.1, medians of 3): hooks 2.84 s, vmap(grad) 3.98 s (x1.40); with BN frozen so that Opacus 1.6 can run:
# hooks 2.70 s, vmap 3.59 s (x1.33), Opacus GradSampleModule 4.89 s (x1.82). So ``auto`` takes the hooks whenever
# every parameterized module has a rule; they also skip vmap's first-call import of torch._dynamo (seconds).
DEFAULT_BACKEND = "hooks"

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
IM2COL_MAX_COLUMNS = 36   # conv layers with at most this many input columns (C/G * kh * kw) per group use im2col


class HookError(ValueError):
    """The hooks path cannot handle this model (unsupported module, shared parameters, a layer called twice)."""


# ------------------------------------------------------------------------------------------ layer rules
# A rule writes sample i's gradient of each trainable parameter of its layer into ``dest[name][i]`` (views into
# the flat ``(b, P)`` output, so nothing is copied twice), from the layer input ``x`` and output gradient ``g``.

def _linear(layer: nn.Linear, x: Tensor, g: Tensor, dest: dict[str, Tensor]) -> None:
    """``x`` ``(b, ..., in)``, ``g`` ``(b, ..., out)`` -> weight ``(b, out, in)``, bias ``(b, out)``."""
    if "weight" in dest:
        if x.dim() == 2:  # one outer product per sample, written in place
            torch.mul(g.unsqueeze(2), x.unsqueeze(1), out=dest["weight"])
        else:
            b = x.shape[0]
            dest["weight"].copy_(torch.bmm(g.reshape(b, -1, g.shape[-1]).transpose(1, 2),
                                           x.reshape(b, -1, x.shape[-1])))
    if "bias" in dest:
        torch.sum(g.reshape(g.shape[0], -1, g.shape[-1]), 1, out=dest["bias"])


def _conv_padding(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of the layer, explicit for ``padding='same'|'valid'``."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        pads = []
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


def _im2col(layer: nn.Conv2d, x: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """The receptive fields of every output pixel, ``(b, C*kh*kw, H'*W')`` (a strided view, then one copy)."""
    xp = F.pad(x, _conv_padding(layer))
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    sb, sc, sy, sx = xp.stride()
    cols = xp.as_strided((x.shape[0], x.shape[1], kh, kw, *out_hw), (sb, sc, sy * dh, sx * dw, sy * sh, sx * sw))
    return cols.reshape(x.shape[0], -1, out_hw[0] * out_hw[1])


def _conv2d_weight(layer: nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients ``(b, O, C/G, kh, kw)``.

    Few input columns per group (a grey or RGB stem): im2col, then one batched product per sample. Otherwise the
    b samples become b groups of one convolution whose weight gradient (one ``convolution_backward``, as ``vmap``
    batches it) is the per-sample gradient, with no im2col copy; that path is the faster one there but slows down
    badly on single-channel inputs when the CPU threads compete for cores.
    """
    b, c_in, c_out, groups = x.shape[0], x.shape[1], g.shape[1], layer.groups
    if c_in // groups * layer.kernel_size[0] * layer.kernel_size[1] <= IM2COL_MAX_COLUMNS:
        cols = _im2col(layer, x, tuple(g.shape[2:]))                                # (b, C*kh*kw, L)
        g4 = g.reshape(b, groups, c_out // groups, -1)
        weight = torch.einsum("bgol,bgcl->bgoc", g4, cols.reshape(b, groups, -1, cols.shape[-1]))
        return weight.reshape(b, c_out, c_in // groups, *layer.kernel_size)
    pads = _conv_padding(layer)
    if pads[0] != pads[1] or pads[2] != pads[3]:  # asymmetric 'same' padding: pad explicitly
        x, padding = F.pad(x, pads), (0, 0)
    else:
        padding = (pads[2], pads[0])
    weight = torch.nn.grad.conv2d_weight(
        x.reshape(1, b * c_in, *x.shape[2:]), (b * c_out, c_in // groups, *layer.kernel_size),
        g.reshape(1, b * c_out, *g.shape[2:]), layer.stride, padding, layer.dilation, b * groups)
    return weight.view(b, c_out, c_in // groups, *layer.kernel_size)


def _conv2d(layer: nn.Conv2d, x: Tensor, g: Tensor, dest: dict[str, Tensor]) -> None:
    """``x`` ``(b, C, H, W)``, ``g`` ``(b, O, H', W')`` -> weight ``(b, O, C/G, kh, kw)``, bias ``(b, O)``."""
    if "weight" in dest:
        dest["weight"].copy_(_conv2d_weight(layer, x, g))
    if "bias" in dest:
        torch.sum(g, (2, 3), out=dest["bias"])


def _batchnorm(layer: nn.modules.batchnorm._BatchNorm, x: Tensor, g: Tensor, dest: dict[str, Tensor]) -> None:
    """Eval mode: ``y = x_hat * w + b`` per channel -> weight and bias ``(b, C)``."""
    dims = tuple(range(2, x.dim()))
    if "weight" in dest:
        # sum_pix g * x_hat = inv_std * sum_pix g * (x - mean): one temporary instead of x_hat's two
        centered = (x - layer.running_mean.view((1, -1) + (1,) * len(dims))).mul_(g)
        inv_std = torch.rsqrt(layer.running_var + layer.eps)
        torch.mul(centered.sum(dims) if dims else centered, inv_std, out=dest["weight"])
    if "bias" in dest:
        dest["bias"].copy_(g.sum(dims) if dims else g)


_Rule = Callable[[nn.Module, Tensor, Tensor, dict[str, Tensor]], None]


def _rule(module: nn.Module) -> _Rule | None:
    """The closed-form rule for ``module``, or None when it has none (in its current mode)."""
    if type(module) is nn.Linear:
        return _linear
    if type(module) is nn.Conv2d and module.padding_mode == "zeros":
        return _conv2d
    if type(module) in _BATCHNORMS and not module.training and module.track_running_stats \
            and module.running_mean is not None:
        return _batchnorm
    return None


# ------------------------------------------------------------------------------------------ support check

def _trainable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning at least one trainable parameter directly."""
    return [(name, m) for name, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


def unsupported_modules(model: nn.Module) -> list[str]:
    """Why the hooks path cannot run ``model`` as it is now (eval mode is assumed, as every caller sets it).

    Returns:
        One entry per parameterized module without a rule (``name (Type)``) or per parameter shared by several
        modules; empty when the hooks path applies.
    """
    reasons, owners = [], {}
    for name, module in _trainable_modules(model):
        was = module.training
        module.eval()  # BN's rule is for eval mode, which the callers switch to before the forward
        if _rule(module) is None:
            reasons.append(f"{name or '<root>'} ({type(module).__name__})")
        module.train(was)
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and owners.setdefault(id(p), name) != name:
                reasons.append(f"{name}.{pname} (shared with {owners[id(p)]})")
    return reasons


def resolve_backend(model: nn.Module, backend: str = "auto") -> str:
    """``hooks`` or ``vmap`` for ``model``: ``auto`` = hooks when supported.

    Raises:
        ValueError: unknown backend.
        HookError: ``hooks`` asked for on a model it cannot handle (the message lists the modules).
    """
    if backend not in GRAD_BACKENDS:
        raise ValueError(f"grad_backend={backend!r} is unknown; valid choices: {list(GRAD_BACKENDS)}")
    if backend == "vmap":
        return "vmap"
    reasons = unsupported_modules(model)
    if reasons and backend == "hooks":
        raise HookError(f"grad_backend='hooks' cannot handle {', '.join(reasons)}; use grad_backend='vmap' or 'auto'")
    return "vmap" if reasons else DEFAULT_BACKEND


# ------------------------------------------------------------------------------------------ the hooks pass

class _Capture:
    """Forward hooks keeping each hooked layer's input and output for one forward pass."""

    def __init__(self, modules: list[tuple[str, nn.Module]]):
        self.inputs: dict[str, tuple[Tensor, int]] = {}
        self.outputs: dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if name in self.outputs:
                raise HookError(f"module {name!r} ({type(module).__name__}) is called twice in one forward; "
                                f"use grad_backend='vmap'")
            x = args[0].detach()
            self.inputs[name] = (x, x._version)
            self.outputs[name] = output
            # The rest of the network gets a copy: an in-place op downstream (ReLU(inplace=True)) then changes
            # the copy, and the gradient taken with respect to ``output`` stays the layer's own.
            return output.clone()
        return hook

    def input(self, name: str) -> Tensor:
        x, version = self.inputs[name]
        if x._version != version:
            raise HookError(f"the input of module {name!r} was modified in place after the layer ran; "
                            f"use grad_backend='vmap'")
        return x

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _offsets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Flat-vector slice ``(start, stop)`` of every trainable parameter, in ``param_names`` order."""
    params, out, start = dict(model.named_parameters()), {}, 0
    for name in param_names(model):
        out[name] = (start, start + params[name].numel())
        start += params[name].numel()
    return out


def per_sample_grads_hooks(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    """Per-sample gradients of the eval-mode loss by per-layer rules, flat ``(b, P)`` in ``param_names`` order.

    Args:
        model: put in eval mode (BN uses running statistics, so samples do not interact).
        x: inputs ``(b, ...)``.
        y: labels ``(b,)``.
        loss: ``ce`` or ``bce``.

    Raises:
        HookError: a parameterized module without a rule, a shared parameter, or a layer called twice.
    """
    model.eval()
    reasons = unsupported_modules(model)
    if reasons:
        raise HookError(f"grad_backend='hooks' cannot handle {', '.join(reasons)}; use grad_backend='vmap'")
    modules = _trainable_modules(model)
    capture = _Capture(modules)
    try:
        with torch.enable_grad():
            total = per_sample_loss(model(x), y, loss).sum()  # summed: sample i's gradient is not scaled by 1/b
    finally:
        capture.close()
    hooked = [name for name, _ in modules if name in capture.outputs]
    g_out = dict(zip(hooked, torch.autograd.grad(total, [capture.outputs[n] for n in hooked], allow_unused=True)))
    return _assemble(model, modules, capture, g_out, len(x))


def _assemble(model: nn.Module, modules: list[tuple[str, nn.Module]], capture: _Capture,
              g_out: dict[str, Tensor | None], b: int) -> Tensor:
    """Run each layer's rule straight into its slices of the flat ``(b, P)`` output."""
    offsets = _offsets(model)
    first = next(p for p in model.parameters() if p.requires_grad)
    flat = torch.empty(b, next(reversed(offsets.values()))[1], dtype=first.dtype, device=first.device)
    for name, module in modules:
        dest = {}
        for pname, p in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if key in offsets:  # frozen parameters have no slot
                start, stop = offsets[key]
                dest[pname] = flat[:, start:stop].view(b, *p.shape)
        g = g_out.pop(name, None)
        if g is None:  # never called, or no path to the loss: a zero gradient, as vmap gives
            for view in dest.values():
                view.zero_()
        else:
            _rule(module)(module, capture.input(name), g, dest)
    return flat


_FELL_BACK: set[int] = set()


def per_sample_grads_fast(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce",
                          backend: str = "auto") -> Tensor:
    """Per-sample gradients ``(b, P)``, by the fastest path that supports ``model``.

    Args:
        model: put in eval mode.
        x: inputs ``(b, ...)``.
        y: labels ``(b,)``.
        loss: ``ce`` or ``bce``.
        backend: ``auto`` (hooks when every parameterized module has a rule, else ``vmap(grad)``), ``hooks`` or
            ``vmap`` (``per_sample_grads``, the reference).

    Raises:
        ValueError: unknown backend.
        HookError: ``backend='hooks'`` on a model it cannot handle.
    """
    choice = resolve_backend(model, backend)
    if choice == "vmap":
        return per_sample_grads(model, x, y, loss)
    try:
        return per_sample_grads_hooks(model, x, y, loss)
    except HookError as err:
        if backend == "hooks":
            raise
        if id(model) not in _FELL_BACK:
            _FELL_BACK.add(id(model))
            log.warning("per-sample gradients: %s; falling back to vmap(grad)", err)
        return per_sample_grads(model, x, y, loss)


# ------------------------------------------------------------------ the vmap(grad) reference and streaming

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
    resolve_backend(model, grad_backend)  # fail on a bad backend before any work
    device = model_device(model)
    rows = shard_rows(len(data)) if distributed else None
    if rows is not None and len(rows) == len(data):
        rows = None  # one process: no copy of the data
    part = data if rows is None else data.subset(rows)
    total = -(-len(part) // chunk_size)
    for batch in progress(iter_batches(part, chunk_size, device=device), desc=desc, total=total):
        grads = per_sample_grads_fast(model, batch.x, batch.y, loss, grad_backend)
        yield (batch.rows if rows is None else rows[batch.rows]), grads


def mean_loss_fn(model: nn.Module, frozen: Params, loss: str, x: Tensor, y: Tensor):
    """``params -> mean loss of the batch (x, y)`` for ``torch.func`` transforms (buffers held in ``frozen``)."""
    def fn(params: Params) -> Tensor:
        return per_sample_loss(functional_call(model, (params, frozen), (x,)), y, loss).mean()
    return fn


def loss_grad(model: nn.Module, data: LabeledData, loss: str = "ce", batch_size: int = 1024) -> Tensor:
    """Gradient of the mean eval-mode loss over ``data``, flat ``(P,)``."""
    model.eval()
    params, frozen = model_state(model)
    total = torch.zeros(num_params(model), device=model_device(model))
    for batch in iter_batches(data, batch_size, device=model_device(model)):
        g = grad(mean_loss_fn(model, frozen, loss, batch.x, batch.y))(params)
        total += torch.cat([g[n].reshape(-1) for n in params]) * len(batch.rows)
    return total / len(data)

