"""GEX and its ablations (docs/method.md#the-method, docs/method.md#scores): influence as the covariance of loss
deviations over a geometric ensemble.

With member losses ``L[i, m] = l_i(theta_m)`` (eval mode, each member's own BN statistics) and a reference loss
``r_i`` per sample, the deviations are ``D[i, m] = L[i, m] - r_i`` and

- self-influence ``I_i = (1/M) sum_m D[i, m]^2`` (higher = more influential);
- pairwise influence ``I_ij = (1/M) sum_m D[i, m] D[j, m]`` for train i and test j (positive = a proponent);
- cross-influence against the *mean* test loss (``influence_on_mean_test``).

The reference (docs/method.md#the-clamp-tau):

- ``reference="fit_aware"`` (our default): ``r_i = l_i(theta*)`` where theta* predicts the sample's label, and 0
  where it does not. No clamp, so nothing is inverted; a sample theta* never fit keeps its high member losses as
  its score (the plain deviation from theta* is ~0 there, which ranks such mislabeled samples last).
- ``reference="clamped"`` (the authors'): ``r_i = max(l_i(theta*), tau)`` with ``tau = eps`` (their 0.05), or
  ``tau`` = the ``eps_quantile`` quantile of theta*'s training losses (adaptive). A sample with
  ``l(theta*) < tau`` whose members also stay below ``tau`` scores ``(tau - L)^2``, which *falls* as the member
  loss rises: the clamp inverts the ranking there. Every run records the share of such samples
  (``frac_clamp_inverted``) and warns above ``warn_inverted_frac``. ``GEXClamped`` (``gex_clamped``) is this form.

    scores = GEX(num_members=8, ft_step=100, ft_lr=0.05).fit(task).self_influence(task.train)
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Iterator

import torch
from torch import Tensor

from gex.attribution import Attributor, InfluenceTask, register
from gex.data import LabeledData
from gex.ensemble import Ensemble, EnsembleConfig, build_ensemble
from gex.evaluation import (
    linearized_losses,
    losses_for_states,
    losses_for_states_batched,
)
from gex.losses import per_sample_loss
from gex.params import param_names, params_vector
from gex.train import eval_logits

__all__ = ["GEX", "GEXClamped", "GEXLin", "GEXMeanLoss", "ClampRegimeWarning", "REFERENCES", "loss_deviations",
           "reference_values", "clamp_inverted", "warn_if_inverted"]

log = logging.getLogger(__name__)


REFERENCES = ("fit_aware", "clamped")


class ClampRegimeWarning(UserWarning):
    """The clamp inverts GEX's ranking for more than ``warn_inverted_frac`` of the samples."""


def loss_deviations(member_losses: Tensor, reference: Tensor, eps: float) -> Tensor:
    """GEX's loss deviations ``L[i, m] - max(l_i(theta*), eps)``, shape ``(n, M)``.

    The clamp applies to the reference only (as the authors): a well-fit sample whose member losses stay small
    deviates by about ``-eps``, which sets the score floor ``eps**2``.

    Args:
        member_losses: ``(n, M)`` per-sample losses under each member (or linearized member).
        reference: ``(n,)`` losses at theta*.
        eps: the clamp tau (0 disables it).
    """
    return member_losses - reference.clamp(min=eps).unsqueeze(1)


def reference_values(losses: Tensor, fitted: Tensor, rule: str, tau: float) -> Tensor:
    """GEX's reference ``r_i`` per sample, ``(n,)``: ``fit_aware`` = theta*'s loss where theta* predicts the label,
    0 where it does not; ``clamped`` = ``max(l_i(theta*), tau)`` (the authors').

    Args:
        losses: ``l_i(theta*)``, ``(n,)``.
        fitted: bool ``(n,)``, theta* predicts sample i's label.
        rule: one of ``REFERENCES``.
        tau: the clamp (``clamped`` only).
    """
    if rule == "clamped":
        return losses.clamp(min=tau)
    return torch.where(fitted.to(losses.device), losses, torch.zeros_like(losses))


def clamp_inverted(member_losses: Tensor, losses: Tensor, tau: float) -> Tensor:
    """Bool ``(n,)``: samples whose ranking the clamp inverts. Their reference is lifted to ``tau``
    (``l(theta*) < tau``) and their members stay below it on average, so the score ``mean_m (tau - L_m)^2`` falls as
    the member losses rise, while the unclamped deviation from theta* grows."""
    return (losses < tau) & (member_losses.mean(dim=1) < tau)


def warn_if_inverted(name: str, frac: float, limit: float, tau: float) -> bool:
    """Warn (log and ``ClampRegimeWarning``) when the clamp inverts the ranking of more than ``limit`` of the
    samples; returns whether it warned."""
    if frac <= limit:
        return False
    message = (f"{name}: the clamp tau={tau:.3g} inverts the ranking of {frac:.1%} of the samples (more than "
               f"{limit:.0%}): their theta* loss and member losses stay below tau, where the score (tau - loss)^2 "
               f"falls as the member loss rises; set reference=fit_aware (the default) or eps=0 "
               f"(docs/method.md#the-clamp-tau)")
    log.warning(message)
    warnings.warn(message, ClampRegimeWarning, stacklevel=4)
    return True


@register("gex")
class GEX(Attributor):
    """GEX: loss-deviation covariance over a geometric ensemble.

    Args:
        num_members, ft_step, ft_lr, ft_schedule, ft_batch_size, ft_augment, num_chains, members, weight_decay,
            momentum, bn_batches: the ensemble (see ``gex.ensemble.EnsembleConfig``).
        reference: ``fit_aware`` (default) or ``clamped`` (the authors'); see the module docstring.
        eps: tau of ``clamped``, ``max(l(theta*), eps)`` (the authors' 0.05); >= 0.
        eps_quantile: with ``clamped``, tau = this quantile of theta*'s training losses instead of ``eps``
            (adaptive); None = ``eps``.
        top_frac: share of samples counted as "top" (highest self-influence) in ``diagnostics``.
        warn_inverted_frac: warn (log and run record) when the clamp inverts the ranking of more than this share
            of the samples.
        batch_size: samples per evaluation forward.
        batch_members: members trained together (vmapped) when they do not depend on each other; 1 = one at a
            time (see ``gex.ensemble``; equal members up to float rounding, slower on a CPU for conv nets).
        eval_batched: evaluate ``eval_members`` members per pass over the data (vmapped, each batch read once per
            pass) instead of one member per pass; equal losses up to float rounding.
        eval_members: members per batched evaluation pass (bounds memory: activations of that many models).
    """

    uses_clamp = True  # GEXMeanLoss has no reference, hence no clamp to invert
    default_reference = "fit_aware"
    evaluates_members = True  # GEXLin evaluates the linearized network instead: eval_batched does not apply

    def __init__(self, num_members: int = 2, ft_step: int = 200, ft_lr: float = 0.05, ft_schedule: str = "cosine",
                 ft_batch_size: int = 128, ft_augment: bool = True, num_chains: int = 1, members: str = "chain",
                 eps: float = 0.05, weight_decay: float = 5e-4, momentum: float = 0.9, bn_batches: int = 20,
                 top_frac: float = 0.1, warn_inverted_frac: float = 0.05, batch_size: int = 128,
                 batch_members: int = 1, eval_batched: bool = False, eval_members: int = 8,
                 reference: str | None = None, eps_quantile: float | None = None):
        self.config = EnsembleConfig(num_members, ft_step, ft_lr, ft_schedule, ft_batch_size, ft_augment,
                                     num_chains, members, weight_decay, momentum, bn_batches, batch_members)
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps={eps!r} is invalid; it must be >= 0 (0 disables the clamp)")
        if not 0 < top_frac < 1 or not 0 <= warn_inverted_frac <= 1:
            raise ValueError(f"top_frac={top_frac!r}, warn_inverted_frac={warn_inverted_frac!r} are invalid; "
                             f"need 0 < top_frac < 1 and 0 <= warn_inverted_frac <= 1")
        reference = self.default_reference if reference is None else reference
        if reference not in REFERENCES:
            raise ValueError(f"reference={reference!r} is unknown; valid choices: {list(REFERENCES)}")
        if eps_quantile is not None and not 0 <= eps_quantile <= 1:
            raise ValueError(f"eps_quantile={eps_quantile!r} is invalid; it must lie in [0, 1] or be null")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} is invalid; it must be positive")
        if not isinstance(eval_batched, bool):
            raise ValueError(f"eval_batched={eval_batched!r} is invalid; valid choices: [False, True]")
        if eval_batched and not self.evaluates_members:
            raise ValueError(f"eval_batched=True does not apply to {type(self).__name__} (it evaluates the "
                             f"linearized network, not the members); set eval_batched=false")
        if isinstance(eval_members, bool) or not isinstance(eval_members, int) or eval_members < 1:
            raise ValueError(f"eval_members={eval_members!r} is invalid; it must be a positive integer")
        self.eps, self.top_frac, self.warn_inverted_frac = float(eps), top_frac, warn_inverted_frac
        self.reference, self.eps_quantile = reference, eps_quantile
        self.batch_size, self.eval_batched, self.eval_members = batch_size, eval_batched, eval_members
        self.ensemble: Ensemble | None = None
        self._losses: dict[tuple[str, int], tuple[LabeledData, Tensor]] = {}
        self._diagnostics: dict[str, float] = {}

    def fit(self, task: InfluenceTask) -> "GEX":
        """Build (or load from ``task.cache``, or resume) the ensemble."""
        super().fit(task)
        self.ensemble = build_ensemble(task, self.config)
        self._losses.clear()
        self._tau: float | None = None
        return self

    # ------------------------------------------------------------------------------------------- losses

    def _cached(self, kind: str, data: LabeledData, compute) -> Tensor:
        """Per-dataset memo (keyed by the object), so self-influence and influence share one loss pass."""
        entry = self._losses.get((kind, id(data)))
        if entry is None or entry[0] is not data:
            entry = (data, compute(data))
            self._losses[(kind, id(data))] = entry
        return entry[1]

    def member_losses(self, data: LabeledData) -> Tensor:
        """``L[i, m]``: eval-mode loss of each sample (label ``data.y``) under each member, shape ``(n, M)``."""
        self._require_fit()
        return self._cached("members", data, self._member_losses)

    def _member_losses(self, data: LabeledData) -> Tensor:
        task = self._require_fit()
        if self.eval_batched:
            return losses_for_states_batched(task.model, self.ensemble, data, task.loss, self.batch_size,
                                             self.eval_members, desc=f"{self.name} member losses")
        return losses_for_states(task.model, self.ensemble, data, task.loss, self.batch_size,
                                 desc=f"{self.name} member losses")

    def reference_losses(self, data: LabeledData) -> Tensor:
        """``l_i(theta*)``, unclamped, shape ``(n,)``."""
        return self._theta_star(data)[0]

    def _theta_star(self, data: LabeledData) -> tuple[Tensor, Tensor]:
        """theta*'s losses ``(n,)`` and whether it predicts each label (bool ``(n,)``), from one eval pass."""
        task = self._require_fit()

        def compute(d: LabeledData) -> Tensor:
            logits = eval_logits(task.model, d, self.batch_size)
            return torch.stack([per_sample_loss(logits, d.y.cpu(), task.loss).float(),
                                (logits.argmax(-1) == d.y.cpu()).float()])
        both = self._cached("theta_star", data, compute)
        return both[0], both[1].bool()

    def tau(self) -> float:
        """The clamp in force: ``eps``, or the ``eps_quantile`` quantile of theta*'s training losses."""
        if self.eps_quantile is None:
            return self.eps
        if self._tau is None:
            self._tau = float(self.reference_losses(self._require_fit().train).double().quantile(self.eps_quantile))
        return self._tau

    def references(self, data: LabeledData) -> Tensor:
        """The reference ``r_i`` of each sample under ``reference``, shape ``(n,)``."""
        losses, fitted = self._theta_star(data)
        return reference_values(losses, fitted, self.reference, self.tau())

    def loss_deviations(self, data: LabeledData) -> Tensor:
        """``D[i, m] = L[i, m] - r_i``, shape ``(n, M)``."""
        return self.member_losses(data) - self.references(data).unsqueeze(1)

    # ------------------------------------------------------------------------------------------- scores

    def self_influence(self, data: LabeledData) -> Tensor:
        """``mean_m D[i, m]^2``, shape ``(n,)``, >= 0; higher = more influential. Records ``diagnostics``."""
        scores = self.loss_deviations(data).pow(2).mean(dim=1)
        self._record_diagnostics(data, scores)
        return scores

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        """``D_train D_test^T / M``, shape ``(n_train, n_test)``; positive = the train sample lowers the test loss.

        Each test sample has its own reference, so ``influence(...).mean(1)`` is ``D_train @ mean_j D[j] / M``
        (with ``clamped`` the clamp sits *inside* the test mean; compare ``influence_on_mean_test``). The diagonal
        for ``test is train`` equals ``self_influence``.
        """
        dev_train = self.loss_deviations(train)
        dev_test = self.loss_deviations(test)
        return dev_train @ dev_test.T / dev_train.shape[1]

    def influence_on_mean_test(self, train: LabeledData, test: LabeledData) -> Tensor:
        """Cross-influence on the mean test loss, shape ``(n_train,)``.

        ``I_i = (1/M) sum_m D[i, m] (T_m - t)`` with ``T_m`` the mean test loss under member m. With ``clamped``
        (the authors'), ``t = max(mean_j l_j(theta*), tau)``: the clamp applies to the *mean* test loss, unlike
        ``influence(train, test).mean(1)``, which clamps each test sample's reference. With ``fit_aware``,
        ``t = mean_j r_j`` and the two agree.
        """
        dev_train = self.loss_deviations(train)
        test_mean = self.member_losses(test).mean(dim=0)                    # (M,)
        if self.reference == "clamped":
            reference = self.reference_losses(test).mean().clamp(min=self.tau())
        else:
            reference = self.references(test).mean()
        return dev_train @ (test_mean - reference) / dev_train.shape[1]

    # ------------------------------------------------------------------------------------- diagnostics

    def diagnostics(self) -> dict[str, float]:
        """Numbers from the last ``self_influence`` call.

        ``member_loss_top`` / ``member_loss_rest``: median over samples of the per-sample median member loss, for
        the top ``top_frac`` by self-influence and the others; ``member_loss_noisy`` / ``member_loss_clean``: the
        same for mislabeled / other samples (when the data has noisy labels); ``frac_below_eps``: share of
        samples whose median member loss is below tau; ``frac_clamp_inverted``: share whose ranking the clamp
        inverts (``clamp_inverted``; 0 without a clamp); ``tau``: the clamp in force; ``frac_reference_unfit``:
        share of samples theta* does not fit (their ``fit_aware`` reference is 0).
        """
        return dict(self._diagnostics)

    def _record_diagnostics(self, data: LabeledData, scores: Tensor) -> None:
        median = self.member_losses(data).double().quantile(0.5, dim=1)    # (n,) per-sample median over m
        top = torch.zeros(len(scores), dtype=torch.bool)
        top[scores.topk(max(1, math.ceil(self.top_frac * len(scores)))).indices] = True
        groups = {"member_loss_top": top, "member_loss_rest": ~top}
        noisy = data.is_noisy.cpu()
        if noisy.any() and (~noisy).any():
            groups |= {"member_loss_noisy": noisy, "member_loss_clean": ~noisy}
        diag = {k: float(median[m].quantile(0.5)) if m.any() else float("nan") for k, m in groups.items()}
        tau = self.tau()
        losses, fitted = self._theta_star(data)
        clamps = self.uses_clamp and self.reference == "clamped"
        inverted = clamp_inverted(self.member_losses(data), losses, tau) if clamps else torch.zeros(len(losses))
        diag |= {"frac_below_eps": float((median < tau).double().mean()), "tau": tau,
                 "frac_clamp_inverted": float(inverted.double().mean()),
                 "frac_reference_unfit": float((~fitted).double().mean())}
        self._diagnostics = diag
        warn_if_inverted(self.name, diag["frac_clamp_inverted"], self.warn_inverted_frac, tau)


@register("gex_clamped")
class GEXClamped(GEX):
    """The authors' GEX: the clamped reference ``max(l(theta*), eps)`` with their ``eps`` = 0.05 by default.

    Options as ``GEX`` (``reference`` defaults to ``clamped``); the paper presets use this form.
    """

    default_reference = "clamped"


@register("gex_lin")
class GEXLin(GEX):
    """GEX-lin: the same members, but losses of the linearized network ``f(theta*) + J (theta_m - theta*)``.

    Isolates the effect of linearization (docs/method.md#the-method): the Jacobian and BN statistics are theta*'s for every member.
    Options as ``GEX``. Without BN the gap to GEX is second order in the step and vanishes as ``ft_lr -> 0``
    (tested). With BN it does not: GEX evaluates each member with its own refreshed statistics, a first-order
    function of the weights that the frozen-statistics linearization leaves out (on a tiny BN MLP the relative gap
    of the deviations levels off near 0.2 as ft_lr goes from 1e-2 to 1e-4). A BN unit whose running variance is
    nearly zero multiplies every change of its input by ~1/sqrt(var + bn_eps) in the linearized network, while a
    member's refreshed statistics normalize that change away; on the toy this makes linearized losses reach
    hundreds where members' stay below 2.
    """

    evaluates_members = False

    def _member_losses(self, data: LabeledData) -> Tensor:
        task = self._require_fit()
        return linearized_losses(task.model, data, self._deltas(), task.loss, self.batch_size,
                                 desc=f"{self.name} linearized losses")

    def _deltas(self) -> Iterator[Tensor]:
        """``theta_m - theta*`` as flat ``(P,)`` vectors, one member loaded at a time."""
        model = self._require_fit().model
        names, theta = param_names(model), params_vector(model)
        for state in self.ensemble:
            yield torch.cat([state[n].reshape(-1) for n in names]).to(theta) - theta


@register("gex_mean_loss")
class GEXMeanLoss(GEX):
    """Ablation: the mean member loss ``(1/M) sum_m L[i, m]``, no reference and no clamp (docs/decisions.md#what-the-cpu-pilot-taught-us).

    Options as ``GEX``; ``eps`` only sets the ``frac_below_eps`` diagnostic. It has no pairwise form.
    """

    uses_clamp = False

    def self_influence(self, data: LabeledData) -> Tensor:
        """Mean member loss, shape ``(n,)``; higher = more influential."""
        scores = self.member_losses(data).mean(dim=1)
        self._record_diagnostics(data, scores)
        return scores

    def influence(self, train: LabeledData, test: LabeledData) -> Tensor:
        raise NotImplementedError(f"method {self.name!r} has no pairwise influence; use self_influence")

    def influence_on_mean_test(self, train: LabeledData, test: LabeledData) -> Tensor:
        raise NotImplementedError(f"method {self.name!r} has no pairwise influence; use self_influence")
