"""Retraining from theta*'s initialization, shared by relabel, prune, separate and the ground truth: the recipe,
the test accuracy of a retrain, and the cache of method-independent reference retrains.

A retrain is cached by what it sees (theta*'s spec, the recipe, and digests of its training and test data), so an
interrupted grid of retrains continues past the finished ones and nothing is reused for other data.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

from experiments.metrics import accuracy
from experiments.scaffold import UsageError
from gex.attribution import InfluenceTask
from gex.data import LabeledData
from gex.train import TrainConfig, train

__all__ = ["check_retrain_epochs", "retrain_recipe", "retrain_test_acc", "cached_value", "unchanged_test_acc"]


def check_retrain_epochs(value: Optional[int]) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"task.retrain_epochs={value} must be a positive integer or null (= the pretraining recipe)")


def retrain_recipe(recipe: TrainConfig, epochs: Optional[int]) -> TrainConfig:
    """The pretraining recipe, with ``epochs`` replaced when given (steps are then sized from the data)."""
    return recipe if epochs is None else replace(recipe, epochs=int(epochs), steps=None)


def retrain_test_acc(task: InfluenceTask, data: LabeledData, recipe: TrainConfig, test: LabeledData,
                     desc: str = "retrain", replicate: int = 0) -> float:
    """Train a fresh model from theta*'s initialization (``task.fresh_model()``, same seed and data order) on
    ``data`` with ``recipe`` (schedule sized to ``len(data)``; BN refreshed) and return its accuracy on ``test``.

    ``replicate`` r > 0 keeps the initialization and draws another data order (seed ``task.seed * 1000 + r``): a
    repeat of the same retrain that measures, and averages away, retraining noise (docs/protocols.md#dataset-pruning).

    Cached by what the retrain sees (theta*'s spec, the recipe, the replicate, and the contents of ``data`` and
    ``test``), so a task that was interrupted after some of its retrains (a pruning grid) continues past the
    finished ones.
    """
    if replicate < 0:
        raise ValueError(f"retrain replicate must be >= 0, got {replicate}")
    order_seed = task.seed if replicate == 0 else task.seed * 1000 + replicate

    def compute() -> float:
        model = task.fresh_model()
        train(model, data, recipe, seed=order_seed, device=task.device, desc=desc)
        return accuracy(model, test)

    what = {"job": "retrain", "recipe": recipe.cache_spec(), "data": data.digest(), "test": test.digest()}
    if replicate:  # replicate 0 keeps the key it always had, so earlier caches stay valid
        what["replicate"] = replicate
    return cached_value(task, what, compute)


def cached_value(task: InfluenceTask, what: dict[str, Any], compute: Callable[[], float]) -> float:
    """A method-independent number (e.g. a reference retrain's accuracy), cached by theta*'s spec plus ``what``."""
    if task.cache is None:
        return compute()
    spec = {"pretrain": task.cache_spec, **what}
    hit = task.cache.load("retrain", spec, "result")
    if hit is not None:  # ArtifactCache.load has logged the reuse
        return float(hit["value"])
    value = float(compute())
    task.cache.save("retrain", spec, "result", {"value": value})
    return value


def unchanged_test_acc(task: InfluenceTask, recipe: TrainConfig, test: LabeledData, test_name: str,
                       replicate: int = 0) -> float:
    """Accuracy on ``test`` of a retrain on the unchanged training set (cached; independent of the method).

    With the pretraining recipe itself (and replicate 0) that retrain is pretraining repeated: the same
    initialization, data order and recipe give theta* again, so theta*'s accuracy is returned without training.
    """
    if replicate == 0 and recipe == task.recipe:
        return accuracy(task.model, test)
    what = {"job": "retrain_unchanged", "recipe": recipe.cache_spec(), "test": test_name}
    if replicate:
        what["replicate"] = replicate
    return cached_value(task, what, lambda: retrain_test_acc(task, task.train, recipe, test, "retrain (unchanged)",
                                                             replicate))
