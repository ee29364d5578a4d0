"""The one training loop: pretraining, ensemble cycles, EL2N, CL folds, relabel and prune retraining.

SGD with heavy-ball momentum and an L2 penalty on *all* parameters (the authors' ``wd/2 ||theta||^2``), train-mode
BN, linear warmup then cosine (or constant LR with gradient-norm clipping, the clip seeing the L2 term as in the
authors' optax chain), trajectory checkpoints, forgetting counts, and a BN-statistics refresh before every
evaluation and snapshot.

Speed switches (``channels_last``, ``amp_bf16``, ``compile``) change how the steps run, not what they compute
(``amp_bf16`` to bf16 precision). There is no ``pin_memory`` switch: a split lives where the work runs
(``LabeledData.to(device)``), and ``iter_batches`` indexes it there, so no batch ever crosses from pageable host
memory to the accelerator during training and pinning would have nothing to pin.

``stacked_sgd_steps`` / ``stacked_update_bn`` run k independent models at once (parameters and buffers stacked
along a leading member axis, ``torch.func.functional_call`` under ``vmap``), with the same optimizer, schedule,
weight decay and clipping as ``sgd_steps`` (shared through ``make_optimizer`` and ``regularize_and_clip``).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from gex.data import Batch, LabeledData, iter_batches
from gex.losses import LOSSES, per_sample_loss
from gex.runs import ArtifactError, atomic_save, load_artifact
from gex.utils import progress

__all__ = ["TrainConfig", "Checkpoint", "TrainResult", "ResumeFile", "train", "sgd_steps", "lr_at", "update_bn",
           "eval_logits", "aum_margins", "batch_stream", "snapshot", "clone_model", "make_optimizer",
           "regularize_and_clip", "check_speed", "speed_of", "SPEED_FIELDS", "Stacked", "stack_states",
           "unstack_state", "stacked_sgd_steps", "stacked_update_bn"]

log = logging.getLogger(__name__)

SCHEDULES = ("warmup_cosine", "constant")
SPEED_FIELDS = ("channels_last", "amp_bf16", "compile")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against a zero norm; the per-member clip uses the same


@dataclass
class TrainConfig:
    """A training recipe (defaults: the CPU reference pretraining, which memorizes noisy labels).

    Attributes:
        epochs: passes over the data; the step count is ``epochs * ceil(n / batch_size)``.
        steps: exact number of steps instead of epochs (ensemble cycles); None = use epochs.
        batch_size: samples per step.
        lr: peak learning rate.
        momentum: heavy-ball momentum.
        weight_decay: L2 coefficient on all parameters.
        warmup_frac: fraction of steps with linear warmup from 0 (0 = start at the peak).
        schedule: ``warmup_cosine`` (warmup then cosine to 0) or ``constant``.
        clip_norm: global gradient-norm clip (None = off); the authors clip with the constant schedule.
        augment: train on the augmented view (pad-crop, flips where the dataset allows).
        ckpt_fracs: fractions of training after which a trajectory checkpoint is kept.
        bn_batches: train-mode batches used to refresh BN statistics before evaluation/snapshots.
        loss: ``ce`` or ``bce``.
        channels_last: model and 4-d inputs in ``torch.channels_last`` memory format during the steps (the same
            function; results equal to float rounding).
        amp_bf16: bf16 autocast of the forward during the steps; CUDA only (on CPU the loop raises ``ValueError``
            rather than silently running in float32).
        compile: ``torch.compile`` the model for the steps (inductor; the first step compiles, tens of seconds on a
            CPU; later models of the same architecture reuse the compiled code).
    """

    epochs: int = 40
    steps: Optional[int] = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_frac: float = 0.1
    schedule: str = "warmup_cosine"
    clip_norm: Optional[float] = None
    augment: bool = False
    ckpt_fracs: list[float] = field(default_factory=lambda: [0.6, 0.7, 0.8, 0.9, 1.0])
    bn_batches: int = 50
    loss: str = "ce"
    channels_last: bool = False
    amp_bf16: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        for key in SPEED_FIELDS:
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"train.{key}={getattr(self, key)!r} is invalid; valid choices: [False, True]")
        if self.epochs <= 0 and not self.steps:
            raise ValueError(f"train.epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"train.steps must be positive when set, got {self.steps}")
        if self.batch_size <= 0:
            raise ValueError(f"train.batch_size must be positive, got {self.batch_size}")
        if self.lr < 0 or not 0 <= self.warmup_frac < 1 or not 0 <= self.momentum < 1:
            raise ValueError(f"train: need lr >= 0, 0 <= warmup_frac < 1, 0 <= momentum < 1 "
                             f"(got {self.lr}, {self.warmup_frac}, {self.momentum})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r} is unknown; valid choices: {list(SCHEDULES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"train.loss={self.loss!r} is unknown; valid choices: {list(LOSSES)}")
        if any(not 0 < f <= 1 for f in self.ckpt_fracs):
            raise ValueError(f"train.ckpt_fracs must lie in (0, 1], got {list(self.ckpt_fracs)}")

    def total_steps(self, n: int) -> int:
        """Steps of this recipe on ``n`` samples (schedules are sized to what is trained on)."""
        return self.steps if self.steps else self.epochs * math.ceil(n / self.batch_size)

    def cache_spec(self) -> dict:
        """``asdict`` without the speed switches that are off: artefact keys made before they existed stay valid."""
        return {k: v for k, v in asdict(self).items() if k not in SPEED_FIELDS or v}


@dataclass
class Checkpoint:
    """A trajectory snapshot: parameters and BN buffers (CPU), the step, and the LR in force there."""

    state: dict[str, Tensor]
    step: int
    lr: float


@dataclass
class TrainResult:
    """What a training run leaves besides the trained model (which is updated in place)."""

    trajectory: list[Checkpoint]
    forgetting: Tensor          # (n,) correct -> wrong transitions of pre-update train-mode predictions
    never_learned: Tensor       # (n,) bool: never predicted correctly during training
    history: list[dict[str, float]]
    wall_s: float = 0.0         # training time, including the processes a resumed run continued from
    aum: Tensor | None = None   # (n,) float64: mean pre-update margin over the run (area under the margin)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based) of ``total``: linear warmup, then cosine to 0, or constant."""
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = int(cfg.warmup_frac * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress_frac = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress_frac))


def batch_stream(data: LabeledData, batch_size: int, augment: bool, generator: torch.Generator,
                 device: torch.device) -> Iterator[Batch]:
    """The train view as an endless stream: reshuffled every epoch, augmented when asked."""
    while True:
        yield from iter_batches(data, batch_size, shuffle=True, augment=augment, generator=generator, device=device)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of parameters and buffers."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _weighted_mean(losses: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of per-sample losses over the last axis, weighted when the batch carries weights."""
    if weights is not None:
        return (losses * weights).sum(-1) / weights.sum(-1)
    return losses.mean(-1)


def _weighted_loss(model: Callable[[Tensor], Tensor], batch: Batch, loss: str,
                   channels_last: bool = False) -> tuple[Tensor, Tensor]:
    logits = model(_as_input(batch.x, channels_last))
    return _weighted_mean(per_sample_loss(logits, batch.y, loss, batch.targets), batch.weights), logits


def _as_input(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def check_speed(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse speed switches the device cannot honour (bf16 autocast is CUDA-only here).

    Raises:
        ValueError: ``amp_bf16`` on a non-CUDA device.
    """
    if cfg.amp_bf16 and torch.device(device).type != "cuda":
        raise ValueError(f"train.amp_bf16=True needs a CUDA device (got {torch.device(device).type}); "
                         f"set train.amp_bf16=false")


def speed_of(cfg: TrainConfig) -> dict[str, bool]:
    """The speed switches of ``cfg``, to carry over into another recipe (``dataclasses.replace(r, **speed)``)."""
    return {k: getattr(cfg, k) for k in SPEED_FIELDS}


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp_bf16)


def _compiled(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``torch.compile(model)``, whose first call compiles; a failure names the switch that asked for it."""
    compiled = torch.compile(model)

    def forward(x: Tensor) -> Tensor:
        try:
            return compiled(x)
        except torch._dynamo.exc.TorchDynamoException as err:  # e.g. BackendCompilerFailed: no C++ compiler
            raise RuntimeError(f"train.compile=True failed to compile {type(model).__name__} "
                               f"({type(err).__name__}); set train.compile=false") from err
    return forward


def make_optimizer(params: list[Tensor], cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum from a fresh buffer; PyTorch's fused L2 term unless clipping needs it added by hand.

    Every update is elementwise, so the same optimizer steps one model or k models stacked along a member axis.
    """
    manual_wd = cfg.clip_norm is not None
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=0.0 if manual_wd else cfg.weight_decay)


@torch.no_grad()
def regularize_and_clip(params: list[Tensor], cfg: TrainConfig, stacked: bool = False) -> None:
    """With clipping: add the L2 gradient, then clip the global norm (the authors' optax order); else nothing.

    Args:
        params: parameters with ``.grad`` set.
        cfg: the recipe (``clip_norm``, ``weight_decay``).
        stacked: the parameters carry a leading member axis; each member's norm is clipped on its own.
    """
    if cfg.clip_norm is None:
        return
    for p in params:
        p.grad.add_(p, alpha=cfg.weight_decay)
    if not stacked:
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        return
    norms = torch.stack([p.grad.flatten(1).norm(dim=1) for p in params], dim=1).norm(dim=1)  # (k,)
    scale = (cfg.clip_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))


def sgd_steps(model: nn.Module, stream: Iterator[Batch], n_steps: int, cfg: TrainConfig,
              on_step: Callable[[int, Batch, Tensor, float], None] | None = None, desc: str = "train",
              schedule_steps: int | None = None, optimizer: torch.optim.SGD | None = None,
              start_step: int = 0) -> None:
    """Run steps ``start_step`` .. ``n_steps - 1`` of ``cfg`` (fresh momentum unless ``optimizer`` is given).

    Args:
        model: trained in place (train mode during the steps, eval mode after).
        stream: batches (see ``batch_stream``).
        n_steps: number of optimizer steps.
        schedule_steps: length of the LR schedule (default ``n_steps``); longer = stop early inside it (EL2N).
        cfg: the recipe (lr, momentum, weight decay, schedule, clipping, loss, speed switches).
        on_step: called after each step with (step, batch, pre-update logits, lr).
        desc: progress-bar label.
        optimizer: ``make_optimizer`` over the model's trainable parameters, possibly holding a restored momentum
            buffer (a resumed run); None = a fresh one.
        start_step: the first step's index in the schedule (a resumed run; ``stream`` continues from there).

    Raises:
        ValueError: a speed switch the model's device cannot honour (``check_speed``).
    """
    device = next(model.parameters()).device
    check_speed(cfg, device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = _compiled(model) if cfg.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer if optimizer is not None else make_optimizer(params, cfg)
    model.train()
    for step in progress(range(start_step, n_steps), desc=desc, total=n_steps - start_step):
        batch = next(stream)
        lr = lr_at(step, schedule_steps or n_steps, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        with _autocast(cfg, device):
            loss, logits = _weighted_loss(forward, batch, cfg.loss, cfg.channels_last)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        regularize_and_clip(params, cfg)
        opt.step()
        if on_step is not None:
            on_step(step, batch, logits.detach(), lr)
    if cfg.channels_last:  # leave the usual layout behind: clones and snapshots look as without the switch
        model.to(memory_format=torch.contiguous_format)
    model.eval()


@torch.no_grad()
def update_bn(model: nn.Module, data: LabeledData, cfg: TrainConfig, generator: torch.Generator,
              device: torch.device) -> None:
    """Recompute BN running statistics from ``cfg.bn_batches`` train-view batches at the current weights.

    The authors run 50 train-mode batches through a decay-0.9 EMA, which forgets the old statistics; we reset
    them and take the exact average over the same number of batches instead (no dependence on stale state).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    stream = batch_stream(data, cfg.batch_size, cfg.augment, generator, device)
    for _ in range(cfg.bn_batches):
        model(next(stream).x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


# ------------------------------------------------------------------- k independent models at once

@dataclass
class Stacked:
    """k models of one architecture, stacked along a leading member axis of size k.

    Attributes:
        params: trainable parameters, each ``(k, *shape)``, leaves with ``requires_grad``.
        buffers: buffers and frozen parameters, each ``(k, *shape)`` (BN statistics are updated in place).
        keys: the ``state_dict`` order, so ``unstack_state`` returns what ``snapshot`` would.
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    keys: list[str]

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]


def stack_states(model: nn.Module, states: list[dict[str, Tensor]], device: torch.device) -> Stacked:
    """Stack k state dicts of ``model``'s architecture (``snapshot``s) on ``device``."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    keys = list(model.state_dict().keys())
    stack = lambda n: torch.stack([s[n] for s in states]).to(device)  # noqa: E731
    return Stacked({n: stack(n).requires_grad_() for n in keys if n in trainable},
                   {n: stack(n) for n in keys if n not in trainable}, keys)


def unstack_state(stacked: Stacked, member: int) -> dict[str, Tensor]:
    """Member ``member``'s parameters and buffers as a CPU state dict (like ``snapshot``)."""
    both = stacked.params | stacked.buffers
    return {k: both[k][member].detach().to("cpu", copy=True) for k in stacked.keys}


def _stacked_forward(model: nn.Module, stacked: Stacked, x: Tensor) -> Tensor:
    """Logits ``(k, b, K)`` of member j on ``x[j]`` (``x``: ``(k, b, ...)``), in the container's train/eval mode."""
    fn = lambda p, b, xj: functional_call(model, (p, b), (xj,))  # noqa: E731
    return vmap(fn)(stacked.params, stacked.buffers, x)


def _stacked_losses(logits: Tensor, batches: list[Batch], loss: str) -> Tensor:
    """Each member's (weighted) mean loss on its own batch, shape ``(k,)``."""
    k, b = logits.shape[:2]
    pick = lambda name: None if getattr(batches[0], name) is None else \
        torch.stack([getattr(bt, name) for bt in batches])  # noqa: E731
    targets, weights = pick("targets"), pick("weights")
    per = per_sample_loss(logits.flatten(0, 1), pick("y").flatten(), loss,
                          None if targets is None else targets.flatten(0, 1)).view(k, b)
    return _weighted_mean(per, weights)


def _check_stackable(cfg: TrainConfig) -> None:
    for key in ("channels_last", "compile"):
        if getattr(cfg, key):
            raise ValueError(f"train.{key}=True is not supported for models stacked under vmap (batched ensemble "
                             f"members); set train.{key}=false or batch_members=1")


def stacked_sgd_steps(model: nn.Module, stacked: Stacked, streams: list[Iterator[Batch]], n_steps: int,
                      cfg: TrainConfig, on_step: Callable[[int, Batch, Tensor, float], None] | None = None,
                      desc: str = "train") -> None:
    """``sgd_steps`` for k independent models at once: member j takes its batches from ``streams[j]`` only.

    The same LR schedule, fresh momentum, weight decay and (per-member) clipping as ``sgd_steps``; the members equal
    k separate ``sgd_steps`` runs up to float rounding (vmap sums in another order).

    Args:
        model: the architecture (a container: its own weights are neither used nor changed; train mode during the
            steps, eval mode after).
        stacked: the k models, trained in place (``params`` and BN ``buffers``).
        streams: k batch streams of equal batch sizes (``batch_stream`` over the same data).
        n_steps: optimizer steps.
        cfg: the recipe.
        on_step: called after each step once per member, in member order, with (step, that member's batch, its
            pre-update logits ``(b, K)``, lr).
        desc: progress-bar label.

    Raises:
        ValueError: ``channels_last`` or ``compile`` (not run under vmap), or ``amp_bf16`` off CUDA.
    """
    device = next(iter(stacked.params.values())).device
    check_speed(cfg, device)
    _check_stackable(cfg)
    leaves = list(stacked.params.values())
    opt = make_optimizer(leaves, cfg)
    model.train()
    for step in progress(range(n_steps), desc=desc, total=n_steps):
        batches = [next(s) for s in streams]
        lr = lr_at(step, n_steps, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        with _autocast(cfg, device):
            logits = _stacked_forward(model, stacked, torch.stack([b.x for b in batches]))
            losses = _stacked_losses(logits, batches, cfg.loss)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # member j's parameters receive exactly the gradient of member j's loss
        regularize_and_clip(leaves, cfg, stacked=True)
        opt.step()
        if on_step is not None:
            for batch, member_logits in zip(batches, logits.detach()):
                on_step(step, batch, member_logits, lr)
    model.eval()


@torch.no_grad()
def stacked_update_bn(model: nn.Module, stacked: Stacked, data: LabeledData, cfg: TrainConfig,
                      generators: list[torch.Generator], device: torch.device) -> None:
    """``update_bn`` for k stacked models, member j on the batches of ``generators[j]``.

    ``update_bn``'s cumulative average sets BN's factor to ``1 / float(num_batches_tracked)``, which cannot be read
    from a counter batched under vmap; every member has seen the same number of batches, so the factor ``1 / t`` of
    batch t is set as BN's momentum instead (the same update).
    """
    norms = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    if not norms:
        return
    for name in norms:
        prefix = f"{name}." if name else ""
        stacked.buffers[prefix + "running_mean"].zero_()
        stacked.buffers[prefix + "running_var"].fill_(1)
        stacked.buffers[prefix + "num_batches_tracked"].zero_()
    saved = {name: m.momentum for name, m in norms.items()}
    streams = [batch_stream(data, cfg.batch_size, cfg.augment, g, device) for g in generators]
    model.train()
    try:
        for t in range(1, cfg.bn_batches + 1):
            for m in norms.values():
                m.momentum = 1.0 / t
            _stacked_forward(model, stacked, torch.stack([next(s).x for s in streams]))
    finally:
        for name, m in norms.items():
            m.momentum = saved[name]
        model.eval()


@torch.no_grad()
def eval_logits(model: nn.Module, data: LabeledData, batch_size: int = 1024,
                device: torch.device | None = None) -> Tensor:
    """Eval-mode logits of every sample in order (the eval view), shape ``(n, K)`` on CPU."""
    device = device or next(model.parameters()).device
    model.eval()
    return torch.cat([model(b.x).float().cpu() for b in iter_batches(data, batch_size, device=device)])


@dataclass
class ResumeFile:
    """Where ``train`` keeps its progress, so that an interrupted run continues from its last save.

    Saves happen at epoch ends, at most one per ``every_s`` seconds, atomically; the resumed run equals the
    uninterrupted one bit for bit on the same device (model, momentum, both generators and the bookkeeping are
    restored). The caller deletes the file once it has stored the finished result.

    Attributes:
        path: the file (one per run: key it like the run's result).
        every_s: least seconds between two saves (0 = every epoch).
    """

    path: Path
    every_s: float = 300.0

    def load(self) -> dict[str, Any] | None:
        return load_artifact(self.path, "training progress") if Path(self.path).is_file() else None

    def save(self, state: dict[str, Any]) -> None:
        atomic_save(state, self.path)

    def remove(self) -> None:
        Path(self.path).unlink(missing_ok=True)


def aum_margins(logits: Tensor, y: Tensor) -> Tensor:
    """The margin of each sample: its assigned label's logit minus the largest other logit, shape ``(b,)``
    (negative when the model predicts another class; Pleiss et al. 2020)."""
    assigned = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return assigned - others


class _Recorder:
    """Per-step bookkeeping of a full training run: forgetting events, trajectory checkpoints, epoch logs, and the
    progress saves of a resumable run."""

    def __init__(self, model, data, cfg, total, generator, device, log_fn, resume: ResumeFile | None = None,
                 order_generator: torch.Generator | None = None, optimizer: torch.optim.SGD | None = None,
                 last_step: int | None = None):
        self.model, self.data, self.cfg, self.total, self.device = model, data, cfg, total, device
        self.bn_generator, self.log_fn = generator, log_fn
        self.resume, self.order_generator, self.optimizer = resume, order_generator, optimizer
        self.last_step = total if last_step is None else last_step
        self.started = self.saved_at = time.monotonic()
        self.earlier_wall_s = 0.0  # spent by the runs this one resumed
        n = len(data)
        self.prev_correct = torch.zeros(n, dtype=torch.bool)
        self.ever_correct = torch.zeros(n, dtype=torch.bool)
        self.forgetting = torch.zeros(n, dtype=torch.long)
        self.margin_sum = torch.zeros(n, dtype=torch.float64)   # AUM: sum and count of each sample's margins
        self.margin_count = torch.zeros(n, dtype=torch.long)
        self.ckpt_steps = sorted({max(1, round(f * total)) for f in cfg.ckpt_fracs})
        self.trajectory: list[Checkpoint] = []
        self.history: list[dict[str, float]] = []
        self.loss_sum, self.correct_sum, self.seen = 0.0, 0, 0
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)

    def __call__(self, step: int, batch: Batch, logits: Tensor, lr: float) -> None:
        rows = batch.rows
        correct = (logits.argmax(-1) == batch.y).cpu()
        self.forgetting[rows] += (self.prev_correct[rows] & ~correct).long()
        self.prev_correct[rows] = correct
        self.ever_correct[rows] |= correct
        self.margin_sum[rows] += aum_margins(logits.detach(), batch.y).double().cpu()
        self.margin_count[rows] += 1
        self.loss_sum += per_sample_loss(logits, batch.y, self.cfg.loss, batch.targets).sum().item()
        self.correct_sum += int(correct.sum())
        self.seen += len(rows)
        done = step + 1
        if done % self.steps_per_epoch == 0 or done == self.total:
            self._end_epoch(done, lr)
        if done in self.ckpt_steps:
            update_bn(self.model, self.data, self.cfg, self.bn_generator, self.device)
            self.trajectory.append(Checkpoint(snapshot(self.model), done, lr))
            self.model.train()
        # Only at epoch ends: the data-order generator has then drawn exactly that epoch's permutation and
        # augmentations, so a fresh stream from its saved state continues the same sequence.
        if (self.resume is not None and done % self.steps_per_epoch == 0 and done < self.last_step
                and time.monotonic() - self.saved_at >= self.resume.every_s):
            self.resume.save(self.state(done))
            self.saved_at = time.monotonic()

    def state(self, done: int) -> dict[str, Any]:
        """Everything a resumed run needs to continue after step ``done`` exactly as this one would."""
        return {"step": done, "total": self.total, "model": snapshot(self.model),
                "optimizer": self.optimizer.state_dict(), "order_generator": self.order_generator.get_state(),
                "bn_generator": self.bn_generator.get_state(), "forgetting": self.forgetting.clone(),
                "margin_sum": self.margin_sum.clone(), "margin_count": self.margin_count.clone(),
                "prev_correct": self.prev_correct.clone(), "ever_correct": self.ever_correct.clone(),
                "trajectory": [{"state": c.state, "step": c.step, "lr": c.lr} for c in self.trajectory],
                "history": list(self.history), "wall_s": self.wall_s()}

    def wall_s(self) -> float:
        return self.earlier_wall_s + time.monotonic() - self.started

    def restore(self, state: dict[str, Any]) -> int:
        """Load a saved ``state`` into the model, optimizer, generators and bookkeeping; return its step."""
        if int(state["total"]) != self.total:
            raise ArtifactError(f"training progress in {self.resume.path} is for {state['total']} steps, this run "
                                f"has {self.total}; delete the file and rerun")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.order_generator.set_state(state["order_generator"])
        self.bn_generator.set_state(state["bn_generator"])
        self.forgetting, self.prev_correct = state["forgetting"], state["prev_correct"]
        self.ever_correct = state["ever_correct"]
        self.margin_sum, self.margin_count = state["margin_sum"], state["margin_count"]
        self.trajectory = [Checkpoint(c["state"], int(c["step"]), float(c["lr"])) for c in state["trajectory"]]
        self.history = list(state["history"])
        self.earlier_wall_s = float(state["wall_s"])
        return int(state["step"])

    def _end_epoch(self, done: int, lr: float) -> None:
        row = {"epoch": done / self.steps_per_epoch, "train/loss": self.loss_sum / max(1, self.seen),
               "train/acc": self.correct_sum / max(1, self.seen), "train/lr": lr}
        self.history.append(row)
        if self.log_fn is not None:
            self.log_fn(row)
        self.loss_sum, self.correct_sum, self.seen = 0.0, 0, 0


def train(model: nn.Module, data: LabeledData, cfg: TrainConfig, *, seed: int, device: torch.device,
          log_fn: Callable[[dict[str, float]], None] | None = None, desc: str = "train",
          max_steps: int | None = None, resume: ResumeFile | None = None) -> TrainResult:
    """Train ``model`` in place on ``data`` with recipe ``cfg``; BN statistics are refreshed at the end.

    Args:
        model: on ``device``.
        data: the training split (its ``y``, ``targets`` and ``weights`` are what is fitted).
        cfg: the recipe.
        seed: fixes data order, augmentation and the BN-refresh batches.
        device: where batches go.
        log_fn: receives one dict per epoch (``train/loss``, ``train/acc``, ``train/lr``).
        desc: progress-bar label.
        max_steps: stop after this many steps of the full schedule (e.g. the authors' EL2N: 10 epochs of a
            200-epoch schedule); checkpoints past the stop are not taken.
        resume: save progress there at epoch ends and, when it holds a save, continue from it (a long run that
            was interrupted); None = neither.

    Returns:
        TrainResult with the trajectory (one checkpoint per ``cfg.ckpt_fracs``), forgetting counts and history.
    """
    total = cfg.total_steps(len(data))
    order_gen = torch.Generator().manual_seed(seed)
    bn_gen = torch.Generator().manual_seed(seed + 1_000_003)
    steps = total if max_steps is None else min(max_steps, total)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    recorder = _Recorder(model, data, cfg, total, bn_gen, device, log_fn, resume, order_gen, optimizer, steps)
    saved = resume.load() if resume is not None else None
    start = recorder.restore(saved) if saved is not None else 0
    if start:
        log.info("%s: resuming at step %d of %d from %s", desc, start, steps, resume.path)
    stream = batch_stream(data, cfg.batch_size, cfg.augment, order_gen, device)
    sgd_steps(model, stream, steps, cfg, on_step=recorder, desc=desc, schedule_steps=total, optimizer=optimizer,
              start_step=start)
    if steps not in recorder.ckpt_steps:  # otherwise the last checkpoint already refreshed BN
        update_bn(model, data, cfg, bn_gen, device)
    model.eval()
    if torch.device(device).type == "cuda":  # the wall time should include the queued kernels
        torch.cuda.synchronize(device)
    return TrainResult(recorder.trajectory, recorder.forgetting, ~recorder.ever_correct, recorder.history,
                       recorder.wall_s(), recorder.margin_sum / recorder.margin_count.clamp(min=1))


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (same device), for methods that fine-tune without touching theta*."""
    return copy.deepcopy(model)
