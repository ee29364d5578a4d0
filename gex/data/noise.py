"""Label-noise generators (docs/decisions.md#where-we-differ-from-the-authors, docs/protocols.md#label-noise).

Every kind that corrupts a random subset picks it exactly as the authors' generator does
(``datasets/image.py`` at v1.0.0): ``rng = numpy.random.default_rng(seed)``, then
``idx = sort(rng.choice(N, int(N * rate), replace=False))``. Only the new labels of those rows differ
between kinds. Row ``i`` of the input is sample ``i`` of the split, so the same seed, rate and split give
the same noisy indices as the authors' code, index for index.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["NOISE_KINDS", "ASYMMETRIC_PAIRS", "apply_noise", "check_noise", "noisy_indices"]

NOISE_KINDS = ("none", "symmetric", "symmetric_flip", "asymmetric", "human")

_DIGIT_PAIRS = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}  # Patrini et al. 2017: visually close digits
# Fixed class pairs for ``asymmetric`` noise: class -> class it is flipped to; classes not listed keep
# their label. Datasets not listed here (cifar100, two_circles, ...) flip to the next class, k -> (k+1) % K.
ASYMMETRIC_PAIRS: dict[str, dict[int, int]] = {
    "mnist": _DIGIT_PAIRS,
    "mnist5k": _DIGIT_PAIRS,
    "digits": _DIGIT_PAIRS,
    "mixed": _DIGIT_PAIRS,
    "svhn": _DIGIT_PAIRS,
    # truck->automobile, bird->airplane, deer->horse, cat<->dog
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    "cifar10n": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    # shirt->T-shirt, pullover->coat, sneaker->sandal
    "fashion_mnist": {6: 0, 2: 4, 7: 5},
}


def check_noise(kind: str, rate: float) -> None:
    """Raise ``ValueError`` (one line) for an unknown kind or a rate outside [0, 1)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise.kind must be one of {', '.join(NOISE_KINDS)}; got {kind!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise.rate must be in [0, 1), got {rate}")


def noisy_indices(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """The authors' choice of rows to corrupt: ``int(n*rate)`` distinct rows, sorted.

    Sorting matters: the new labels drawn next are assigned to the rows in sorted order.
    """
    return np.sort(rng.choice(n, int(n * rate), replace=False))


def apply_noise(y: Tensor, num_classes: int, kind: str, rate: float, seed: int, *, dataset: str = "",
                human_labels: Tensor | None = None) -> Tensor:
    """Noisy training labels.

    Args:
        y: clean labels, long ``(N,)``, in the split's original order.
        num_classes: K.
        kind: ``none`` | ``symmetric`` (new label uniform over all K, so some rows keep their class and the
            realized rate is about ``rate*(1-1/K)``) | ``symmetric_flip`` (uniform over the K-1 other
            classes) | ``asymmetric`` (fixed class pairs, see ``ASYMMETRIC_PAIRS``) | ``human``
            (returns ``human_labels``; ``rate`` is ignored).
        rate: fraction of rows chosen for corruption, in [0, 1).
        seed: seed of ``numpy.random.default_rng``.
        dataset: dataset name, selects the asymmetric pairs.
        human_labels: long ``(N,)``, required by ``human``.

    Returns:
        New labels, long ``(N,)``, on ``y``'s device; ``y`` is not modified.
    """
    check_noise(kind, rate)
    if kind == "none":
        return y.clone().long()
    if kind == "human":
        return _human(y, human_labels, dataset)
    clean = y.detach().cpu().long().numpy()
    noisy = clean.copy()
    rng = np.random.default_rng(seed)
    idx = noisy_indices(len(clean), rate, rng)
    if kind == "symmetric":
        # Our reading of the authors' generator: after the index draw, one label per chosen row uniform over
        # all K classes, ``rng.choice(K, len(idx))``; numpy's Generator implements that call as
        # ``rng.integers(0, K, size)`` (same stream), which we write out.
        noisy[idx] = rng.integers(0, num_classes, size=len(idx))
    elif kind == "symmetric_flip":
        # An offset in 1..K-1 added mod K is uniform over the other classes and never keeps the class.
        noisy[idx] = (clean[idx] + 1 + rng.integers(0, num_classes - 1, size=len(idx))) % num_classes
    else:  # asymmetric
        noisy[idx] = _flip_pairs(clean[idx], num_classes, dataset)
    return torch.as_tensor(noisy, dtype=torch.long, device=y.device)


def _flip_pairs(labels: np.ndarray, num_classes: int, dataset: str) -> np.ndarray:
    """Map each label through the dataset's class pairs (next class when the dataset has none)."""
    pairs = ASYMMETRIC_PAIRS.get(dataset)
    if pairs is None:
        return (labels + 1) % num_classes
    return np.array([pairs.get(int(k), int(k)) for k in labels], dtype=labels.dtype)


def _human(y: Tensor, human_labels: Tensor | None, dataset: str) -> Tensor:
    """Human labels as the noisy labels, checked against ``y``'s shape."""
    if human_labels is None:
        raise ValueError(f"noise.kind=human needs human labels, which dataset {dataset!r} does not provide "
                         "(use data=cifar10n or data=cifar100n)")
    if human_labels.shape != y.shape:
        raise ValueError(f"human labels have shape {tuple(human_labels.shape)}, labels {tuple(y.shape)}")
    return human_labels.clone().long().to(y.device)
