"""Pretrain (or reuse a cached) theta* and wrap it as an ``InfluenceTask``: the Python front door.

    bundle = load_data(DataConfig(name="digits"), NoiseConfig(rate=0.2), seed=0)
    task = pretrained_task(bundle, ModelConfig("cnn_small"), TrainConfig(epochs=30), seed=0)
    scores = GEX(num_members=8, ft_step=100).fit(task).self_influence(task.train)

The checkpoint cache is keyed by a digest of the data actually trained on and evaluated (not by the configs that
produced it), so two bundles at different noise rates never share a theta*.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Callable

import torch

from gex.attribution import InfluenceTask
from gex.data import DataBundle
from gex.models import ModelConfig
from gex.runs import ArtifactCache
from gex.train import Checkpoint, ResumeFile, TrainConfig, eval_logits, train
from gex.utils import resolve_device

__all__ = ["pretrain_spec", "pretrained_task", "pretrain_metrics", "fitted_train_samples"]

log = logging.getLogger(__name__)


# What a cached pretraining record holds; bumped when it gains contents, so an older record (without them) is
# retrained instead of reused: 2 = the per-sample margins of AUM.
PRETRAIN_RECORD = 2


def pretrain_spec(bundle: DataBundle, model: ModelConfig, recipe: TrainConfig, seed: int) -> dict[str, Any]:
    """What determines a pretrained checkpoint: the data itself (digests), the architecture, recipe and seed, and
    the record's contents version."""
    return {"train_data": bundle.train.digest(), "test_data": bundle.test.digest(), "model": asdict(model),
            "train": recipe.cache_spec(), "seed": seed, "record": PRETRAIN_RECORD}


def _train_fresh(bundle, model_cfg, recipe, seed, device, log_fn, resume: ResumeFile | None) -> dict[str, Any]:
    model = model_cfg.build(bundle.train.input_shape, bundle.train.num_classes, seed=seed).to(device)
    result = train(model, bundle.train.to(device), recipe, seed=seed, device=device, log_fn=log_fn, desc="pretrain",
                   resume=resume)
    return {"state": {k: v.cpu() for k, v in model.state_dict().items()},
            "trajectory": [{"state": c.state, "step": c.step, "lr": c.lr} for c in result.trajectory],
            "forgetting": result.forgetting, "never_learned": result.never_learned, "aum": result.aum,
            "wall_s": result.wall_s}


def pretrained_task(bundle: DataBundle, model_cfg: ModelConfig, recipe: TrainConfig, *, seed: int,
                    device: torch.device | str = "auto", cache: ArtifactCache | None = None,
                    log_fn: Callable[[dict[str, float]], None] | None = None,
                    resume_every_s: float = 300.0) -> InfluenceTask:
    """Train theta* (or load it from ``cache``) and return the task every method consumes.

    Args:
        bundle: train/test data (noise applied); a digest of its tensors keys the cached checkpoint.
        model_cfg: architecture.
        recipe: pretraining recipe.
        seed: init, data order and everything else random.
        device: ``auto`` = CUDA when present.
        cache: artefact cache; None trains in memory.
        log_fn: per-epoch metrics sink.
        resume_every_s: with ``cache``, the least seconds between two saves of training progress (at epoch ends),
            from which an interrupted pretraining continues.

    Returns:
        InfluenceTask with theta*, the trajectory and the forgetting log.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    spec = pretrain_spec(bundle, model_cfg, recipe, seed)
    record = cache.load("pretrain", spec, "checkpoint") if cache is not None else None
    reused = record is not None
    if record is None:
        # With a cache, an interrupted pretraining continues from its last epoch-end save (``train``'s resume).
        resume = ResumeFile(cache.path("pretrain", spec, "progress"), resume_every_s) if cache is not None else None
        record = _train_fresh(bundle, model_cfg, recipe, seed, device, log_fn, resume)
        record["provenance"] = bundle.provenance
        if cache is not None:
            cache.save("pretrain", spec, "checkpoint", record)
            resume.remove()
    def make_model(seed: int | None = None, _own: int = seed):
        return model_cfg.build(bundle.train.input_shape, bundle.train.num_classes, seed=_own if seed is None else seed)

    model = make_model().to(device)
    model.load_state_dict(record["state"])
    model.eval()
    trajectory = [Checkpoint(c["state"], int(c["step"]), float(c["lr"])) for c in record["trajectory"]]
    return InfluenceTask(model=model, train=bundle.train.to(device), test=bundle.test.to(device), recipe=recipe,
                         make_model=make_model, trajectory=trajectory, forgetting=record["forgetting"],
                         never_learned=record["never_learned"], aum=record.get("aum"), loss=recipe.loss, device=device, seed=seed,
                         cache=cache, cache_spec=spec, pretrain_wall_s=0.0 if reused else float(record["wall_s"]))


def fitted_train_samples(task: InfluenceTask) -> torch.Tensor:
    """Bool ``(n,)`` on the CPU: theta* predicts the training label (noisy or not) of each sample."""
    return eval_logits(task.model, task.train).argmax(-1).cpu() == task.train.y.cpu()


def pretrain_metrics(task: InfluenceTask) -> dict[str, float]:
    """``train_acc`` (on the labels trained on), ``noisy_fit`` (mislabeled samples predicted as their noisy
    label) and ``test_acc`` of theta*."""
    test_pred = eval_logits(task.model, task.test).argmax(-1)
    noisy = task.train.is_noisy.cpu()
    fitted = fitted_train_samples(task)
    return {"train_acc": fitted.float().mean().item(),
            "noisy_fit": fitted[noisy].float().mean().item() if noisy.any() else float("nan"),
            "test_acc": (test_pred == task.test.y.cpu()).float().mean().item()}
