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

from gex.data import Augment, LabeledData, as_labeled_data
from gex.losses import LOSSES
from gex.runs import ArtifactCache, tensors_digest
from gex.train import Checkpoint, TrainConfig, snapshot
from gex.utils import resolve_device

__all__ = ["InfluenceTask", "Attributor", "METHODS", "register", "build_method", "MethodError"]


class MethodError(ValueError):
    """A method asked for something it cannot do on this task (unknown name, unsupported model, ...)."""


@dataclass
class InfluenceTask:
    """Everything a method may use about the trained model; methods never name datasets or models.

    Build it with ``InfluenceTask.from_model`` for a model you trained yourself, or with
    ``gex.pipeline.pretrained_task`` to train theta* with the package's recipe (which also fills ``recipe``,
    ``make_model``, the trajectory and the forgetting log).

    Attributes:
        model: theta*, on ``device``, eval mode, BN statistics refreshed.
        train: the training set as trained on (noisy labels in ``y``); iterate it with ``iter_batches`` for the
            eval view (fixed order, un-augmented) or the train view (shuffled, ``augment=True``).
        test: the test set.
        recipe: the pretraining recipe, or None; methods that train new models from scratch (EL2N, CL folds,
            retraining tasks) need it, GEX only reads its speed switches.
        make_model: ``make_model(seed=None)`` builds a fresh, untrained model of the same architecture (seed None =
            theta*'s own init, as retraining from the same initialization needs), or None (then methods that train
            from scratch refuse the task in one line).
        trajectory: pretraining checkpoints with the LR in force at each.
        forgetting: forgetting-event counts from pretraining ``(n_train,)``, or None.
        never_learned: bool ``(n_train,)``: never fitted during pretraining, or None.
        aum: float ``(n_train,)``: each sample's mean margin over pretraining (area under the margin), or None
            (a theta* cached before margins were recorded, or a model from ``from_model``).
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
    recipe: TrainConfig | None = None
    make_model: Callable[..., nn.Module] | None = None
    trajectory: list[Checkpoint] = field(default_factory=list)
    forgetting: Tensor | None = None
    never_learned: Tensor | None = None
    aum: Tensor | None = None
    loss: str = "ce"
    device: torch.device = torch.device("cpu")
    seed: int = 0
    cache: ArtifactCache | None = None
    cache_spec: dict[str, Any] = field(default_factory=dict)
    pretrain_wall_s: float = 0.0

    @classmethod
    def from_model(cls, model: nn.Module, train: Any, test: Any = None, *, loss: str = "ce",
                   device: torch.device | str = "auto", seed: int = 0, cache: ArtifactCache | None = None,
                   checkpoints: list[dict[str, Tensor]] | None = None, augment: Augment | None = None,
                   recipe: TrainConfig | None = None, make_model: Callable[..., nn.Module] | None = None
                   ) -> "InfluenceTask":
        """Wrap a model you already trained, with its data and loss; no config object needed.

        Args:
            model: the trained network (any ``nn.Module`` mapping a batch of inputs to ``(b, K)`` logits); it is
                moved to ``device`` and put in eval mode.
            train: the training samples: ``(x, y)`` tensors, a ``torch.utils.data.Dataset`` of ``(x, y)``
                pairs, or ``LabeledData``; held in memory.
            test: the test samples, in the same forms; None = the training set (for pairwise influence).
            loss: ``ce`` (softmax cross-entropy) or ``bce`` (one-vs-all sigmoid).
            device: ``auto`` = CUDA when present.
            seed: seeds every random stream a method draws (ensemble data order, projections).
            cache: artefact cache for ensemble members and factors, keyed by digests of the weights and data.
            checkpoints: state dicts saved during training, oldest first (TracIn / TRAK / KNN use them); None =
                theta* alone (TracIn is then the gradient dot product at theta*).
            augment: the train-view augmentation GEX's fine-tuning uses (e.g. ``Augment(pad=4)`` for images).
            recipe, make_model: only for methods that train models from scratch (EL2N, CL); see the attributes.

        Raises:
            ValueError: an unknown loss, or data the model cannot be paired with (see ``as_labeled_data``).
        """
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is unknown; valid choices: {list(LOSSES)}")
        device = resolve_device(device) if isinstance(device, str) else device
        model = model.to(device).eval()
        with torch.no_grad():
            num_classes = int(model(_first_input(train).to(device)).shape[-1])
        train_data = as_labeled_data(train, num_classes, "train", augment).to(device)
        test_data = train_data if test is None else as_labeled_data(test, num_classes, "test").to(device)
        states = checkpoints if checkpoints else [snapshot(model)]
        trajectory = [Checkpoint({k: v.detach().cpu() for k, v in s.items()}, step=i, lr=1.0)
                      for i, s in enumerate(states)]
        spec = {"model": tensors_digest(*snapshot(model).values()), "train_data": train_data.digest(),
                "test_data": test_data.digest(), "checkpoints": [tensors_digest(*c.state.values()) for c in trajectory],
                "loss": loss, "seed": seed} if cache is not None else {}
        return cls(model=model, train=train_data, test=test_data, recipe=recipe, make_model=make_model,
                   trajectory=trajectory, loss=loss, device=device, seed=seed, cache=cache, cache_spec=spec)

    def training_recipe(self, method: str) -> TrainConfig:
        """``recipe``, for a method that trains models from scratch; a one-line ``MethodError`` when absent."""
        if self.recipe is None or self.make_model is None:
            raise MethodError(f"{method} trains new models from scratch, so it needs task.recipe and "
                              f"task.make_model; pass recipe= and make_model= to InfluenceTask.from_model, or "
                              f"build the task with gex.pipeline.pretrained_task")
        return self.recipe

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator derived from the run seed (``salt`` separates a method's streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def derived_seed(self, salt: int) -> int:
        """A non-negative int seed drawn from the run seed and ``salt`` (one independent stream per salt)."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator(salt)))

    def fresh_model(self, seed: int | None = None) -> nn.Module:
        """An untrained model on ``device``: theta*'s own init (seed None) or one seeded by ``seed``."""
        self.training_recipe("retraining")
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


def _first_input(data: Any) -> Tensor:
    """The first input of ``data`` as a batch of one (to read the model's output width)."""
    if isinstance(data, LabeledData):
        return data.x[:1]
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        return data[0][:1]
    if isinstance(data, torch.utils.data.Dataset):
        return torch.as_tensor(data[0][0]).unsqueeze(0)
    raise ValueError(f"train: give a pair (x, y) of tensors or a torch Dataset of (x, y) pairs, "
                     f"got {type(data).__name__}")


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
