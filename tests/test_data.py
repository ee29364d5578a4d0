"""Dataset loaders (real shipped files and fake files in torchvision's on-disk formats), subsets, views."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import gex.data.sources as sources
from gex.data import (
    DATASETS,
    Augment,
    DataConfig,
    DataFileError,
    LabeledData,
    NoiseConfig,
    apply_noise,
    balanced_subset,
    iter_batches,
    load_data,
    normalize_uint8,
)
from gex.data.sources import read_idx

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
NO_NOISE = NoiseConfig(kind="none", rate=0.0)


# ------------------------------------------------------------------------------------- fake-file writers

def _write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX as the MNIST site publishes it: magic (0, 0, 0x08, ndim), big-endian dims, uint8 data."""
    raw = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    raw += arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _fake_mnist(folder: Path, n_train=50, n_test=20, gz=False, seed=0):
    """IDX files in ``folder``; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        ext = ".gz" if gz else ""
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", x)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", y)
        out[prefix] = (x, y)
    return out


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _fake_cifar10(root: Path, n=6, seed=0):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(1, 6):
        y = list(rng.integers(0, 10, n))
        labels += y
        _pickle(folder / f"data_batch_{i}", {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": y})
    _pickle(folder / "test_batch", {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                    "labels": list(rng.integers(0, 10, n))})
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return np.array(labels)


def _fake_cifar100(root: Path, n=8, seed=0):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        _pickle(folder / split, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 "fine_labels": list(rng.integers(0, 100, n)),
                                 "coarse_labels": list(rng.integers(0, 20, n))})
    _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                              "coarse_label_names": [f"c{i}" for i in range(20)]})


def _fake_svhn(root: Path, n_train=12, n_test=7, seed=0):
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                              "y": (np.arange(n) % 10 + 1).reshape(n, 1)})  # 10 means digit 0


@pytest.fixture
def patch_tv_integrity(monkeypatch):
    """Let torchvision read fake files: its md5 checks would reject them (our loaders never call them)."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_svhn.SVHN, "_check_integrity", lambda self: True)


# -------------------------------------------------------------------------------------- fashion_mnist

@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_real_files(tmp_path):
    b = load_data(DataConfig(name="fashion_mnist", root=str(tmp_path), n_train=None), NO_NOISE, 0)
    assert b.train.x.shape == (60000, 1, 28, 28) and b.test.x.shape == (10000, 1, 28, 28)
    assert b.train.x.dtype == torch.float32
    assert torch.bincount(b.train.y_clean).tolist() == [6000] * 10
    raw = read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")
    assert torch.equal(b.test.x[:5, 0], normalize_uint8(torch.as_tensor(raw[:5])))
    assert b.train.augment == Augment(pad=4, flip=False) and b.test.augment is None
    assert float(b.train.x.min()) == -2.0 and float(b.train.x.max()) == 2.0


def test_fashion_mnist_root_layouts_and_precedence(tmp_path):
    written = _fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    train, test = DATASETS["fashion_mnist"](DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert len(train) == 50 and len(test) == 20  # root wins over the system copy
    assert torch.equal(train.x[:, 0], normalize_uint8(torch.as_tensor(written["train"][0], dtype=torch.uint8)))
    _fake_mnist(tmp_path / "fashion_mnist", n_train=30, seed=1)  # our own layout is tried first
    train, _ = DATASETS["fashion_mnist"](DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert len(train) == 30


def test_missing_files_error_is_one_line_with_paths_and_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", [str(tmp_path / "nowhere")])
    with pytest.raises(DataFileError) as err:
        load_data(DataConfig(name="fashion_mnist", root=str(tmp_path)), NO_NOISE, 0)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "FashionMNIST" / "raw") in msg and str(tmp_path / "nowhere") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    for name in ("cifar10", "cifar100", "svhn", "mnist"):
        with pytest.raises(DataFileError, match="data.download=true") as err:
            DATASETS[name](DataConfig(name=name, root=str(tmp_path)))
        assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


# ---------------------------------------------------------------------------------------------- MNIST

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_fake_idx_matches_torchvision(tmp_path, gz):
    written = _fake_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    train, test = DATASETS["mnist"](DataConfig(name="mnist", root=str(tmp_path)))
    assert train.x.shape == (50, 1, 28, 28) and test.x.shape == (20, 1, 28, 28)
    assert torch.equal(train.y_clean, torch.as_tensor(written["train"][1]))
    assert train.augment == Augment(pad=4, flip=False)
    if not gz:  # torchvision reads the uncompressed raw files itself: same pixels, same labels
        import torchvision

        tv = torchvision.datasets.MNIST(str(tmp_path), train=True, download=False)
        assert torch.equal(train.x, normalize_uint8(tv.data.unsqueeze(1)))
        assert torch.equal(train.y, tv.targets)


def test_read_idx_rejects_garbage(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04rubbish")
    with pytest.raises(DataFileError, match="not an IDX file"):
        read_idx(bad)


# ------------------------------------------------------------------------------------ CIFAR and SVHN

def test_cifar10_fake_matches_torchvision(tmp_path, patch_tv_integrity):
    import torchvision

    labels = _fake_cifar10(tmp_path)
    train, test = DATASETS["cifar10"](DataConfig(name="cifar10", root=str(tmp_path)))
    assert train.x.shape == (30, 3, 32, 32) and test.x.shape == (6, 3, 32, 32)
    assert torch.equal(train.y_clean, torch.as_tensor(labels)) and train.num_classes == 10
    assert train.augment == Augment(pad=4, flip=True) and test.augment is None
    tv = torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False)
    assert torch.equal(train.x, normalize_uint8(torch.as_tensor(tv.data).permute(0, 3, 1, 2)))
    assert train.y.tolist() == tv.targets


def test_cifar100_fake_matches_torchvision(tmp_path, patch_tv_integrity):
    import torchvision

    _fake_cifar100(tmp_path)
    train, test = DATASETS["cifar100"](DataConfig(name="cifar100", root=str(tmp_path)))
    tv = torchvision.datasets.CIFAR100(str(tmp_path), train=False, download=False)
    assert train.num_classes == 100 and len(train) == 8
    assert torch.equal(test.x, normalize_uint8(torch.as_tensor(tv.data).permute(0, 3, 1, 2)))
    assert test.y.tolist() == tv.targets


def test_svhn_fake_matches_torchvision(tmp_path, patch_tv_integrity):
    import torchvision

    _fake_svhn(tmp_path)
    train, test = DATASETS["svhn"](DataConfig(name="svhn", root=str(tmp_path)))
    assert train.x.shape == (12, 3, 32, 32) and len(test) == 7
    assert train.y.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]  # 10 -> 0
    assert train.augment == Augment(pad=4, flip=False)
    tv = torchvision.datasets.SVHN(str(tmp_path), split="train", download=False)
    assert torch.equal(train.x, normalize_uint8(torch.as_tensor(tv.data)))
    assert torch.equal(train.y, torch.as_tensor(tv.labels, dtype=torch.long))


# --------------------------------------------------------------------------------------------- CIFAR-N

def test_cifar10n_human_labels_and_noise(tmp_path):
    clean = _fake_cifar10(tmp_path)
    worse = (clean + 1) % 10
    worse[::3] = clean[::3]
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save({"clean_label": clean, "worse_label": worse, "aggre_label": clean.copy()}, path)
    cfg = DataConfig(name="cifar10n", root=str(tmp_path), cifar_n_file=str(path), n_train=None)
    b = load_data(cfg, NoiseConfig(kind="human"), seed=0)
    assert b.train.name == "cifar10n" and b.train.augment.flip
    assert torch.equal(b.train.y, torch.as_tensor(worse)) and torch.equal(b.train.y_clean, torch.as_tensor(clean))
    assert b.noise_rate_realized == pytest.approx(float(np.mean(worse != clean)))
    assert "human_label" not in b.test.extra
    cfg_key = DataConfig(name="cifar10n", root=str(tmp_path), cifar_n_file=str(path), cifar_n_key="aggre_label")
    assert load_data(cfg_key, NoiseConfig(kind="human"), 0).noise_rate_realized == 0.0
    # with a subset the human labels follow their rows
    sub = load_data(DataConfig(name="cifar10n", root=str(tmp_path), cifar_n_file=str(path), n_train=10),
                    NoiseConfig(kind="human"), 0).train
    assert torch.equal(sub.y, torch.as_tensor(worse)[sub.index])


def test_cifar_n_errors(tmp_path):
    clean = _fake_cifar10(tmp_path)
    path = tmp_path / "bad.pt"
    torch.save({"clean_label": clean[::-1].copy(), "worse_label": clean}, path)
    with pytest.raises(ValueError, match="row by row"):
        DATASETS["cifar10n"](DataConfig(name="cifar10n", root=str(tmp_path), cifar_n_file=str(path)))
    torch.save({"clean_label": clean}, path)
    with pytest.raises(ValueError, match="worse_label"):
        DATASETS["cifar10n"](DataConfig(name="cifar10n", root=str(tmp_path), cifar_n_file=str(path)))
    with pytest.raises(DataFileError, match="cifar_n_file"):
        DATASETS["cifar10n"](DataConfig(name="cifar10n", root=str(tmp_path)))
    torch.save({"clean_label": _Evil()}, path)  # arbitrary code in a pickle is refused, in one line
    with pytest.raises(DataFileError, match="loads safely") as err:
        DATASETS["cifar10n"](DataConfig(name="cifar10n", root=str(tmp_path), cifar_n_file=str(path)))
    assert "\n" not in str(err.value)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar100n_default_key_and_csv(tmp_path):
    _fake_cifar100(tmp_path)
    clean = np.array(DATASETS["cifar100"](DataConfig(name="cifar100", root=str(tmp_path)))[0].y_clean)
    noisy = (clean + 7) % 100
    torch.save({"clean_label": clean, "noisy_label": noisy}, tmp_path / "CIFAR-100_human.pt")
    train, _ = DATASETS["cifar100n"](DataConfig(name="cifar100n", root=str(tmp_path),
                                                cifar_n_file=str(tmp_path / "CIFAR-100_human.pt")))
    assert torch.equal(train.extra["human_label"], torch.as_tensor(noisy)) and train.num_classes == 100
    csv = tmp_path / "CIFAR-100_human_annotations.csv"
    csv.write_text("clean_label,noisy_label\n" + "".join(f"{c},{n}\n" for c, n in zip(clean, noisy)))
    train, _ = DATASETS["cifar100n"](DataConfig(name="cifar100n", root=str(tmp_path), cifar_n_file=str(csv)))
    assert torch.equal(train.extra["human_label"], torch.as_tensor(noisy))


# ------------------------------------------------------------------------------- shipped small datasets

def test_mnist5k_split():
    train, test = DATASETS["mnist5k"](DataConfig(name="mnist5k"))
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert torch.bincount(test.y_clean).tolist() == [100] * 10
    assert train.augment == Augment(pad=4, flip=False) and float(train.x.min()) == -2.0
    assert not (test.x.flatten(1)[:, None] == train.x.flatten(1)[None, :50]).all(-1).any()  # disjoint rows
    again, _ = DATASETS["mnist5k"](DataConfig(name="mnist5k"))
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)


def test_digits_split():
    train, test = DATASETS["digits"](DataConfig(name="digits"))
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.augment == Augment(pad=1, flip=False)
    assert float(train.x.min()) == -2.0 and float(train.x.max()) == pytest.approx(2.0)
    assert torch.bincount(test.y_clean).min() >= 35  # stratified


def test_two_circles_construction():
    cfg = DataConfig(name="two_circles", toy_typical=50, toy_influential=6, toy_seed=3)
    train, test = DATASETS["two_circles"](cfg)
    assert train.x.shape == (106, 2) and test.x.shape == (100, 2) and train.augment is None
    infl = train.extra["is_influential"]
    assert infl.dtype == torch.bool and int(infl.sum()) == 6 and not test.extra["is_influential"].any()
    r = train.x.norm(dim=1)
    assert torch.allclose(r[infl], torch.full((6,), 1.5))
    assert abs(float(r[:50].mean()) - 1.0) < 0.05 and abs(float(r[50:100].mean()) - 2.0) < 0.05
    assert train.y[infl].tolist() == [0, 1, 0, 1, 0, 1]
    same, _ = DATASETS["two_circles"](cfg)
    other, _ = DATASETS["two_circles"](DataConfig(name="two_circles", toy_seed=4, toy_typical=50, toy_influential=6))
    assert torch.equal(same.x, train.x) and not torch.equal(other.x, train.x)
    assert not torch.equal(test.x, train.x[:100])


def test_mixed_cpu():
    train, test = DATASETS["mixed"](DataConfig(name="mixed"))
    minority = train.extra["is_minority"]
    assert train.x.shape == (4444, 1, 28, 28) and int(minority.sum()) == 444
    assert minority[4000:].all() and not minority[:4000].any()  # majority rows first, as the authors
    counts = torch.bincount(train.y_clean[minority], minlength=10)
    assert int(counts.max() - counts.min()) <= 1  # class-balanced minority
    assert test.x.shape == (360, 1, 28, 28) and test.extra["is_minority"].all()
    assert train.augment == Augment(pad=4, flip=False)


def test_mixed_gpu_setting_on_fake_files(tmp_path):
    _fake_mnist(tmp_path / "MNIST" / "raw", n_train=45, n_test=5)
    _fake_svhn(tmp_path, n_train=12, n_test=7)
    cfg = DataConfig(name="mixed", root=str(tmp_path), mixed_sources="mnist+svhn")
    train, test = DATASETS["mixed"](cfg)
    assert train.x.shape == (50, 3, 32, 32) and int(train.extra["is_minority"].sum()) == 5
    assert torch.equal(train.x[:45, 0], train.x[:45, 2])  # gray repeated into 3 channels
    assert test.x.shape == (7, 3, 32, 32) and test.extra["is_minority"].all()


# ----------------------------------------------------------------------------------- configs, subsets

def test_config_validation():
    with pytest.raises(ValueError, match="fashion_mnist, mnist") as err:
        DataConfig(name="imagenet")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(ValueError, match="n_train must be positive"):
        DataConfig(n_train=0)
    with pytest.raises(ValueError, match="n_test must be positive"):
        DataConfig(n_test=-5)
    with pytest.raises(ValueError, match="mixed_sources"):
        DataConfig(mixed_sources="cifar+svhn")
    with pytest.raises(ValueError, match="minority_frac"):
        DataConfig(minority_frac=1.0)


def test_balanced_subset():
    y = np.repeat(np.arange(5), [50, 50, 50, 50, 3])  # class 4 too small for its share
    rows = balanced_subset(y, 100, seed=0)
    assert len(rows) == 100 and torch.equal(rows, torch.sort(rows).values) and len(set(rows.tolist())) == 100
    counts = np.bincount(y[rows.numpy()])
    assert counts[4] == 3 and counts[:4].max() - counts[:4].min() <= 1
    assert torch.equal(rows, balanced_subset(y, 100, seed=0))
    assert not torch.equal(rows, balanced_subset(y, 100, seed=1))
    assert np.bincount(y[balanced_subset(y, 7, 0).numpy()], minlength=5).max() == 2
    with pytest.raises(ValueError):
        balanced_subset(y, 500, 0)


def test_load_data_subset_keeps_index_and_order():
    full = load_data(DataConfig(name="digits", n_train=None), NO_NOISE, 0).train
    assert torch.equal(full.index, torch.arange(1437))
    b = load_data(DataConfig(name="digits", n_train=200, n_test=50, subset_seed=2), NO_NOISE, 0)
    sub = b.train
    assert len(sub) == 200 and len(b.test) == 50
    assert torch.bincount(sub.y_clean).tolist() == [20] * 10
    assert torch.all(sub.index[1:] > sub.index[:-1])
    assert torch.equal(sub.x, full.x[sub.index]) and torch.equal(sub.y_clean, full.y_clean[sub.index])
    again = load_data(DataConfig(name="digits", n_train=200, n_test=50, subset_seed=2), NO_NOISE, 0).train
    assert torch.equal(again.index, sub.index)
    assert len(load_data(DataConfig(name="digits", n_train=5000), NO_NOISE, 0).train) == 1437


def test_load_data_noise_on_full_set_matches_authors_indices():
    noise = NoiseConfig(kind="symmetric", rate=0.2)
    b = load_data(DataConfig(name="digits", n_train=None), noise, seed=3)
    clean = b.train.y_clean
    assert torch.equal(b.train.y, apply_noise(clean, 10, "symmetric", 0.2, 3))
    chosen = set(np.random.default_rng(3).choice(1437, int(1437 * 0.2), replace=False).tolist())
    assert set(torch.nonzero(b.train.is_noisy).flatten().tolist()) <= chosen
    assert b.noise_rate_realized == pytest.approx(float(b.train.is_noisy.float().mean()))
    assert 0.15 < b.noise_rate_realized < 0.2
    fixed = load_data(DataConfig(name="digits", n_train=None), NoiseConfig(rate=0.2, seed=3), seed=99)
    assert torch.equal(fixed.train.y, b.train.y)  # noise.seed overrides the run seed
    assert torch.equal(b.test.y, b.test.y_clean)  # test labels stay clean


def test_human_noise_needs_human_labels():
    with pytest.raises(ValueError, match="human labels"):
        load_data(DataConfig(name="digits"), NoiseConfig(kind="human"), 0)


# -------------------------------------------------------------------------------------- views and augment

def _toy_images(n=37, size=8):
    x = torch.arange(n * size * size, dtype=torch.float32).reshape(n, 1, size, size)
    y = torch.arange(n) % 10
    return LabeledData(x=x, y=y, y_clean=y.clone(), num_classes=10, augment=Augment(pad=1, flip=False))


def test_eval_view_fixed_order():
    data = _toy_images()
    batches = list(iter_batches(data, 10))
    assert [len(b.rows) for b in batches] == [10, 10, 10, 7]
    assert torch.equal(torch.cat([b.rows for b in batches]), torch.arange(37))
    assert torch.equal(torch.cat([b.x for b in batches]), data.x)
    assert torch.equal(torch.cat([b.y for b in batches]), data.y)
    assert [len(b.rows) for b in iter_batches(data, 10, drop_last=True)] == [10, 10, 10]


def test_train_view_deterministic_and_covers_each_row_once():
    data = _toy_images()

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        bs = list(iter_batches(data, 8, shuffle=True, augment=True, generator=g))
        return torch.cat([b.rows for b in bs]), torch.cat([b.x for b in bs])

    rows, x = epoch(0)
    rows2, x2 = epoch(0)
    assert torch.equal(rows, rows2) and torch.equal(x, x2)
    assert torch.equal(torch.sort(rows).values, torch.arange(37))
    assert not torch.equal(rows, torch.arange(37)) and not torch.equal(epoch(1)[0], rows)
    assert x.shape == (37, 1, 8, 8) and not torch.equal(x, data.x[rows])  # augmented


def test_augment_is_a_reflect_padded_crop():
    data = _toy_images(n=20)
    out = Augment(pad=1, flip=False)(data.x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(data.x, [1] * 4, mode="reflect")
    for i in range(20):
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], c) for c in crops)
    flipped = Augment(pad=0, flip=True)(data.x, torch.Generator().manual_seed(0))
    same = (flipped == data.x).flatten(1).all(1)
    mirrored = (flipped == data.x.flip(-1)).flatten(1).all(1)
    assert torch.all(same | mirrored) and same.any() and mirrored.any()
    vec = torch.randn(5, 2)
    assert torch.equal(Augment()(vec, torch.Generator()), vec)  # vectors pass through
