"""The one training loop: pretraining, ensemble cycles, EL2N, CL folds, relabel and prune retraining.

SGD with heavy-ball momentum and an L2 penalty on *all* parameters (the authors' ``wd/2 ||theta||^2``), train-mode
BN, linear warmup then cosine (or constant LR with gradient-norm clipping, the clip seeing the L2 term as in the
authors' optax chain), trajectory checkpoints, forgetting counts, and a BN-statistics refresh before every
evaluation and snapshot.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from gex.data import Batch, LabeledData, iter_batches
from gex.losses import LOSSES, per_sample_loss
from gex.utils import progress

__all__ = ["TrainConfig", "Checkpoint", "TrainResult", "train", "sgd_steps", "lr_at", "update_bn",
           "eval_logits", "eval_losses", "batch_stream", "snapshot", "clone_model"]

SCHEDULES = ("warmup_cosine", "constant")


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

    def __post_init__(self) -> None:
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


def _weighted_loss(model: nn.Module, batch: Batch, loss: str) -> tuple[Tensor, Tensor]:
    logits = model(batch.x)
    losses = per_sample_loss(logits, batch.y, loss, batch.targets)
    if batch.weights is not None:
        return (losses * batch.weights).sum() / batch.weights.sum(), logits
    return losses.mean(), logits


def sgd_steps(model: nn.Module, stream: Iterator[Batch], n_steps: int, cfg: TrainConfig,
              on_step: Callable[[int, Batch, Tensor, float], None] | None = None, desc: str = "train",
              schedule_steps: int | None = None) -> None:
    """Run ``n_steps`` SGD steps of ``cfg`` from a fresh momentum buffer.

    Args:
        model: trained in place (train mode during the steps, eval mode after).
        stream: batches (see ``batch_stream``).
        n_steps: number of optimizer steps.
        schedule_steps: length of the LR schedule (default ``n_steps``); longer = stop early inside it (EL2N).
        cfg: the recipe (lr, momentum, weight decay, schedule, clipping, loss).
        on_step: called after each step with (step, batch, pre-update logits, lr).
        desc: progress-bar label.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # With clipping, the L2 term must be in the gradient before the clip (as the authors' optax chain), so
    # add it by hand; otherwise PyTorch's fused weight_decay is the same L2 gradient.
    manual_wd = cfg.clip_norm is not None
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=0.0 if manual_wd else cfg.weight_decay)
    model.train()
    for step in progress(range(n_steps), desc=desc, total=n_steps):
        batch = next(stream)
        lr = lr_at(step, schedule_steps or n_steps, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, logits = _weighted_loss(model, batch, cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if manual_wd:
            with torch.no_grad():
                for p in params:
                    p.grad.add_(p, alpha=cfg.weight_decay)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        opt.step()
        if on_step is not None:
            on_step(step, batch, logits.detach(), lr)
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


@torch.no_grad()
def eval_logits(model: nn.Module, data: LabeledData, batch_size: int = 1024,
                device: torch.device | None = None) -> Tensor:
    """Eval-mode logits of every sample in order (the eval view), shape ``(n, K)`` on CPU."""
    device = device or next(model.parameters()).device
    model.eval()
    return torch.cat([model(b.x).float().cpu() for b in iter_batches(data, batch_size, device=device)])


def eval_losses(model: nn.Module, data: LabeledData, loss: str = "ce", batch_size: int = 1024,
                device: torch.device | None = None) -> Tensor:
    """Eval-mode per-sample loss with the labels in ``data.y`` (noisy for the train set), shape ``(n,)``."""
    logits = eval_logits(model, data, batch_size, device)
    return per_sample_loss(logits, data.y.cpu(), loss)


class _Recorder:
    """Per-step bookkeeping of a full training run: forgetting events, trajectory checkpoints, epoch logs."""

    def __init__(self, model, data, cfg, total, generator, device, log_fn):
        self.model, self.data, self.cfg, self.total, self.device = model, data, cfg, total, device
        self.bn_generator, self.log_fn = generator, log_fn
        n = len(data)
        self.prev_correct = torch.zeros(n, dtype=torch.bool)
        self.ever_correct = torch.zeros(n, dtype=torch.bool)
        self.forgetting = torch.zeros(n, dtype=torch.long)
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

    def _end_epoch(self, done: int, lr: float) -> None:
        row = {"epoch": done / self.steps_per_epoch, "train/loss": self.loss_sum / max(1, self.seen),
               "train/acc": self.correct_sum / max(1, self.seen), "train/lr": lr}
        self.history.append(row)
        if self.log_fn is not None:
            self.log_fn(row)
        self.loss_sum, self.correct_sum, self.seen = 0.0, 0, 0


def train(model: nn.Module, data: LabeledData, cfg: TrainConfig, *, seed: int, device: torch.device,
          log_fn: Callable[[dict[str, float]], None] | None = None, desc: str = "train",
          max_steps: int | None = None) -> TrainResult:
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

    Returns:
        TrainResult with the trajectory (one checkpoint per ``cfg.ckpt_fracs``), forgetting counts and history.
    """
    total = cfg.total_steps(len(data))
    order_gen = torch.Generator().manual_seed(seed)
    bn_gen = torch.Generator().manual_seed(seed + 1_000_003)
    recorder = _Recorder(model, data, cfg, total, bn_gen, device, log_fn)
    stream = batch_stream(data, cfg.batch_size, cfg.augment, order_gen, device)
    steps = total if max_steps is None else min(max_steps, total)
    sgd_steps(model, stream, steps, cfg, on_step=recorder, desc=desc, schedule_steps=total)
    if steps not in recorder.ckpt_steps:  # otherwise the last checkpoint already refreshed BN
        update_bn(model, data, cfg, bn_gen, device)
    model.eval()
    return TrainResult(recorder.trajectory, recorder.forgetting, ~recorder.ever_correct, recorder.history)


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (same device), for methods that fine-tune without touching theta*."""
    return copy.deepcopy(model)
