"""Confident learning (docs/baselines.md#confident-learning, Northcutt et al. 2021) through cleanlab, with K-fold cross-fitting.

Each fold trains a fresh model with the pretraining recipe on the other folds and predicts its own rows in eval
mode, so *every* sample gets an out-of-fold probability. This fixes the authors' bug (B7 item 8): they passed
only the last fold's labels and logits to cleanlab, so half the samples were scored against zero logits.

Sign: cleanlab's label quality is high for a *good* label; our self-influence is high for a suspicious one, so
the score is ``1 - quality`` (flipped here, at the adapter).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import cleanlab.rank
import torch
from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData
from gex.train import eval_logits, train

__all__ = ["ConfidentLearning", "QUALITY_METHODS"]

QUALITY_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
_SALT_FOLDS, _SALT_INIT, _SALT_ORDER = 9_001, 9_101, 9_201  # separate streams: fold split, inits, data order


@register("cl")
class ConfidentLearning(Attributor):
    """``1 - cleanlab`` label quality from out-of-fold predicted probabilities; higher = more likely mislabeled.

    Args:
        folds: K of the K-fold cross-fitting (the authors: 2).
        epochs: epochs each fold model trains (on its ``(K-1)/K`` share); None = the recipe's.
        quality_method: cleanlab's ``get_label_quality_scores`` method.
    """

    def __init__(self, folds: int = 2, epochs: int | None = None, quality_method: str = "self_confidence"):
        if folds < 2:
            raise MethodError(f"cl.folds must be >= 2 (out-of-fold predictions need a held-out fold), got {folds}")
        if epochs is not None and epochs < 1:
            raise MethodError(f"cl.epochs must be >= 1 or null (= the recipe's), got {epochs}")
        if quality_method not in QUALITY_METHODS:
            raise MethodError(f"cl.quality_method={quality_method!r} is unknown; valid choices: "
                              f"{list(QUALITY_METHODS)}")
        self.folds, self.epochs, self.quality_method = folds, epochs, quality_method
        self.fold_ids_: Tensor | None = None
        self.oof_probs_: Tensor | None = None
        self.scores_: Tensor | None = None

    def fold_ids(self, task: InfluenceTask) -> Tensor:
        """Fold of each training sample, long ``(n,)``: a seeded permutation dealt round-robin (sizes differ by
        at most 1)."""
        n = len(task.train)
        perm = torch.randperm(n, generator=task.generator(_SALT_FOLDS))
        ids = torch.empty(n, dtype=torch.long)
        ids[perm] = torch.arange(n) % self.folds
        return ids

    def _spec(self, task: InfluenceTask) -> dict[str, Any]:
        return {"pretrain": task.cache_spec, "method": self.name, "folds": self.folds, "epochs": self.epochs}

    def _fold_logits(self, task: InfluenceTask, fold: int, held_out: Tensor) -> Tensor:
        """Eval-mode logits ``(len(held_out), K)`` of a fresh model trained on every row outside ``held_out``."""
        cached = task.cache.load("cl", self._spec(task), f"fold{fold}") if task.cache is not None else None
        if cached is not None:
            return cached
        inside = torch.ones(len(task.train), dtype=torch.bool)
        inside[held_out] = False
        # One checkpoint at the end: train() refreshes BN there and keeps no trajectory we do not need.
        cfg = replace(task.recipe, epochs=self.epochs or task.recipe.epochs, steps=None, ckpt_fracs=[1.0])
        model = task.fresh_model(task.derived_seed(_SALT_INIT + fold))
        train(model, task.train.subset(inside.nonzero().squeeze(1)), cfg,
              seed=task.derived_seed(_SALT_ORDER + fold), device=task.device, desc=f"cl fold {fold}")
        logits = eval_logits(model, task.train.subset(held_out), device=task.device)
        if task.cache is not None:
            task.cache.save("cl", self._spec(task), f"fold{fold}", logits)
        return logits

    def fit(self, task: InfluenceTask) -> "ConfidentLearning":
        """Train one model per fold and score every training sample from its out-of-fold probabilities."""
        super().fit(task)
        task.training_recipe(self.name)  # it trains from scratch: refuse a task without a recipe first
        n, k = len(task.train), task.train.num_classes
        self.fold_ids_ = self.fold_ids(task)
        probs = torch.full((n, k), float("nan"), dtype=torch.float64)
        for fold in range(self.folds):
            held_out = (self.fold_ids_ == fold).nonzero().squeeze(1)
            probs[held_out] = self._fold_logits(task, fold, held_out).double().softmax(-1)
        if torch.isnan(probs).any():  # cannot happen with a partition; guards the authors' bug coming back
            raise MethodError(f"cl: {int(torch.isnan(probs).any(1).sum())} samples have no out-of-fold prediction")
        self.oof_probs_ = probs
        quality = cleanlab.rank.get_label_quality_scores(task.train.y.cpu().numpy(), probs.numpy(),
                                                         method=self.quality_method)
        self.scores_ = 1.0 - torch.as_tensor(quality, dtype=torch.float64)
        return self

    def self_influence(self, data: LabeledData) -> Tensor:
        """``1 - label quality`` of each sample of ``data`` (which must be training samples), float64 ``(n,)``."""
        task = self._require_fit()
        return self.scores_[task.train_rows(data, self.name)]
