"""EL2N (docs/baselines.md#el2n): the squared error of early-training predictions, averaged over short runs from fresh inits.

Score of sample i: ``(1/R) sum_r sum_k (p_k(x_i; theta_r) - onehot(y_i)_k)^2`` (the Brier score, i.e. the *squared*
L2 error as the authors, not Paul et al.'s norm), where ``theta_r`` is a fresh init trained for ``epochs`` epochs with
the pretraining recipe and its BN statistics refreshed; ``p`` is the softmax (``ce``) or sigmoid (``bce``).

Where we differ from the authors: each repeat's init and data order come from the *run* seed (the authors fixed
42), so seeds give independent repeats.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData
from gex.train import TrainConfig, clone_model, eval_logits, train

__all__ = ["EL2N", "brier"]

log = logging.getLogger(__name__)

_SALT_INIT = 7_001   # separates EL2N's init seeds from other methods' streams
_SALT_ORDER = 7_501  # and its data-order seeds from its init seeds


def brier(logits: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    """Brier score ``sum_k (p_k - onehot(y)_k)^2`` of each row, ``(n,)``; ``p`` = softmax (ce) or sigmoid (bce)."""
    probs = logits.float().softmax(-1) if loss == "ce" else logits.float().sigmoid()
    return (probs - F.one_hot(y.long().cpu(), logits.shape[-1]).float()).pow(2).sum(-1)


@register("el2n")
class EL2N(Attributor):
    """EL2N (Brier) scores from ``repeats`` short trainings (paper: 5 x 10 epochs).

    Args:
        repeats: independent short trainings, each from its own fresh init.
        epochs: epochs each repeat trains.
        schedule_epochs: length of the LR schedule in epochs; None = the recipe's (as the authors, so training
            stops early in the schedule, still in warmup at paper settings); set it to ``epochs`` to size the
            schedule to the short run.
    """

    def __init__(self, repeats: int = 3, epochs: int = 5, schedule_epochs: int | None = None):
        if repeats < 1:
            raise MethodError(f"el2n.repeats must be >= 1, got {repeats}")
        if epochs < 1:
            raise MethodError(f"el2n.epochs must be >= 1, got {epochs}")
        if schedule_epochs is not None and schedule_epochs < epochs:
            raise MethodError(f"el2n.schedule_epochs={schedule_epochs} must be >= el2n.epochs={epochs} or null "
                              f"(null = the recipe's epochs)")
        self.repeats, self.epochs, self.schedule_epochs = repeats, epochs, schedule_epochs
        self.states_: list[dict[str, Tensor]] = []
        self.init_seeds_: list[int] = []

    def init_model(self, task: InfluenceTask, repeat: int) -> nn.Module:
        """The fresh, untrained model of repeat ``repeat`` (its init seed comes from the run seed)."""
        return task.fresh_model(task.derived_seed(_SALT_INIT + repeat))

    def _schedule(self, task: InfluenceTask) -> tuple[TrainConfig, int]:
        """(recipe with the schedule length, steps actually run)."""
        n = len(task.train)
        cfg = replace(task.recipe, epochs=self.schedule_epochs or task.recipe.epochs, steps=None)
        return cfg, replace(cfg, epochs=self.epochs).total_steps(n)

    def _spec(self, task: InfluenceTask) -> dict[str, Any]:
        return {"pretrain": task.cache_spec, "method": self.name, "epochs": self.epochs,
                "schedule_epochs": self.schedule_epochs}

    def _train_repeat(self, task: InfluenceTask, repeat: int) -> dict[str, Tensor]:
        cached = task.cache.load("el2n", self._spec(task), f"repeat{repeat}") if task.cache is not None else None
        if cached is not None:
            return cached
        model = self.init_model(task, repeat)
        cfg, stop = self._schedule(task)
        train(model, task.train, cfg, seed=task.derived_seed(_SALT_ORDER + repeat), device=task.device,
              max_steps=stop, desc="el2n")
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if task.cache is not None:
            task.cache.save("el2n", self._spec(task), f"repeat{repeat}", state)
        return state

    def fit(self, task: InfluenceTask) -> "EL2N":
        """Train the ``repeats`` short runs (cached per repeat through ``task.cache``)."""
        super().fit(task)
        task.training_recipe(self.name)  # it trains from scratch: refuse a task without a recipe first
        self.init_seeds_ = [task.derived_seed(_SALT_INIT + r) for r in range(self.repeats)]
        self.states_ = [self._train_repeat(task, r) for r in range(self.repeats)]
        return self

    def repeat_logits(self, data: LabeledData) -> Tensor:
        """Eval-mode logits of ``data`` under each repeat's trained model, shape ``(repeats, n, K)``."""
        task = self._require_fit()
        container = clone_model(task.model)
        out = []
        for state in self.states_:
            container.load_state_dict(state)
            out.append(eval_logits(container, data, device=task.device))
        return torch.stack(out)

    def self_influence(self, data: LabeledData) -> Tensor:
        """Mean Brier score over repeats of each sample with its label ``data.y``, ``(n,)``; higher = more
        likely mislabeled or hard."""
        task = self._require_fit()
        logits = self.repeat_logits(data)
        return torch.stack([brier(lg, data.y, task.loss) for lg in logits]).mean(0)
