"""Label-noise generators: the authors' symmetric generator, flips, pairs, human labels, validation."""
import numpy as np
import pytest
import torch

from gex.data import NoiseConfig, apply_noise
from gex.data.noise import ASYMMETRIC_PAIRS, NOISE_KINDS


def _labels(n=2000, k=10, seed=0):
    return torch.as_tensor(np.random.default_rng(seed).integers(0, k, n))


def _authors(y: np.ndarray, k: int, rate: float, seed: int) -> np.ndarray:
    """Independent restatement of the authors' generator (datasets/image.py, v1.0.0)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(y), int(len(y) * rate), replace=False))
    out = y.copy()
    out[idx] = rng.choice(k, len(idx))
    return out


def _chosen(n, rate, seed):
    return np.sort(np.random.default_rng(seed).choice(n, int(n * rate), replace=False))


@pytest.mark.parametrize("n,k,rate,seed", [(2000, 10, 0.1, 0), (1437, 10, 0.3, 3), (500, 100, 0.25, 7),
                                           (210, 2, 0.1, 1)])
def test_symmetric_reproduces_authors_generator(n, k, rate, seed):
    y = _labels(n, k, seed)
    ours = apply_noise(y, k, "symmetric", rate, seed)
    assert ours.dtype == torch.long and ours.shape == y.shape
    np.testing.assert_array_equal(ours.numpy(), _authors(y.numpy(), k, rate, seed))


def test_symmetric_changes_only_chosen_rows_and_input_untouched():
    y = _labels(3000)
    before = y.clone()
    noisy = apply_noise(y, 10, "symmetric", 0.2, 5)
    assert torch.equal(y, before)
    changed = np.flatnonzero((noisy != y).numpy())
    assert set(changed) <= set(_chosen(3000, 0.2, 5))
    assert len(_chosen(3000, 0.2, 5)) == int(3000 * 0.2)


def test_symmetric_realized_rate_is_rate_times_one_minus_one_over_k():
    n, k, rate = 100_000, 10, 0.2
    y = _labels(n, k)
    realized = (apply_noise(y, k, "symmetric", rate, 0) != y).float().mean().item()
    # changes ~ Binomial(20000, 0.9): sd ~ 0.0004 of N, so 0.003 is ~7 sd
    assert abs(realized - rate * (1 - 1 / k)) < 0.003


def test_seed_determinism_and_difference():
    y = _labels()
    a, b = apply_noise(y, 10, "symmetric", 0.1, 11), apply_noise(y, 10, "symmetric", 0.1, 11)
    c = apply_noise(y, 10, "symmetric", 0.1, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["symmetric_flip", "asymmetric"])
def test_other_kinds_use_the_same_chosen_rows(kind):
    y = _labels(1000)
    noisy = apply_noise(y, 10, kind, 0.3, 4, dataset="mnist")
    changed = set(np.flatnonzero((noisy != y).numpy()))
    assert changed <= set(_chosen(1000, 0.3, 4))


def test_symmetric_flip_always_changes_and_spreads_over_other_classes():
    y = _labels(20_000)
    noisy = apply_noise(y, 10, "symmetric_flip", 0.5, 0)
    assert int((noisy != y).sum()) == 10_000
    moved = noisy[noisy != y]
    assert torch.bincount(moved, minlength=10).min() > 800  # every class reachable, roughly uniform


def test_is_noisy_is_label_changed():
    from gex.data import LabeledData

    y = _labels(500)
    data = LabeledData(x=torch.zeros(500, 2), y=y, y_clean=y.clone(), num_classes=10)
    noisy = data.with_labels(apply_noise(y, 10, "symmetric", 0.4, 2))
    assert torch.equal(noisy.is_noisy, noisy.y != y)
    assert 0 < int(noisy.is_noisy.sum()) <= int(500 * 0.4)


@pytest.mark.parametrize("dataset", ["mnist", "digits", "cifar10", "fashion_mnist"])
def test_asymmetric_follows_pairs(dataset):
    y = torch.arange(10).repeat(300)
    noisy = apply_noise(y, 10, "asymmetric", 0.5, 0, dataset=dataset)
    pairs = ASYMMETRIC_PAIRS[dataset]
    chosen = torch.as_tensor(_chosen(len(y), 0.5, 0))
    expected = y.clone()
    expected[chosen] = torch.as_tensor([pairs.get(int(k), int(k)) for k in y[chosen]])
    assert torch.equal(noisy, expected)
    assert set(torch.unique(y[noisy != y]).tolist()) == set(pairs)


def test_asymmetric_pairs_content():
    assert ASYMMETRIC_PAIRS["mnist"] == {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
    assert ASYMMETRIC_PAIRS["cifar10"] == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    assert ASYMMETRIC_PAIRS["fashion_mnist"] == {6: 0, 2: 4, 7: 5}


@pytest.mark.parametrize("dataset", ["cifar100", "some_unknown"])
def test_asymmetric_next_class_elsewhere(dataset):
    y = torch.arange(100).repeat(10)
    noisy = apply_noise(y, 100, "asymmetric", 0.2, 1, dataset=dataset)
    changed = noisy != y
    assert int(changed.sum()) == 200
    assert torch.equal(noisy[changed], (y[changed] + 1) % 100)


def test_none_and_human():
    y = _labels(100)
    assert torch.equal(apply_noise(y, 10, "none", 0.5, 0), y)
    human = (y + 3) % 10
    assert torch.equal(apply_noise(y, 10, "human", 0.0, 0, human_labels=human), human)
    with pytest.raises(ValueError, match="human labels"):
        apply_noise(y, 10, "human", 0.0, 0, dataset="mnist")


def test_rate_zero_changes_nothing():
    y = _labels(100)
    for kind in ("symmetric", "symmetric_flip", "asymmetric"):
        assert torch.equal(apply_noise(y, 10, kind, 0.0, 0), y)


def test_validation_errors():
    y = _labels(10)
    with pytest.raises(ValueError, match="symmetric_flip"):  # lists the valid kinds
        apply_noise(y, 10, "pairflip", 0.1, 0)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"noise.rate must be in \[0, 1\), got"):
            apply_noise(y, 10, "symmetric", bad, 0)
    with pytest.raises(ValueError, match="noise.kind must be one of"):
        NoiseConfig(kind="bogus")
    with pytest.raises(ValueError, match=r"noise.rate must be in \[0, 1\), got 1.0"):
        NoiseConfig(rate=1.0)
    assert NoiseConfig().kind in NOISE_KINDS
