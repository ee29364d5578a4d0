"""Datasets, label noise and the two data views (eval and train): ``load_data(data, noise, seed)``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .core import Augment, Batch, LabeledData, as_labeled_data, iter_batches, normalize_uint8
from .noise import NOISE_KINDS, apply_noise, check_noise
from .sources import DATASETS, DataFileError, balanced_subset

__all__ = ["LabeledData", "as_labeled_data", "Augment", "Batch", "iter_batches", "normalize_uint8", "DataConfig", "NoiseConfig",
           "DataBundle", "load_data", "DataFileError", "DATASETS", "apply_noise", "balanced_subset",
           "NOISE_KINDS", "MIXED_SOURCES"]

MIXED_SOURCES = ("mnist5k+digits", "mnist+svhn")


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"data.name must be one of {', '.join(DATASETS)}; got {name!r}")


@dataclass
class DataConfig:
    """Which dataset, where its files are, and how much of it (a Hydra structured config).

    Attributes:
        name: a key of ``DATASETS``.
        root: folder holding the datasets (torchvision's layout).
        download: let torchvision download missing files into ``root``.
        n_train: class-balanced train subset size; None (or >= the split) keeps the full split in order.
        n_test: the same for the test split.
        subset_seed: seed of the subset choice (independent of the run seed).
        cifar_n_file: path of ``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt`` (cifar10n, cifar100n).
        cifar_n_key: which human label to use; None = ``worse_label`` (10N) / ``noisy_label`` (100N).
        minority_frac: minority-source share of the ``mixed`` train set, in (0, 1).
        mixed_sources: ``mnist5k+digits`` (CPU) or ``mnist+svhn`` (paper scale).
        toy_typical: two_circles points per class.
        toy_influential: two_circles influential points.
        toy_seed: two_circles seed.
    """

    name: str = "fashion_mnist"
    root: str = "data"
    download: bool = False
    n_train: Optional[int] = 10000
    n_test: Optional[int] = None
    subset_seed: int = 0
    cifar_n_file: Optional[str] = None
    cifar_n_key: Optional[str] = None
    minority_frac: float = 0.1
    mixed_sources: str = "mnist5k+digits"
    toy_typical: int = 100
    toy_influential: int = 10
    toy_seed: int = 0

    def __post_init__(self) -> None:
        _check_name(self.name)
        for field_name in ("n_train", "n_test"):
            value = getattr(self, field_name)
            if value is not None and value <= 0:
                raise ValueError(f"data.{field_name} must be positive or null, got {value}")
        if not 0.0 < self.minority_frac < 1.0:
            raise ValueError(f"data.minority_frac must be in (0, 1), got {self.minority_frac}")
        if self.mixed_sources not in MIXED_SOURCES:
            raise ValueError(f"data.mixed_sources must be one of {', '.join(MIXED_SOURCES)}; "
                             f"got {self.mixed_sources!r}")
        if self.toy_typical <= 0 or self.toy_influential < 0:
            raise ValueError(f"data.toy_typical must be positive and data.toy_influential non-negative, "
                             f"got {self.toy_typical}, {self.toy_influential}")


@dataclass
class NoiseConfig:
    """Label noise on the train split.

    Attributes:
        kind: one of ``NOISE_KINDS``.
        rate: fraction of train rows chosen for corruption, in [0, 1) (ignored by ``human``).
        seed: seed of the noise draw; None = the run seed (as the authors).
    """

    kind: str = "symmetric"
    rate: float = 0.1
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        check_noise(self.kind, self.rate)


@dataclass
class DataBundle:
    """What ``load_data`` returns.

    Attributes:
        train: noisy-label train split (``y`` noisy, ``y_clean`` original, ``index`` = rows of the full split).
        test: clean test split.
        noise_rate_realized: fraction of train rows whose label changed.
        provenance: what produced the bundle (dataset choice and sizes, noise kind, rate and seed), for records;
            caches key on the data itself (``LabeledData.digest``), never on this description.
    """

    train: LabeledData
    test: LabeledData
    noise_rate_realized: float
    provenance: dict[str, Any] = field(default_factory=dict)


def _subset(split: LabeledData, n: Optional[int], seed: int) -> LabeledData:
    """Class-balanced ``n`` rows in original order, or the whole split (original order) when n is None/large."""
    if n is None or n >= len(split):
        return split
    return split.subset(balanced_subset(split.y_clean.cpu(), n, seed))


def load_data(data: DataConfig, noise: NoiseConfig, seed: int) -> DataBundle:
    """Load ``data.name``, subset it, and corrupt the train labels.

    Args:
        data: dataset choice and sizes (a ``DataConfig`` or any object with its fields, e.g. a DictConfig).
        noise: label-noise choice.
        seed: run seed; the noise seed when ``noise.seed`` is None.

    Returns:
        DataBundle; the train rows are those of the subset, ``index`` their rows in the full split.
    """
    _check_name(data.name)
    check_noise(noise.kind, noise.rate)
    train, test = DATASETS[data.name](data)
    train = _subset(train, data.n_train, data.subset_seed)
    test = _subset(test, data.n_test, data.subset_seed)
    noise_seed = noise.seed if noise.seed is not None else seed
    y = apply_noise(train.y_clean, train.num_classes, noise.kind, noise.rate, noise_seed, dataset=data.name,
                    human_labels=train.extra.get("human_label"))
    train = train.with_labels(y)
    provenance = {"data": {k: v for k, v in _fields(data).items() if k not in ("root", "download")},
                  "noise": {"kind": noise.kind, "rate": noise.rate, "seed": noise_seed}}
    return DataBundle(train=train, test=test, noise_rate_realized=float(train.is_noisy.float().mean()),
                      provenance=provenance)


def _fields(cfg: Any) -> dict[str, Any]:
    """A DataConfig (or a DictConfig with its fields) as a plain dict."""
    if isinstance(cfg, DataConfig):
        return asdict(cfg)
    return {name: getattr(cfg, name) for name in DataConfig.__dataclass_fields__ if hasattr(cfg, name)}
