"""LA-KFAC (docs/method.md#the-method, docs/baselines.md#la-kfac, docs/official_code.md#14-k-fac-details, docs/decisions.md#baselines-checklist): the authors' linearized Laplace baseline.

Curvature: K-FAC factors (``gex.kfac``) of the mean loss at theta*, in eval mode, from ``n_curvature_batches``
mini-batches of the (augmented, shuffled) train view, labels sampled from the model (the MC Fisher F), factors
averaged with kfac_jax's normalized EMA (decay 0.95, the authors'). Posterior samples (one per member m):

    delta_m = (sigma / sqrt(N)) (F + lambda I)^(-1/2) eps_m,   lambda = (sigma / alpha)^2 / N,  eps_m ~ N(0, I)

so that ``Cov(delta) = (sigma^2/N) (F + lambda I)^-1 = (N F / sigma^2 + I / alpha^2)^-1``. Per block:
Linear/Conv blocks in the Kronecker eigenbasis (eigenvalues ``s_G s_A^T + lambda``); BatchNorm (diagonal) blocks
use ``(diag_scale * F_diag + lambda)^(-1/2)`` with the authors' hard-coded ``diag_scale = 100`` (their
``laplace/kfac.py:152``; set 1 for the plain Laplace posterior).

Scores: the GEX formula on losses of the *linearized* network ``f(theta*) + J delta_m`` (theta*'s BN statistics),
with the reference clamped at ``eps``: ``D[i, m] = l_i^lin(delta_m) - max(l_i(theta*), eps)``; self-influence
``mean_m D[i, m]^2``; pairwise ``D_train D_test^T / M`` (positive = proponent).

With the authors' ``alpha = sigma = 1e-4`` the perturbations are tiny, so ``D`` is mostly the clamp offset
``l_i(theta*) - eps`` (docs/baselines.md#la-kfac [inferred]): ``diagnostics()`` reports the median spread of the linearized losses
against eps so a run can see when that happens.

    scores = LaKFAC(num_samples=32).fit(task).self_influence(task.train)
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, MethodError, register
from gex.data import LabeledData
from gex.evaluation import linearized_losses, per_sample_losses
from gex.kfac import (
    FISHER_TYPES,
    KFACFactors,
    LayerMap,
    compute_factors,
    eigendecompose,
    layer_map,
    split_block,
)
from gex.method import loss_deviations
from gex.params import param_names
from gex.train import batch_stream
from gex.utils import progress

__all__ = ["LaKFAC", "kron_inverse_sqrt", "AUTHORS_DIAG_SCALE"]

AUTHORS_DIAG_SCALE = 100.0  # the authors' hard-coded factor on diagonal (BN) blocks (docs/official_code.md#14-k-fac-details)
_SALT_CURVATURE = 8_101      # data order, augmentation and label draws of the curvature pass
_SALT_SAMPLE = 8_501         # eps_m of member m comes from salt _SALT_SAMPLE + m


def kron_inverse_sqrt(eig: tuple[Tensor, Tensor, Tensor, Tensor], v: Tensor, lam: float) -> Tensor:
    """``(A (x) G + lam I)^(-1/2) V`` for a block matrix ``V (..., d_out, d_in+1)`` in the Kronecker eigenbasis.

    Args:
        eig: ``(Q_A, s_A, Q_G, s_G)`` of the block's factors.
        v: block-shaped input.
        lam: damping (> 0, or the factors must be non-singular).
    """
    q_a, s_a, q_g, s_g = eig
    scale = (s_g[:, None] * s_a[None, :] + lam).rsqrt()
    return q_g @ ((q_g.T @ v @ q_a) * scale) @ q_a.T


@register("la_kfac")
class LaKFAC(Attributor):
    """K-FAC linearized Laplace (the authors' ``la_kfac``).

    Args:
        num_samples: M posterior samples (paper: 32).
        alpha: prior standard deviation (the authors' 1e-4).
        sigma: noise scale (the authors' 1e-4).
        n_curvature_batches: mini-batches of the train view for the factors (paper: ft_step = 800).
        curvature_batch_size: samples per curvature batch (paper: 1024).
        curvature_augment: draw curvature batches from the augmented view (the authors).
        ema_decay: kfac_jax's normalized EMA of the factors (0.95, the authors); None = plain mean.
        fisher: ``mc`` (sampled labels, the authors), ``empirical`` or ``ggn`` (exact expectation).
        mc_samples: label draws per input for ``mc``.
        diag_scale: factor on the diagonal (BN) blocks' Fisher (the authors' 100; 1 = plain Laplace).
        eps: tau, the clamp of the reference loss (0.05, the authors; 0 disables it).
        batch_size: samples per linearized-loss JVP.
    """

    def __init__(self, num_samples: int = 32, alpha: float = 1e-4, sigma: float = 1e-4, n_curvature_batches: int = 100,
                 curvature_batch_size: int = 128, curvature_augment: bool = True, ema_decay: float | None = 0.95,
                 fisher: str = "mc", mc_samples: int = 1, diag_scale: float = AUTHORS_DIAG_SCALE, eps: float = 0.05,
                 batch_size: int = 1024):
        for key, value in (("num_samples", num_samples), ("n_curvature_batches", n_curvature_batches),
                           ("curvature_batch_size", curvature_batch_size), ("mc_samples", mc_samples),
                           ("batch_size", batch_size)):
            if not (isinstance(value, int) and value >= 1):
                raise MethodError(f"la_kfac.{key}={value!r} is invalid; it must be an integer >= 1")
        for key, value in (("alpha", alpha), ("sigma", sigma), ("diag_scale", diag_scale)):
            if not value > 0:
                raise MethodError(f"la_kfac.{key}={value!r} is invalid; it must be > 0")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise MethodError(f"la_kfac.ema_decay={ema_decay!r} is invalid; use a value in (0, 1) or null (mean)")
        if fisher not in FISHER_TYPES:
            raise MethodError(f"la_kfac.fisher={fisher!r} is unknown; valid choices: {list(FISHER_TYPES)}")
        if not eps >= 0:
            raise MethodError(f"la_kfac.eps={eps!r} is invalid; it must be >= 0 (0 disables the clamp)")
        self.num_samples, self.alpha, self.sigma = num_samples, float(alpha), float(sigma)
        self.n_curvature_batches, self.curvature_batch_size = n_curvature_batches, curvature_batch_size
        self.curvature_augment, self.ema_decay, self.fisher, self.mc_samples = curvature_augment, ema_decay, fisher, mc_samples
        self.diag_scale, self.eps, self.batch_size = float(diag_scale), float(eps), batch_size
        self.layers_: LayerMap | None = None
        self.factors_: KFACFactors | None = None
        self.deltas_: list[Tensor] = []
        self._memo: dict[int, tuple[LabeledData, Tensor, Tensor]] = {}
        self._diagnostics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ fit

    def _spec(self, task: InfluenceTask) -> dict[str, Any]:
        return {"pretrain": task.cache_spec, "method": self.name, "n_curvature_batches": self.n_curvature_batches,
                "curvature_batch_size": self.curvature_batch_size, "curvature_augment": self.curvature_augment,
                "ema_decay": self.ema_decay, "fisher": self.fisher, "mc_samples": self.mc_samples}

    def _curvature(self, task: InfluenceTask) -> KFACFactors:
        """K-FAC factors of theta* from the train view, eigendecomposed (cached through ``task.cache``)."""
        cached = task.cache.load("la_kfac", self._spec(task), "factors") if task.cache is not None else None
        if cached is not None:
            return KFACFactors.from_state(cached, task.device)
        gen = task.generator(_SALT_CURVATURE)
        stream = batch_stream(task.train, self.curvature_batch_size, self.curvature_augment, gen, task.device)
        batches = progress(itertools.islice(stream, self.n_curvature_batches), desc="la_kfac curvature",
                           total=self.n_curvature_batches)
        factors = eigendecompose(compute_factors(task.model, self.layers_, batches, task.loss, self.fisher,
                                                 self.mc_samples, self.ema_decay, gen))
        if task.cache is not None:
            task.cache.save("la_kfac", self._spec(task), "factors", factors.state())
        return factors

    def fit(self, task: InfluenceTask) -> "LaKFAC":
        """Collect the K-FAC factors and draw the M posterior samples."""
        super().fit(task)
        self.layers_ = layer_map(task.model, self.name)
        self.factors_ = self._curvature(task)
        self.deltas_ = [self.sample(m) for m in range(self.num_samples)]
        self._memo.clear()
        return self

    @property
    def prior_precision(self) -> float:
        """lambda = (sigma / alpha)^2 / N, the damping that the prior adds to F."""
        return (self.sigma / self.alpha) ** 2 / len(self._require_fit().train)

    def sample(self, m: int) -> Tensor:
        """Posterior sample ``delta_m`` as a flat ``(P,)`` vector in ``params_vector`` order (deterministic in m)."""
        task = self._require_fit()
        gen = task.generator(_SALT_SAMPLE + m)
        lam, scale = self.prior_precision, self.sigma / math.sqrt(len(task.train))
        named = dict(task.model.named_parameters())
        pieces: dict[str, Tensor] = {}
        for name, module in self.layers_.kron.items():
            q_a, q_g = self.factors_.eig[name][0], self.factors_.eig[name][2]
            eps = torch.randn(len(q_g), len(q_a), generator=gen, dtype=q_a.dtype).to(q_a.device)
            block = split_block(module, scale * kron_inverse_sqrt(self.factors_.eig[name], eps, lam))
            pieces.update({self.layers_.params[name][k]: v for k, v in block.items() if self.layers_.params[name][k]})
        for pname, fisher_diag in self.factors_.diag.items():
            eps = torch.randn(fisher_diag.shape, generator=gen, dtype=fisher_diag.dtype).to(fisher_diag.device)
            pieces[pname] = scale * eps * (self.diag_scale * fisher_diag + lam).rsqrt()
        return torch.cat([pieces[n].reshape(-1).to(named[n]) for n in param_names(task.model)])

    # --------------------------------------------------------------------------------------- scores

    def deviations(self, data: LabeledData) -> Tensor:
        """``D[i, m] = l_i^lin(delta_m) - max(l_i(theta*), eps)``, shape ``(n, M)`` (memoized per data object)."""
        task = self._require_fit()
        entry = self._memo.get(id(data))
        if entry is None or entry[0] is not data:
            ref = per_sample_losses(task.model, data, task.loss, self.batch_size)
            lin = linearized_losses(task.model, data, self.deltas_, task.loss, self.batch_size,
                                    desc=f"{self.name} linearized losses")
            entry = self._memo[id(data)] = (data, ref, lin)
        return loss_deviations(entry[2], entry[1], self.eps)

    def self_influence(self, data: LabeledData) -> Tensor:
        """``mean_m D[i, m]^2``, shape ``(n,)``; higher = more influential. Records ``diagnostics``."""
        dev = self.deviations(data)
        _, ref, lin = self._memo[id(data)]
        spread = (lin - ref.unsqueeze(1)).abs().median(dim=1).values
        self._diagnostics = {"median_lin_shift": float(spread.median()),
                             "frac_clamped": float((ref < self.eps).double().mean())}
        return dev.pow(2).mean(dim=1)

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """``D_train D_test^T / M``, shape ``(n_train, n_test)``; positive = the train sample lowers the test loss."""
        dev_train, dev_test = self.deviations(train), self.deviations(test)
        return dev_train @ dev_test.T / dev_train.shape[1]

    def diagnostics(self) -> dict[str, float]:
        """From the last ``self_influence``: ``median_lin_shift`` (median over samples of the median ``|l^lin -
        l(theta*)|`` over members) and ``frac_clamped`` (share with ``l(theta*) < eps``). A shift far below eps
        with many clamped samples means the clamp offset, not the posterior, drives the scores."""
        return dict(self._diagnostics)
