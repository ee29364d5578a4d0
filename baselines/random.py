"""Random scores (docs/baselines.md#random-scores): the chance-level reference for every ranking metric.

Scores are standard normal from ``numpy.random.default_rng([seed, salt])`` (a stream separate from the label
noise, which the authors drew from the same ``default_rng(seed)``), and indexed by each sample's original index,
so a sample keeps its score in any subset.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gex.attribution import Attributor, register
from gex.data import LabeledData

__all__ = ["Random"]

_SALT = 10_001  # the random-score stream


@register("random")
class Random(Attributor):
    """N(0, 1) self-influence, deterministic per run seed; no pairwise form."""

    def self_influence(self, data: LabeledData) -> Tensor:
        """Standard-normal score of each sample of ``data`` (by original index), float64 ``(n,)``."""
        task = self._require_fit()
        index = data.index.cpu()
        # numpy's normal sampler draws one value after another, so the first m draws do not depend on how many
        # are asked for (torch.randn's vectorized path does); that is what makes scores subset-stable.
        rng = np.random.default_rng([task.seed, _SALT])
        draws = rng.standard_normal(int(index.max()) + 1 if len(index) else 0)
        return torch.as_tensor(draws, dtype=torch.float64)[index]
