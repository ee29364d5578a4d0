"""EK-FAC influence functions (George et al. 2018; Grosse et al. 2023), as kronfluence computes them.

For every Linear/Conv2d block (``gex.kfac``): the eigenbases ``Q_A``, ``Q_G`` of the K-FAC factors of the train
set (eval view, labels sampled from the model), then the eigenvalue correction
``lam = E_i E_y[(Q_G^T grad_W l_i Q_A)^2]`` over per-sample gradients of the train set, damped per layer by
``damping * mean(lam)`` (kronfluence's heuristic when its ``damping_factor`` is None; ``damping_mode="absolute"``
adds ``damping`` itself). Influence, layer by layer and summed:

    I(z_train, z_test) = sum_layers <Q_G^T G_test Q_A / (lam + d), Q_G^T G_train Q_A>  ~  g_test^T H^-1 g_train

with ``G`` the per-sample *loss* gradients (labels ``data.y``); positive = the train sample lowers the test loss
(a proponent), as kronfluence. Self-influence is the same quadratic form of one sample, computed per sample.
BatchNorm and other non-Linear/Conv parameters are excluded from the gradients, as kronfluence does; a model
with other parameterized layers fails at ``fit`` (``gex.kfac.layer_map``).

    scores = EKFAC().fit(task).self_influence(task.train)
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData, iter_batches
from gex.kfac import (
    FISHER_TYPES,
    KFACFactors,
    LayerMap,
    compute_factors,
    eigendecompose,
    eigenvalue_correction,
    layer_map,
    layer_signals,
    rotated_block_grads,
)
from gex.utils import progress

__all__ = ["EKFAC", "DAMPING_MODES"]

log = logging.getLogger(__name__)

DAMPING_MODES = ("relative", "absolute")
_SALT = 9_101  # label draws of the factor and correction passes


@register("ekfac")
class EKFAC(Attributor):
    """EK-FAC inverse-Fisher influence over the Linear/Conv2d parameters.

    Args:
        damping: per-layer damping: a multiple of the mean corrected eigenvalue (``relative``; kronfluence's
            heuristic 0.1) or an absolute value (``absolute``).
        damping_mode: ``relative`` or ``absolute``.
        fisher: labels of the curvature: ``mc`` (sampled, kronfluence's default), ``empirical`` or ``ggn``.
        mc_samples: label draws per input for ``mc``.
        batch_size: samples per hooked forward/backward.
        test_chunk: test samples whose preconditioned gradients are held at once in ``influence``.
    """

    def __init__(self, damping: float = 0.1, damping_mode: str = "relative", fisher: str = "mc", mc_samples: int = 1,
                 batch_size: int = 256, test_chunk: int = 256):
        if damping_mode not in DAMPING_MODES:
            raise MethodError(f"ekfac.damping_mode={damping_mode!r} is unknown; valid choices: {list(DAMPING_MODES)}")
        if not damping > 0:
            raise MethodError(f"ekfac.damping={damping!r} is invalid; it must be > 0")
        if fisher not in FISHER_TYPES:
            raise MethodError(f"ekfac.fisher={fisher!r} is unknown; valid choices: {list(FISHER_TYPES)}")
        for key, value in (("mc_samples", mc_samples), ("batch_size", batch_size), ("test_chunk", test_chunk)):
            if not (isinstance(value, int) and value >= 1):
                raise MethodError(f"ekfac.{key}={value!r} is invalid; it must be an integer >= 1")
        self.damping, self.damping_mode, self.fisher, self.mc_samples = float(damping), damping_mode, fisher, mc_samples
        self.batch_size, self.test_chunk = batch_size, test_chunk
        self.layers_: LayerMap | None = None
        self.factors_: KFACFactors | None = None
        self.denominators_: dict[str, Tensor] = {}

    def _spec(self, task: InfluenceTask) -> dict[str, Any]:
        return {"pretrain": task.cache_spec, "method": self.name, "fisher": self.fisher,
                "mc_samples": self.mc_samples, "batch_size": self.batch_size}

    def _factors(self, task: InfluenceTask) -> KFACFactors:
        """Eigenbases and corrected eigenvalues over the train set (cached through ``task.cache``)."""
        cached = task.cache.load("ekfac", self._spec(task), "factors") if task.cache is not None else None
        if cached is not None:
            return KFACFactors.from_state(cached, task.device)
        gen = task.generator(_SALT)
        total = -(-len(task.train) // self.batch_size)
        batches = lambda desc: progress(iter_batches(task.train, self.batch_size, device=task.device),  # noqa: E731
                                        desc=desc, total=total)
        factors = compute_factors(task.model, self.layers_, batches("ekfac factors"), task.loss, self.fisher,
                                  self.mc_samples, None, gen)
        factors = eigenvalue_correction(task.model, self.layers_, eigendecompose(factors),
                                        batches("ekfac eigenvalue correction"), task.loss, self.fisher,
                                        self.mc_samples, gen)
        if task.cache is not None:
            task.cache.save("ekfac", self._spec(task), "factors", factors.state())
        return factors

    def fit(self, task: InfluenceTask) -> "EKFAC":
        """K-FAC eigenbases, eigenvalue correction and damping of every Linear/Conv2d layer."""
        super().fit(task)
        full = layer_map(task.model, self.name)
        if full.diag:
            log.info("ekfac: BatchNorm parameters of %s are excluded from the influence (as kronfluence)",
                     sorted(full.diag))
        self.layers_ = LayerMap(kron=full.kron, params=full.params)
        self.factors_ = self._factors(task)
        self.denominators_ = {}
        for name, lam in self.factors_.lam.items():
            extra = self.damping * lam.mean() if self.damping_mode == "relative" else self.damping
            self.denominators_[name] = lam + extra
        return self

    def rotated_grads(self, data: LabeledData, batch_size: int | None = None
                      ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Per-sample loss gradients of each block in its eigenbasis, ``Q_G^T G_i Q_A``, batch by batch.

        Yields:
            (rows ``(b,)``, {layer: ``(b, d_out, d_in+1)``}).
        """
        task = self._require_fit()
        for batch in iter_batches(data, batch_size or self.batch_size, device=task.device):
            (kron, _), = layer_signals(task.model, self.layers_, batch.x, batch.y, task.loss, "empirical")
            yield batch.rows, {n: rotated_block_grads(self.factors_.eig[n], a, g) for n, (a, g) in kron.items()}

    def self_influence(self, data: LabeledData) -> Tensor:
        """``g_i^T H_ekfac^-1 g_i`` per sample, shape ``(n,)``, >= 0; higher = more influential."""
        out = torch.zeros(len(data), dtype=self._dtype())
        for rows, rot in self.rotated_grads(data):
            out[rows] = sum((r.pow(2) / self.denominators_[n]).sum((1, 2)) for n, r in rot.items()).cpu()
        return out

    def _dtype(self) -> torch.dtype:
        """Scores come back on the CPU in the model's dtype."""
        return next(self._require_fit().model.parameters()).dtype

    def _flat(self, rot: dict[str, Tensor], precondition: bool) -> Tensor:
        """Concatenate rotated block gradients into ``(b, P_kfac)``, optionally divided by the damped eigenvalues."""
        parts = [(r / self.denominators_[n] if precondition else r).flatten(1) for n, r in rot.items()]
        return torch.cat(parts, dim=1)

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """``g_test^T H_ekfac^-1 g_train``, shape ``(n_train, n_test)``; positive = a proponent.

        Test gradients are preconditioned ``test_chunk`` at a time; train gradients are streamed for each chunk.
        """
        out = torch.zeros(len(train), len(test), dtype=self._dtype())
        for cols, rot_test in self.rotated_grads(test, self.test_chunk):
            pre = self._flat(rot_test, precondition=True)
            for rows, rot_train in self.rotated_grads(train):
                out[rows.unsqueeze(1), cols.unsqueeze(0)] = (self._flat(rot_train, False) @ pre.T).cpu()
        return out

    def influence_on_mean_test(self, train: LabeledData, test: LabeledData) -> Tensor:
        """Influence on the mean test loss, ``(n_train,)``: the mean test gradient preconditioned once (linear, so
        equal to ``influence(train, test).mean(1)`` without the matrix)."""
        total: dict[str, Tensor] = {}
        for _, rot in self.rotated_grads(test, self.test_chunk):
            total = {n: total.get(n, 0) + r.sum(0, keepdim=True) for n, r in rot.items()}
        pre = self._flat({n: t / len(test) for n, t in total.items()}, precondition=True)[0]
        out = torch.zeros(len(train), dtype=self._dtype())
        for rows, rot in self.rotated_grads(train):
            out[rows] = (self._flat(rot, False) @ pre).cpu()
        return out
