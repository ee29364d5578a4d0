"""Index-tracked in-memory datasets and the two views every method uses (eval and train)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import Tensor

from gex.runs import tensors_digest

__all__ = ["Augment", "LabeledData", "Batch", "iter_batches", "normalize_uint8", "as_labeled_data"]


def normalize_uint8(images: Tensor) -> Tensor:
    """The authors' normalization, (x/255 - 0.5)/0.25, of a uint8 tensor."""
    return (images.float() / 255.0 - 0.5) / 0.25


@dataclass(frozen=True)
class Augment:
    """Training-view augmentation: reflect-pad + random crop, optional horizontal flip.

    Attributes:
        pad: reflect padding in pixels before the random crop (0 disables cropping).
        flip: random horizontal flip (the authors use it except on digit datasets).
    """

    pad: int = 4
    flip: bool = False

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a batch ``(b, C, H, W)`` on its own device, one crop offset per sample."""
        if x.dim() != 4:
            return x
        b, _, h, w = x.shape
        if self.pad > 0:
            padded = torch.nn.functional.pad(x, [self.pad] * 4, mode="reflect")
            dy = torch.randint(0, 2 * self.pad + 1, (b,), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * self.pad + 1, (b,), generator=generator).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # (b, h)
            cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # (b, w)
            x = padded[torch.arange(b, device=x.device)[:, None, None, None],
                       torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                       rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip:
            mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x


@dataclass
class LabeledData:
    """A split held in memory; row ``i`` is sample ``i`` in the split's original order.

    Attributes:
        x: inputs, float32, ``(n, C, H, W)`` for images or ``(n, d)`` for vectors, already normalized.
        y: the labels trained on (noisy where noise was applied), long ``(n,)``.
        y_clean: the original labels, long ``(n,)``.
        num_classes: K.
        name: dataset name, for records.
        augment: the train-view augmentation of this dataset, or None.
        targets: optional soft targets ``(n, K)`` replacing one-hot ``y`` in the training loss (relabeling).
        weights: optional per-sample loss weights ``(n,)`` in training (source up-weighting).
        index: original indices of these rows in the parent split (subsets keep them), long ``(n,)``.
        extra: per-sample boolean masks a task needs, e.g. ``is_influential``, ``is_minority``.
    """

    x: Tensor
    y: Tensor
    y_clean: Tensor
    num_classes: int
    name: str = "data"
    augment: Augment | None = None
    targets: Tensor | None = None
    weights: Tensor | None = None
    index: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        if len(self.y) != n or len(self.y_clean) != n:
            raise ValueError(f"{self.name}: x, y and y_clean differ in length ({n}, {len(self.y)}, {len(self.y_clean)})")
        if self.index is None:
            self.index = torch.arange(n)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def is_noisy(self) -> Tensor:
        """Bool ``(n,)``: the label trained on differs from the original label."""
        return self.y != self.y_clean

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def digest(self) -> str:
        """16 hex digits identifying what a training or evaluation pass sees: inputs, labels, soft targets,
        weights, original indices (in their order) and the train-view augmentation."""
        return tensors_digest(self.x, self.y, self.targets, self.weights, self.index) + f"/{self.augment!r}"

    def subset(self, rows: Tensor) -> "LabeledData":
        """Rows ``rows`` (in that order), keeping their original indices and masks."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(self, x=self.x[rows], y=self.y[rows], y_clean=self.y_clean[rows],
                       targets=pick(self.targets), weights=pick(self.weights), index=self.index[rows],
                       extra={k: v[rows] for k, v in self.extra.items()})

    def rows_where(self, mask: Tensor) -> "LabeledData":
        """The rows where the bool ``mask`` ``(n,)`` holds, in original order."""
        return self.subset(torch.nonzero(mask.cpu()).squeeze(1).to(self.x.device))

    def with_labels(self, y: Tensor) -> "LabeledData":
        """The same samples with new training labels (y_clean kept, so ``is_noisy`` follows)."""
        return replace(self, y=torch.as_tensor(y, dtype=torch.long).clone())

    def to(self, device: torch.device | str) -> "LabeledData":
        """Move every tensor to ``device`` (small datasets live on the accelerator)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, x=mv(self.x), y=mv(self.y), y_clean=mv(self.y_clean), targets=mv(self.targets),
                       weights=mv(self.weights), index=mv(self.index),
                       extra={k: v.to(device) for k, v in self.extra.items()})


@dataclass
class Batch:
    """One mini-batch: ``rows`` are positions in the LabeledData it came from."""

    rows: Tensor
    x: Tensor
    y: Tensor
    targets: Tensor | None
    weights: Tensor | None


def iter_batches(data: LabeledData, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 drop_last: bool = False) -> Iterator[Batch]:
    """Yield mini-batches: the *eval* view (fixed order, no augmentation) or the *train* view.

    Args:
        data: the split.
        batch_size: samples per batch.
        shuffle: random order (train view); needs ``generator`` for determinism.
        augment: apply ``data.augment`` (train view); ignored when the dataset has none.
        generator: CPU generator driving order and augmentation.
        device: where batches are placed (defaults to where ``data`` lives).
        drop_last: drop a final short batch.

    Yields:
        Batch with ``x`` ``(b, ...)`` and ``y`` ``(b,)`` on ``device``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(data)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    device = torch.device(device) if device is not None else data.x.device
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        rows = order[start:start + batch_size]
        rows_d = rows.to(data.x.device)
        x = data.x[rows_d].to(device, non_blocking=True)
        if augment and data.augment is not None:
            x = data.augment(x, generator)
        pick = lambda t: None if t is None else t[rows_d].to(device)  # noqa: E731
        yield Batch(rows=rows, x=x, y=data.y[rows_d].to(device), targets=pick(data.targets),
                    weights=pick(data.weights))


def as_labeled_data(data: "LabeledData | tuple[Tensor, Tensor] | torch.utils.data.Dataset", num_classes: int,
                    name: str = "data", augment: Augment | None = None, batch_size: int = 512) -> LabeledData:
    """A user's samples as ``LabeledData`` (held in memory; ``y_clean`` = ``y``, nothing is marked noisy).

    Args:
        data: ``LabeledData`` (returned as is), a pair ``(x, y)`` of tensors, or a ``torch.utils.data.Dataset`` whose
            items are ``(x, y)`` pairs (read once, in order).
        num_classes: K.
        name: for records and messages.
        augment: the train-view augmentation (e.g. ``Augment(pad=4)`` for images), or None.
        batch_size: items per read when ``data`` is a Dataset.

    Raises:
        ValueError: ``data`` is none of the above, the labels are not integers in ``[0, K)``, or x and y differ in
            length.
    """
    if isinstance(data, LabeledData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    elif isinstance(data, torch.utils.data.Dataset):
        parts = list(torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False))
        if not parts or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in parts):
            raise ValueError(f"{name}: the Dataset's items must be (x, y) pairs")
        x, y = torch.cat([p[0] for p in parts]), torch.cat([torch.as_tensor(p[1]) for p in parts])
    else:
        raise ValueError(f"{name}: give a pair (x, y) of tensors or a torch Dataset of (x, y) pairs, "
                         f"got {type(data).__name__}")
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dim() != 1 or (len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes)):
        raise ValueError(f"{name}: labels must be a 1-d integer tensor of classes in [0, {num_classes}) "
                         f"(the model's output width)")
    return LabeledData(x=x.float(), y=y.long(), y_clean=y.long().clone(), num_classes=num_classes, name=name,
                       augment=augment)
