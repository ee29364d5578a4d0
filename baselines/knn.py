"""k-nearest-neighbour label disagreement in logit space (docs/baselines.md#knn-label-disagreement), averaged over trajectory checkpoints.

At each checkpoint, a sample's neighbours are the ``k`` training samples whose eval-mode logits are nearest in
squared Euclidean distance (a training sample finds itself, as the authors); its score is
``|| mean one-hot label of the neighbours - own one-hot label ||^2`` (noisy labels throughout). Distances are
computed in row blocks, memory ``O(block_size x N)``, and every row is scored (the authors dropped the last
``N mod 100`` rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData
from gex.train import Checkpoint, clone_model, eval_logits

__all__ = ["KNN", "knn_disagreement"]


def knn_disagreement(query: Tensor, query_y: Tensor, ref: Tensor, ref_y: Tensor, k: int, num_classes: int,
                     block_size: int = 256) -> Tensor:
    """``|| mean one-hot of the k nearest ref rows - one-hot(query_y) ||^2`` per query row, float64 ``(n,)``.

    Args:
        query: ``(n, d)`` points to score.
        query_y: ``(n,)`` their labels.
        ref: ``(N, d)`` candidate neighbours.
        ref_y: ``(N,)`` their labels.
        k: neighbours per query (``1 <= k <= N``).
        num_classes: K.
        block_size: query rows per distance block (memory ``O(block_size x N)``).
    """
    # float64: near-ties at the k-th distance must not depend on the block shape BLAS sees.
    query, ref = query.double().cpu(), ref.double().cpu()
    query_y, ref_y = query_y.long().cpu(), ref_y.long().cpu()
    ref_sq = ref.pow(2).sum(1)
    out = torch.empty(len(query), dtype=torch.float64)
    for start in range(0, len(query), block_size):
        q = query[start:start + block_size]
        dist = (q.pow(2).sum(1, keepdim=True) - 2 * q @ ref.T + ref_sq).clamp_min(0)  # (b, N)
        nearest = dist.topk(k, dim=1, largest=False).indices                         # (b, k)
        counts = torch.zeros(len(q), num_classes, dtype=torch.float64)
        counts.scatter_add_(1, ref_y[nearest], torch.ones(nearest.shape, dtype=torch.float64))
        own = F.one_hot(query_y[start:start + block_size], num_classes).double()
        out[start:start + len(q)] = (counts / k - own).pow(2).sum(1)
    return out


@register("knn")
class KNN(Attributor):
    """kNN label disagreement in logit space, mean over checkpoints; higher = label unlike its neighbours'.

    Args:
        k: neighbours; None = ``N // K`` (the authors).
        num_checkpoints: use the last this many trajectory checkpoints; None = all (the authors: 5 of 5).
        block_size: query rows per distance block.
    """

    def __init__(self, k: int | None = None, num_checkpoints: int | None = None, block_size: int = 256):
        if k is not None and k < 1:
            raise MethodError(f"knn.k must be >= 1 or null (= N // K), got {k}")
        if num_checkpoints is not None and num_checkpoints < 1:
            raise MethodError(f"knn.num_checkpoints must be >= 1 or null (= all), got {num_checkpoints}")
        if block_size < 1:
            raise MethodError(f"knn.block_size must be >= 1, got {block_size}")
        self.k, self.num_checkpoints, self.block_size = k, num_checkpoints, block_size
        self.ref_logits_: list[Tensor] = []
        self.k_: int = 0

    def _checkpoints(self, task: InfluenceTask) -> list[Checkpoint]:
        """The trajectory checkpoints used: all, or the last ``num_checkpoints``."""
        have = len(task.trajectory)
        if have == 0:
            raise MethodError("knn needs trajectory checkpoints (task.trajectory is empty); pretrain with "
                              "train.ckpt_fracs set")
        if self.num_checkpoints is not None and self.num_checkpoints > have:
            raise MethodError(f"knn.num_checkpoints={self.num_checkpoints} but the task has {have} checkpoints")
        return task.trajectory[-(self.num_checkpoints or have):]

    def _logits(self, data: LabeledData) -> list[Tensor]:
        """Eval-mode logits of ``data`` at each used checkpoint, each ``(n, K)``."""
        task = self._require_fit()
        container = clone_model(task.model)
        out = []
        for ckpt in self._checkpoints(task):
            container.load_state_dict(ckpt.state)
            out.append(eval_logits(container, data, device=task.device))
        return out

    def fit(self, task: InfluenceTask) -> "KNN":
        """Compute the training set's logits at each checkpoint (the neighbour pool)."""
        n = len(task.train)
        self.k_ = self.k if self.k is not None else max(1, n // task.train.num_classes)
        if self.k_ > n:
            raise MethodError(f"knn.k={self.k_} exceeds the training-set size {n}")
        super().fit(task)
        self.ref_logits_ = self._logits(task.train)
        return self

    def self_influence(self, data: LabeledData) -> Tensor:
        """Mean over checkpoints of the kNN label disagreement of each sample of ``data`` with its label
        ``data.y`` (neighbours drawn from the training set), float64 ``(n,)``."""
        task = self._require_fit()
        scores = [knn_disagreement(q, data.y, ref, task.train.y, self.k_, task.train.num_classes, self.block_size)
                  for q, ref in zip(self._logits(data), self.ref_logits_)]
        return torch.stack(scores).mean(0)
