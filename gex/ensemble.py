"""The geometric ensemble (docs/method.md#the-method, docs/method.md#the-geometric-ensemble): members fine-tuned from theta* in cycles, one saved per cycle.

Member ``i`` belongs to chain ``i % num_chains`` and is that chain's cycle ``i // num_chains`` (members of the
chains interleaved, as the authors appended the D per-device snapshots after each stage). A cycle is
``ft_step`` SGD steps of ``gex.train.sgd_steps`` from a fresh momentum buffer on the noisy, shuffled (and, by
default, augmented) training stream, then ``update_bn`` and a snapshot of parameters and BN buffers.

- ``members="chain"``: member ``i`` starts where member ``i - num_chains`` ended (theta* for the first cycle of
  each chain), the FGE-style chain of the authors' code; with ``num_chains = C`` each chain runs ``ceil(M/C)``
  cycles, the last round only on the chains needed to reach exactly M members.
- ``members="independent"``: every member starts from theta* (an ablation).

Each cycle draws its data order and its BN-refresh batches from its own generator, ``task.generator`` salted
with the member index, so a member depends only on its start state and its index: resuming an interrupted
build, or growing M, gives bitwise the same members as an uninterrupted run. Fine-tuning is exactly
``M * ft_step`` optimizer steps. With a cache, one file per member (``member_<i>``) is written as soon as it is
finished and members are loaded one at a time when iterated; without one they are kept in memory.

``batch_members = k > 1`` trains up to k members that do not depend on each other together (``run_cycles``:
parameters and BN buffers stacked, one vmapped forward/backward per step, ``gex.train.stacked_sgd_steps``): the
members of one round of a chain (``rC .. rC+C-1``, which all start from round ``r-1``'s ends or theta*), or any
members with ``members="independent"``. Each member keeps its own data stream, augmentation draws, BN-refresh
batches and momentum buffer, so batched members equal sequential ones up to float rounding (not bitwise: vmap sums
in another order). ``batch_members`` is therefore not part of the cache key: members built either way are reused.
On a CPU the vmapped step is slower than k separate steps for conv nets (``experiments.bench``'s speed table);
the switch is for accelerators, where one wide step beats k narrow ones.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from gex.attribution import InfluenceTask
from gex.distributed import barrier, world_info
from gex.runs import atomic_save, load_artifact
from gex.train import (
    TrainConfig,
    batch_stream,
    clone_model,
    sgd_steps,
    snapshot,
    speed_of,
    stack_states,
    stacked_sgd_steps,
    stacked_update_bn,
    unstack_state,
    update_bn,
)

__all__ = ["EnsembleConfig", "Ensemble", "build_ensemble", "run_cycle", "run_cycles", "cycle_recipe", "bn_generator",
           "member_start", "member_chain", "FT_SCHEDULES", "MEMBER_MODES", "CONSTANT_CLIP_NORM"]

log = logging.getLogger(__name__)

State = dict[str, Tensor]
FT_SCHEDULES = ("cosine", "constant")
MEMBER_MODES = ("chain", "independent")
CONSTANT_CLIP_NORM = 1.0  # the authors clip the global gradient norm at 1 with the constant schedule
_SALT = 0x6E5E  # separates the ensemble's random streams from those of other methods


@dataclass
class EnsembleConfig:
    """How the members are made (the authors' ``ft_*`` flags; defaults: our CPU setting, docs/protocols.md#settings, docs/protocols.md#cpu-configurations).

    Attributes:
        num_members: M, the number of members (not part of the cache key: member i does not depend on M).
        ft_step: SGD steps per cycle.
        ft_lr: peak learning rate of a cycle.
        ft_schedule: ``cosine`` (ft_lr to 0 over the cycle, no warmup) or ``constant`` (with gradient-norm
            clipping at ``CONSTANT_CLIP_NORM``, the authors' pruning setting).
        ft_batch_size: samples per fine-tuning step.
        ft_augment: fine-tune (and refresh BN) on the augmented view, as the authors' code; independent of
            pretraining's augmentation switch. Off, members may stay memorized (docs/decisions.md#what-the-cpu-pilot-taught-us).
        num_chains: parallel chains (the authors ran one per device); 1 = one chain of M cycles.
        members: ``chain`` (each cycle continues the chain) or ``independent`` (each member from theta*).
        weight_decay: L2 coefficient on all parameters.
        momentum: heavy-ball momentum (the buffer restarts every cycle).
        bn_batches: train-view batches of the BN-statistics refresh after each cycle.
        batch_members: how many members that do not depend on each other train together (vmapped); 1 = one at a
            time (the sequential path). Not part of the cache key (the members agree up to float rounding).
    """

    num_members: int = 8
    ft_step: int = 200
    ft_lr: float = 0.05
    ft_schedule: str = "cosine"
    ft_batch_size: int = 128
    ft_augment: bool = True
    num_chains: int = 1
    members: str = "chain"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    bn_batches: int = 20
    batch_members: int = 1

    def __post_init__(self) -> None:
        for key in ("num_members", "ft_step", "ft_batch_size", "num_chains", "bn_batches", "batch_members"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key}={value!r} is invalid; it must be a positive integer")
        if not self.ft_lr > 0:
            raise ValueError(f"ft_lr={self.ft_lr!r} is invalid; it must be positive")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"weight_decay={self.weight_decay!r}, momentum={self.momentum!r} are invalid; "
                             f"need weight_decay >= 0 and 0 <= momentum < 1")
        if self.ft_schedule not in FT_SCHEDULES:
            raise ValueError(f"ft_schedule={self.ft_schedule!r} is unknown; valid choices: {list(FT_SCHEDULES)}")
        if self.members not in MEMBER_MODES:
            raise ValueError(f"members={self.members!r} is unknown; valid choices: {list(MEMBER_MODES)}")
        if self.num_chains > self.num_members:
            raise ValueError(f"num_chains={self.num_chains} exceeds num_members={self.num_members}; "
                             f"use at most one chain per member")
        if self.members == "independent" and self.num_chains != 1:
            raise ValueError(f"num_chains={self.num_chains} applies to members='chain' only; "
                             f"set num_chains=1 with members='independent'")

    def member_spec(self) -> dict[str, Any]:
        """The fields that determine member i (all but ``num_members`` and ``batch_members``), for the cache key."""
        return {k: v for k, v in asdict(self).items() if k not in ("num_members", "batch_members")}


def member_chain(cfg: EnsembleConfig, index: int) -> int:
    """The chain member ``index`` belongs to (with ``members="independent"`` every member is its own chain)."""
    return index if cfg.members == "independent" else index % cfg.num_chains


def member_start(cfg: EnsembleConfig, index: int) -> int | None:
    """The member whose end state member ``index`` starts from, or None for theta*."""
    if cfg.members == "independent" or index < cfg.num_chains:
        return None
    return index - cfg.num_chains


def cycle_recipe(cfg: EnsembleConfig, loss: str) -> TrainConfig:
    """The ``TrainConfig`` of one cycle: pure cosine (warmup 0) or constant with clipping, ``ft_step`` steps."""
    constant = cfg.ft_schedule == "constant"
    return TrainConfig(epochs=1, steps=cfg.ft_step, batch_size=cfg.ft_batch_size, lr=cfg.ft_lr,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay, warmup_frac=0.0,
                       schedule="constant" if constant else "warmup_cosine",
                       clip_norm=CONSTANT_CLIP_NORM if constant else None, augment=cfg.ft_augment,
                       ckpt_fracs=[1.0], bn_batches=cfg.bn_batches, loss=loss)


def bn_generator(task: InfluenceTask, index: int) -> torch.Generator:
    """The generator of member ``index``'s BN-refresh batches (its data stream uses ``_SALT + 2 * index``)."""
    return task.generator(_SALT + 2 * index + 1)


def run_cycle(task: InfluenceTask, cfg: EnsembleConfig, start: State, index: int,
              on_step: Callable[..., None] | None = None) -> State:
    """One cycle from ``start``: ``ft_step`` SGD steps, BN refresh, snapshot (theta* itself is left untouched).

    Args:
        task: the pretrained task (its train split, loss, device and seed).
        cfg: the ensemble config.
        start: parameters and buffers to start from (a ``snapshot``).
        index: the member index; it salts the cycle's data-order and BN generators.
        on_step: passed to ``sgd_steps`` (called after each step with step, batch, logits, lr).

    Returns:
        The member's parameters and BN buffers, on CPU. The pretraining recipe's speed switches
        (``channels_last``, ``amp_bf16``, ``compile``) apply to the cycle too.
    """
    model = clone_model(task.model)
    model.load_state_dict(start)
    recipe = replace(cycle_recipe(cfg, task.loss), **speed_of(task.recipe) if task.recipe is not None else {})
    stream = batch_stream(task.train, cfg.ft_batch_size, cfg.ft_augment, task.generator(_SALT + 2 * index),
                          task.device)
    sgd_steps(model, stream, cfg.ft_step, recipe, on_step=on_step, desc=f"ensemble member {index}")
    update_bn(model, task.train, recipe, bn_generator(task, index), task.device)
    return snapshot(model)


def run_cycles(task: InfluenceTask, cfg: EnsembleConfig, starts: list[State], indices: list[int],
               on_step: Callable[..., None] | None = None) -> list[State]:
    """``run_cycle`` for k members at once (stacked under vmap); member ``indices[j]`` starts from ``starts[j]``.

    Each member draws from its own generators (``_SALT + 2 * index`` for its data and augmentation,
    ``+ 1`` for its BN refresh) and has its own momentum buffer, so the results equal k ``run_cycle`` calls up to
    float rounding.

    Args:
        task: the pretrained task.
        cfg: the ensemble config.
        starts: k start states (``snapshot``s).
        indices: the k member indices.
        on_step: called after each step once per member, in the order of ``indices``, with (step, that member's
            batch, its logits, lr); the k members' calls of step t all come before those of step t + 1.

    Returns:
        The k members' parameters and BN buffers, on CPU, in the order of ``indices``.

    Raises:
        ValueError: the pretraining recipe asks for ``channels_last`` or ``compile`` (not run under vmap).
    """
    model = clone_model(task.model)  # a container for functional_call: its own weights are not used
    recipe = replace(cycle_recipe(cfg, task.loss), **speed_of(task.recipe) if task.recipe is not None else {})
    stacked = stack_states(model, starts, task.device)
    streams = [batch_stream(task.train, cfg.ft_batch_size, cfg.ft_augment, task.generator(_SALT + 2 * i),
                            task.device) for i in indices]
    stacked_sgd_steps(model, stacked, streams, cfg.ft_step, recipe, on_step=on_step,
                      desc=f"ensemble members {indices[0]}-{indices[-1]}")
    stacked_update_bn(model, stacked, task.train, recipe, [bn_generator(task, i) for i in indices],
                      task.device)
    return [unstack_state(stacked, j) for j in range(len(indices))]


class Ensemble:
    """The M members, each a ``snapshot`` dict; loaded one at a time when they live in the cache.

    Args:
        size: M.
        loader: member index -> state dict.
        where: a description for logs (the cache folder or ``memory``).
    """

    def __init__(self, size: int, loader: Callable[[int], State], where: str = "memory"):
        self._size, self._loader, self.where = size, loader, where

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> State:
        if not 0 <= index < self._size:
            raise IndexError(f"ensemble member {index} out of range (M={self._size})")
        return self._loader(index)

    def __iter__(self) -> Iterator[State]:
        return (self[i] for i in range(self._size))


class _MemberStore:
    """Members in the artefact cache (one file each, kind ``ensemble``) or, without a cache, in memory."""

    def __init__(self, task: InfluenceTask, cfg: EnsembleConfig):
        self.memory: dict[int, State] = {}
        self.folder: Path | None = None
        if task.cache is not None:
            if not task.cache_spec:
                raise ValueError("task.cache_spec is empty: ensemble members cannot be keyed to theta*; build the "
                                 "task with gex.pipeline.pretrained_task or pass cache=None")
            spec = {"pretrain": task.cache_spec, "loss": task.loss, "ensemble": cfg.member_spec()}
            self.folder = task.cache.directory("ensemble", spec)

    def _path(self, index: int) -> Path:
        return self.folder / f"member_{index}.pt"

    def has(self, index: int) -> bool:
        return index in self.memory if self.folder is None else self._path(index).is_file()

    def get(self, index: int) -> State:
        if self.folder is None:
            return self.memory[index]
        return load_artifact(self._path(index), f"ensemble member {index}")

    def put(self, index: int, state: State) -> None:
        if self.folder is None:
            self.memory[index] = state
        else:
            atomic_save(state, self._path(index))  # the member file appears whole or not at all

    def ensemble(self, size: int) -> Ensemble:
        return Ensemble(size, self.get, str(self.folder) if self.folder is not None else "memory")


def _next_group(cfg: EnsembleConfig, store: _MemberStore, pending: list[int]) -> list[int]:
    """Up to ``batch_members`` pending members whose start is ready (theta* or a finished member), lowest first.

    The lowest pending member is always ready (its start has a lower index), so chains advance round by round.
    """
    ready = [i for i in pending if member_start(cfg, i) is None or store.has(member_start(cfg, i))]
    return ready[:cfg.batch_members]


def build_ensemble(task: InfluenceTask, cfg: EnsembleConfig,
                   on_step: Callable[..., None] | None = None) -> Ensemble:
    """Build (or load, or finish) the M members of ``cfg`` for ``task``.

    Finished members found in ``task.cache`` are reused (a log line says how many); a missing member is trained
    from its start state (theta* or the saved member it continues), so an interrupted build resumes where it
    stopped and gives the same members as an uninterrupted one. Under a process group of world size > 1
    (``torchrun``) with a cache every rank sees, chain c is trained by rank ``c % world_size`` and the ranks meet
    at a barrier before loading the ensemble (without a cache every rank trains every member).

    Args:
        task: the pretrained task; ``task.cache`` (None = in memory) holds one file per member.
        cfg: the ensemble config.
        on_step: per-step callback of the fine-tuning (counting, logging); with ``batch_members > 1`` it is
            called once per member per step, a group's members interleaved step by step (see ``run_cycles``).

    Returns:
        The ensemble, ``len == cfg.num_members``.

    Raises:
        ValueError: a cache without ``task.cache_spec`` to key the members.
    """
    store = _MemberStore(task, cfg)
    theta_star = snapshot(task.model)
    pending = [i for i in range(cfg.num_members) if not store.has(i)]
    trained = len(pending)
    info = world_info()
    sharded = info.world_size > 1 and store.folder is not None
    if sharded:  # under torchrun with a shared cache: this rank trains its chains only (a chain never crosses ranks)
        pending = [i for i in pending if member_chain(cfg, i) % info.world_size == info.rank]
    while pending:
        group = _next_group(cfg, store, pending)
        starts = [theta_star if member_start(cfg, i) is None else store.get(member_start(cfg, i)) for i in group]
        begin = time.perf_counter()
        states = [run_cycle(task, cfg, starts[0], group[0], on_step)] if len(group) == 1 else \
            run_cycles(task, cfg, starts, group, on_step)
        for index, state in zip(group, states):
            store.put(index, state)
            pending.remove(index)
        log.info("ensemble members %s of %d trained in %.1fs", group, cfg.num_members, time.perf_counter() - begin)
    if sharded:
        barrier()  # every rank's members are in the cache now
    ensemble = store.ensemble(cfg.num_members)
    if trained < cfg.num_members:
        log.info("ensemble: reused %d of %d finished members from %s", cfg.num_members - trained,
                 cfg.num_members, ensemble.where)
    return ensemble
