"""What is attributed (``InfluenceTask``) kept apart from how (``Attributor``), plus the registry of methods.

Sign conventions, shared by every method:
- self-influence: higher = more influential (more likely mislabeled or rare);
- pairwise influence ``(n_train, n_test)``: positive = the training sample lowers the test sample's loss
  (a proponent), as GEX's covariance and ``g_test^T H^-1 g_train``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from gex.data import LabeledData
from gex.runs import ArtifactCache
from gex.train import Checkpoint, TrainConfig

__all__ = ["InfluenceTask", "Attributor", "METHODS", "register", "build_method", "MethodError"]


class MethodError(ValueError):
    """A method asked for something it cannot do on this task (unknown name, unsupported model, ...)."""


@dataclass
class InfluenceTask:
    """Everything a method may use about the trained model; methods never name datasets or models.

    Attributes:
        model: theta*, on ``device``, eval mode, BN statistics refreshed.
        train: the training set as trained on (noisy labels in ``y``); iterate it with ``iter_batches`` for the
            eval view (fixed order, un-augmented) or the train view (shuffled, ``augment=True``).
        test: the test set.
        recipe: the pretraining recipe (methods that train reuse it: EL2N, CL folds, ensemble cycles).
        make_model: ``make_model(seed=None)`` builds a fresh, untrained model of the same architecture (seed None =
            theta*'s own init, as retraining from the same initialization needs).
        trajectory: pretraining checkpoints with the LR in force at each.
        forgetting: forgetting-event counts from pretraining ``(n_train,)``, or None.
        never_learned: bool ``(n_train,)``: never fitted during pretraining, or None.
        loss: ``ce`` or ``bce``.
        device: where work runs.
        seed: the run seed (methods derive their own generators from it).
        cache: artefact cache, or None to keep everything in memory.
        cache_spec: the pretrained checkpoint's spec; method artefacts are keyed by it plus their own config.
        pretrain_wall_s: seconds spent training theta* in this run (0 when it came from the cache).
    """

    model: nn.Module
    train: LabeledData
    test: LabeledData
    recipe: TrainConfig
    make_model: Callable[[], nn.Module]
    trajectory: list[Checkpoint] = field(default_factory=list)
    forgetting: Tensor | None = None
    never_learned: Tensor | None = None
    loss: str = "ce"
    device: torch.device = torch.device("cpu")
    seed: int = 0
    cache: ArtifactCache | None = None
    cache_spec: dict[str, Any] = field(default_factory=dict)
    pretrain_wall_s: float = 0.0

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator derived from the run seed (``salt`` separates a method's streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def derived_seed(self, salt: int) -> int:
        """A non-negative int seed drawn from the run seed and ``salt`` (one independent stream per salt)."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator(salt)))

    def fresh_model(self, seed: int | None = None) -> nn.Module:
        """An untrained model on ``device``: theta*'s own init (seed None) or one seeded by ``seed``."""
        return self.make_model(seed=seed).to(self.device)

    def train_rows(self, data: LabeledData, method: str) -> Tensor:
        """Positions in ``train`` of the samples of ``data`` (matched by original index), long ``(n,)``.

        For methods whose scores exist only for training samples (forgetting, CL).

        Raises:
            MethodError: some sample of ``data`` is not a training sample (e.g. the test set).
        """
        ref, want = self.train.index.cpu(), data.index.cpu()
        if torch.equal(ref, want):
            rows = torch.arange(len(ref))
        else:
            lookup = torch.full((int(max(ref.max(), want.max())) + 1,), -1, dtype=torch.long)
            lookup[ref] = torch.arange(len(ref))
            rows = lookup[want]
        ok = bool((rows >= 0).all()) and torch.equal(self.train.y[rows.to(self.train.y.device)].cpu(), data.y.cpu()) \
            and torch.equal(self.train.x[rows.to(self.train.x.device)].cpu(), data.x.cpu())
        if not ok:
            raise MethodError(f"{method} scores only training samples, and data={data.name!r} is not (a subset of) "
                              f"task.train; pass task.train or task.train.subset(rows)")
        return rows


class Attributor:
    """The protocol: ``fit`` does the costly part once; scoring is cheap and may be called many times."""

    name: ClassVar[str] = "attributor"
    task: InfluenceTask | None = None

    def fit(self, task: InfluenceTask) -> "Attributor":
        """Build what scoring needs (ensembles, curvature, projections), caching through ``task.cache``."""
        self.task = task
        return self

    def self_influence(self, data: LabeledData) -> Tensor:
        """Self-influence of every sample in ``data``, shape ``(n,)``; higher = more influential."""
        raise NotImplementedError(f"{self.name} has no self-influence")

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """Pairwise influence, shape ``(n_train, n_test)``; positive = train sample lowers the test loss."""
        raise NotImplementedError(f"method {self.name!r} has no pairwise influence; use self_influence")

    def influence_on_mean_test(self, train: LabeledData, test: LabeledData) -> Tensor:
        """Influence on the mean test loss, shape ``(n_train,)`` (default: the matrix averaged over test)."""
        return self.influence(train, test).mean(dim=1)

    def diagnostics(self) -> dict[str, float]:
        """Extra numbers for the run record (e.g. GEX member-loss medians); empty by default."""
        return {}

    def _require_fit(self) -> InfluenceTask:
        if self.task is None:
            raise MethodError(f"{self.name}: call fit(task) before scoring")
        return self.task


METHODS: dict[str, type[Attributor]] = {}


def register(name: str) -> Callable[[type[Attributor]], type[Attributor]]:
    """Class decorator adding a method to ``METHODS`` under ``name``."""
    def wrap(cls: type[Attributor]) -> type[Attributor]:
        if name in METHODS and METHODS[name] is not cls:
            raise MethodError(f"method name {name!r} registered twice ({METHODS[name].__name__}, {cls.__name__})")
        cls.name = name
        METHODS[name] = cls
        return cls
    return wrap


def build_method(name: str, **kwargs: Any) -> Attributor:
    """Instantiate a registered method by name with its options.

    Raises:
        MethodError: unknown name (the message lists the valid ones).
    """
    if name not in METHODS:
        raise MethodError(f"method={name!r} is unknown; valid choices: {sorted(METHODS)}")
    return METHODS[name](**kwargs)
