"""Per-sample losses: softmax cross-entropy (default, the paper era) and sigmoid BCE summed over classes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "per_sample_loss"]

LOSSES = ("ce", "bce")


def per_sample_loss(logits: Tensor, y: Tensor, kind: str = "ce", targets: Tensor | None = None) -> Tensor:
    """Loss of each sample, shape ``(b,)``.

    Args:
        logits: ``(b, K)``.
        y: hard labels ``(b,)`` (long).
        kind: ``ce`` = -sum_k t_k log softmax(f)_k; ``bce`` = -sum_k [t_k log s(f_k) + (1-t_k) log s(-f_k)].
        targets: optional soft targets ``(b, K)`` used instead of one-hot ``y`` (they need not sum to 1).

    Raises:
        ValueError: unknown kind.
    """
    if kind == "ce":
        if targets is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    if kind == "bce":
        if targets is None:  # a comparison, not F.one_hot, whose output size is data-dependent under vmap
            targets = (y.unsqueeze(-1) == torch.arange(logits.shape[-1], device=y.device)).to(logits.dtype)
        t = targets
        return F.binary_cross_entropy_with_logits(logits, t, reduction="none").sum(-1)
    raise ValueError(f"loss={kind!r} is unknown; valid choices: {list(LOSSES)}")
