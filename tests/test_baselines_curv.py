"""Curvature baselines (la_kfac, ekfac, trak) against exact answers: the posterior covariance K-FAC states,
EK-FAC where K-FAC is exact and against an explicit EK-FAC matrix, TRAK against its unprojected closed form,
detection on digits, signs, and misuse."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TOL_EXACT, TOL_FLOAT32
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.func import functional_call, grad, vmap

import baselines  # noqa: F401  (registers every method)
from baselines.ekfac import EKFAC
from baselines.la_kfac import LaKFAC
from gex.attribution import InfluenceTask, MethodError, build_method
from gex.data import LabeledData
from gex.evaluation import per_sample_losses
from gex.params import model_state
from gex.runs import ArtifactCache
from gex.train import TrainConfig

MIN_AUROC = 0.6          # beat chance clearly on digits (measured: la_kfac tuned 0.98, ekfac 0.98)
LA_SAMPLES = 3000        # draws for the covariance check
TOL_COV = 0.5            # spectral norm of C^-1/2 C_emp C^-1/2 - I; ~2 sqrt(70/3000) = 0.31 expected
CLAMP_DOMINANCE = 0.01   # paper defaults: linearized-loss shifts are below 1% of eps
# ekfac vs the exact GGN influence (Linear params) on the tiny MLP, Spearman; measured 0.48 pairwise, 0.97 self at
# damping 0.1 (K-FAC drops the cross-layer blocks; 0.26 / 0.95 at damping 1e-3, 0.61 / 0.99 at 1.0)
MIN_RANK_PAIR, MIN_RANK_SELF = 0.3, 0.9


def _auroc(task, scores):
    return roc_auc_score(task.train.is_noisy.cpu().numpy(), scores.cpu().numpy())


def _cpu_config(name):
    with open(f"configs/method/{name}.yaml") as handle:
        cfg = yaml.safe_load(handle)
    assert cfg.pop("name") == name
    return cfg


def _manual_task(model, x, y, xt, yt, num_classes):
    data = lambda a, b: LabeledData(x=a, y=b, y_clean=b.clone(), num_classes=num_classes)  # noqa: E731
    return InfluenceTask(model=model.eval(), train=data(x, y), test=data(xt, yt), recipe=TrainConfig(),
                         make_model=lambda: model)


def _label_grads(model, x, names):
    """Per-sample, per-label loss gradients of the parameters ``names``, ``(K, n, P_sub)``, by vmap (reference)."""
    params, frozen = model_state(model)

    def loss(p, xi, k):
        return F.cross_entropy(functional_call(model, ({**params, **p}, frozen), (xi[None],)), k[None])
    sub = {n: params[n] for n in names}
    k_all = model(x).shape[1]
    out = []
    for k in range(k_all):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(sub, x, torch.full((len(x),), k))
        out.append(torch.cat([g[n].reshape(len(x), -1) for n in names], dim=1))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ la_kfac

@pytest.fixture(scope="module")
def la_tiny(tiny_task64):
    return LaKFAC(n_curvature_batches=10, num_samples=8).fit(tiny_task64)


def test_la_kfac_samples_have_the_kfac_posterior_covariance(la_tiny, tiny_task64):
    """Empirical covariance of the last Linear block's samples = (sigma^2/N)(A (x) G + lambda I)^-1."""
    method, n = la_tiny, len(tiny_task64.train)
    names = [name for name, _ in tiny_task64.model.named_parameters()]
    sizes = [p.numel() for p in tiny_task64.model.parameters()]
    off = sum(sizes[:names.index("4.weight")])
    draws = torch.stack([method.sample(m) for m in range(LA_SAMPLES)])
    w = torch.cat([draws[:, off:off + 60].reshape(-1, 10, 6), draws[:, off + 60:off + 70].reshape(-1, 10, 1)], 2)
    emp = w.reshape(LA_SAMPLES, 70).T @ w.reshape(LA_SAMPLES, 70) / LA_SAMPLES
    fisher = torch.kron(method.factors_.G["4"], method.factors_.A["4"])  # row-major vec of W = [weight | bias]
    lam = (method.sigma / method.alpha) ** 2 / n
    eye = torch.eye(70, dtype=fisher.dtype)

    def whitened_error(cov):
        s, q = torch.linalg.eigh(cov)
        root = q @ torch.diag(s.rsqrt()) @ q.T
        return float(torch.linalg.matrix_norm(root @ emp @ root - eye, 2))

    assert whitened_error(method.sigma ** 2 / n * torch.linalg.inv(fisher + lam * eye)) < TOL_COV
    # the check discriminates: the diagonal of F, or a 10x larger lambda, is rejected
    assert whitened_error(method.sigma ** 2 / n * torch.linalg.inv(torch.diag(fisher.diag()) + lam * eye)) > 4 * TOL_COV
    assert whitened_error(method.sigma ** 2 / n * torch.linalg.inv(fisher + 10 * lam * eye)) > 4 * TOL_COV


def test_la_kfac_scores_follow_the_gex_formula(la_tiny, tiny_task64):
    train, test = tiny_task64.train, tiny_task64.test
    dev = la_tiny.deviations(train)
    assert dev.shape == (len(train), 8)
    torch.testing.assert_close(la_tiny.self_influence(train), dev.pow(2).mean(1), rtol=TOL_EXACT, atol=TOL_EXACT)
    pair = la_tiny.influence(train, test)
    torch.testing.assert_close(pair, dev @ la_tiny.deviations(test).T / 8, rtol=TOL_EXACT, atol=TOL_EXACT)
    torch.testing.assert_close(la_tiny.influence(train, train).diag(), la_tiny.self_influence(train),
                               rtol=TOL_EXACT, atol=TOL_EXACT)


def test_la_kfac_paper_defaults_are_dominated_by_the_clamp(digits_task):
    """alpha = sigma = 1e-4: the shifts are tiny, so a clamped sample scores (eps - l)^2 (docs/baselines.md#la-kfac)."""
    method = build_method("la_kfac", **_cpu_config("la_kfac")).fit(digits_task)
    scores = method.self_influence(digits_task.train)
    ref = per_sample_losses(digits_task.model, digits_task.train)
    clamped = ref < method.eps
    assert method.diagnostics()["median_lin_shift"] < CLAMP_DOMINANCE * method.eps
    torch.testing.assert_close(scores[clamped], (method.eps - ref[clamped]) ** 2, rtol=0.05, atol=1e-6)
    print(f"la_kfac paper defaults: AUROC {_auroc(digits_task, scores):.3f}, "
          f"clamped {float(clamped.float().mean()):.2f}")


@pytest.mark.parametrize("options", [dict(eps=0.0), dict(alpha=0.1, sigma=0.1)])
def test_la_kfac_tuned_detects_noise(digits_task, options):
    method = build_method("la_kfac", **{**_cpu_config("la_kfac"), **options}).fit(digits_task)
    auroc = _auroc(digits_task, method.self_influence(digits_task.train))
    print(f"la_kfac {options}: AUROC {auroc:.3f}")
    assert auroc > MIN_AUROC


def test_la_kfac_caches_its_factors(tiny_task64, tmp_path):
    task = dataclasses.replace(tiny_task64, cache=ArtifactCache(tmp_path), cache_spec={"id": "tiny"})
    first = LaKFAC(n_curvature_batches=3, num_samples=2).fit(task)
    assert len(list(tmp_path.glob("la_kfac/*/factors.pt"))) == 1
    second = LaKFAC(n_curvature_batches=3, num_samples=2).fit(task)
    torch.testing.assert_close(second.factors_.A["4"], first.factors_.A["4"], rtol=0, atol=0)
    torch.testing.assert_close(second.deltas_[1], first.deltas_[1], rtol=0, atol=0)


@pytest.mark.parametrize("options,match", [(dict(alpha=0.0), "la_kfac.alpha=0.0"),
                                           (dict(fisher="fim"), "fisher='fim'.*valid choices"),
                                           (dict(ema_decay=1.0), "ema_decay=1.0"),
                                           (dict(num_samples=0), "num_samples=0")])
def test_la_kfac_rejects_bad_options(options, match):
    with pytest.raises(MethodError, match=match):
        LaKFAC(**options)


@pytest.mark.parametrize("name", ["la_kfac", "ekfac"])
def test_kfac_methods_fail_at_fit_on_unsupported_models(name):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    task = _manual_task(model, torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 3),
                        torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(MethodError, match=f"{name}: module '1' \\(LayerNorm\\)"):
        build_method(name).fit(task)


# -------------------------------------------------------------------------------------------------- ekfac

def test_ekfac_is_exact_where_kfac_eigenbases_diagonalize_the_fisher():
    """One Linear layer (no bias), scaled one-hot inputs (distinct A eigenvalues), 2 classes: the per-sample
    Fisher blocks s^2 e_k e_k^T (x) c v v^T (v = (1, -1)/sqrt 2) are all diagonal in Q_A (x) Q_G, so EK-FAC equals
    the exact Fisher (plain K-FAC does not)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2, bias=False).double()
    model.weight.data *= 3  # spread the predicted probabilities, so that plain K-FAC is visibly wrong
    coords = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    scales = torch.linspace(0.5, 3.0, 10, dtype=torch.float64)
    x, y = F.one_hot(coords, 4).double() * scales[:, None], torch.randint(0, 2, (10,))
    xt, yt = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    task = _manual_task(model, x, y, xt, yt, 2)
    method = EKFAC(fisher="ggn", damping=1e-3, damping_mode="absolute").fit(task)
    probs = model(x).softmax(-1).detach()
    g = _label_grads(model, x, ["weight"])                                     # (K, n, P)
    fisher = torch.einsum("kn,kni,knj->ij", probs.T, g, g) / len(x)
    g_train = _label_grads(model, x, ["weight"])[y, torch.arange(10)]
    g_test = _label_grads(model, xt, ["weight"])[yt, torch.arange(5)]
    exact = g_train @ torch.linalg.solve(fisher + 1e-3 * torch.eye(8, dtype=fisher.dtype), g_test.T)
    torch.testing.assert_close(method.influence(task.train, task.test), exact, rtol=1e-8, atol=TOL_EXACT)
    # K-FAC without the correction misses it: the check can fail
    q_a, s_a, q_g, s_g = method.factors_.eig[""]
    kfac = torch.kron(q_g, q_a) @ torch.diag(torch.kron(s_g, s_a) + 1e-3) @ torch.kron(q_g, q_a).T
    assert (g_train @ torch.linalg.solve(kfac, g_test.T) - exact).abs().max() > 0.1 * exact.abs().max()


def _kron_names(task):
    return ["1.weight", "1.bias", "4.weight", "4.bias"]


def _blocks(flat):
    """(..., 460) gradients of the tiny MLP's Linear params -> row-major vec of W1 (6x65) and W4 (10x7)."""
    w1 = torch.cat([flat[..., :384].reshape(*flat.shape[:-1], 6, 64), flat[..., 384:390, None]], -1)
    w4 = torch.cat([flat[..., 390:450].reshape(*flat.shape[:-1], 10, 6), flat[..., 450:460, None]], -1)
    return torch.cat([w1.flatten(-2), w4.flatten(-2)], -1)


@pytest.fixture(scope="module")
def tiny_grads(tiny_task64):
    task = tiny_task64
    names = _kron_names(task)
    k_train = _blocks(_label_grads(task.model, task.train.x, names))           # (K, n, 460)
    k_test = _blocks(_label_grads(task.model, task.test.x, names))
    g_train = k_train[task.train.y, torch.arange(len(task.train))]
    g_test = k_test[task.test.y, torch.arange(len(task.test))]
    return k_train, g_train, g_test


def test_ekfac_equals_an_explicit_ekfac_matrix(tiny_task64, tiny_grads):
    """Influence = g_test^T (Q diag(lam + d) Q^T)^-1 g_train with lam from brute-force per-label gradients."""
    task, (k_train, g_train, g_test) = tiny_task64, tiny_grads
    method = EKFAC(fisher="ggn", damping=0.1).fit(task)
    eig = method.factors_.eig
    q = torch.block_diag(*[torch.kron(eig[n][2], eig[n][0]) for n in ("1", "4")])
    probs = task.model(task.train.x).softmax(-1).detach()
    lam = torch.einsum("kn,knp->p", probs.T, (k_train @ q) ** 2) / len(task.train)
    d = torch.cat([0.1 * lam[:390].mean().expand(390), 0.1 * lam[390:].mean().expand(70)])
    h_inv = q @ torch.diag(1 / (lam + d)) @ q.T
    torch.testing.assert_close(method.influence(task.train, task.test), g_train @ h_inv @ g_test.T,
                               rtol=1e-7, atol=TOL_EXACT)
    torch.testing.assert_close(method.self_influence(task.train), ((g_train @ h_inv) * g_train).sum(1),
                               rtol=1e-7, atol=TOL_EXACT)


def test_ekfac_ranks_like_the_exact_ggn_influence(tiny_task64, tiny_grads):
    """Reported: Spearman of ekfac (mc labels, the default) vs the exact GGN inverse (Linear params)."""
    task, (k_train, g_train, g_test) = tiny_task64, tiny_grads
    probs = task.model(task.train.x).softmax(-1).detach()
    ggn = torch.einsum("kn,kni,knj->ij", probs.T, k_train, k_train) / len(task.train)
    ggn += 0.1 * ggn.trace() / len(ggn) * torch.eye(len(ggn), dtype=ggn.dtype)
    exact = g_train @ torch.linalg.solve(ggn, g_test.T)
    method = EKFAC().fit(task)
    rho_pair = spearmanr(method.influence(task.train, task.test).flatten(), exact.flatten())[0]
    rho_self = spearmanr(method.self_influence(task.train), (g_train * torch.linalg.solve(ggn, g_train.T).T).sum(1))[0]
    print(f"ekfac vs exact GGN influence (tiny MLP): Spearman pairwise {rho_pair:.3f}, self {rho_self:.3f}")
    assert rho_pair > MIN_RANK_PAIR and rho_self > MIN_RANK_SELF


def test_ekfac_detects_noise_and_keeps_the_sign(digits_task):
    method = build_method("ekfac", **_cpu_config("ekfac")).fit(digits_task)
    scores = method.self_influence(digits_task.train)
    assert (scores > 0).all() and _auroc(digits_task, scores) > MIN_AUROC
    rows = torch.tensor([0, 7, 42, 99])
    pair = method.influence(digits_task.train, digits_task.train.subset(rows))
    assert (pair[rows, torch.arange(4)] > 0).all()                           # a sample supports itself
    torch.testing.assert_close(pair[rows, torch.arange(4)], scores[rows], rtol=TOL_FLOAT32, atol=0)


def test_ekfac_scores_ignore_batch_size(tiny_task64):
    a = EKFAC(fisher="ggn").fit(tiny_task64)
    b = EKFAC(fisher="ggn", batch_size=7, test_chunk=3).fit(tiny_task64)
    torch.testing.assert_close(b.influence_on_mean_test(tiny_task64.train, tiny_task64.test),
                               a.influence(tiny_task64.train, tiny_task64.test).mean(1), rtol=1e-9, atol=TOL_EXACT)
    torch.testing.assert_close(b.influence(tiny_task64.train, tiny_task64.test),
                               a.influence(tiny_task64.train, tiny_task64.test), rtol=1e-9, atol=TOL_EXACT)
    torch.testing.assert_close(b.self_influence(tiny_task64.train), a.self_influence(tiny_task64.train),
                               rtol=1e-9, atol=TOL_EXACT)


@pytest.mark.parametrize("options,match", [(dict(damping_mode="auto"), "damping_mode='auto'.*valid choices"),
                                           (dict(damping=0.0), "ekfac.damping=0.0"),
                                           (dict(batch_size=0), "batch_size=0")])
def test_ekfac_rejects_bad_options(options, match):
    with pytest.raises(MethodError, match=match):
        EKFAC(**options)


# --------------------------------------------------------------------------------------------------- trak

TRAK_DIMS = (256, 2048, 16384)  # error ~ 1/sqrt(d): expected to shrink ~2.8x per step (measured 0.42/0.15/0.055)
TOL_TRAK_LARGE_D = 0.1           # relative Frobenius error at the largest d
MIN_TRAK_SHRINK = 2.0            # per 8x more dimensions


def _brute_margin(model, data):
    """Margin gradients and Q = 1 - p by a per-sample autograd loop, ``(n, P)`` and ``(n,)``."""
    grads, q = [], []
    for i in range(len(data)):
        logits = model(data.x[i:i + 1])[0]
        y = int(data.y[i])
        p = logits.softmax(-1)[y]
        g = torch.autograd.grad(torch.log(p) - torch.log1p(-p), list(model.parameters()))
        grads.append(torch.cat([t.reshape(-1) for t in g])), q.append(1 - p.detach())
    return torch.stack(grads), torch.stack(q)


@pytest.fixture(scope="module")
def tiny_margins(tiny_task64):
    model = tiny_task64.model
    return _brute_margin(model, tiny_task64.train), _brute_margin(model, tiny_task64.test)


def test_trak_approaches_its_unprojected_closed_form(tiny_task64, tiny_margins):
    """Q_i g_i^T (G^T G + lambda I)^-1 g_test, lambda = 0.1 tr(G^T G)/N, is reached as d grows."""
    (g_train, q), (g_test, _) = tiny_margins
    gram = g_train.T @ g_train
    lam = 0.1 * gram.trace() / len(g_train)
    exact = q[:, None] * (g_train @ torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), g_test.T))
    errors = []
    for d in TRAK_DIMS:
        method = build_method("trak", num_checkpoints=1, proj_dim=d, damping=0.1).fit(tiny_task64)
        got = method.influence(tiny_task64.train, tiny_task64.test)
        errors.append(float((got - exact).norm() / exact.norm()))
    print(f"trak relative error vs unprojected closed form at d={TRAK_DIMS}: {[round(e, 3) for e in errors]}")
    assert errors[-1] < TOL_TRAK_LARGE_D
    assert all(a > MIN_TRAK_SHRINK * b for a, b in zip(errors, errors[1:]))


def test_trak_ensemble_equals_explicit_matrices(tiny_task64):
    """Two checkpoints, d = 32 < N: mean_c Q_c * mean_c Phi_c (Phi_c^T Phi_c)^-1 Phi_c(test)^T, explicitly."""
    method = build_method("trak", num_checkpoints=2, proj_dim=32).fit(tiny_task64)
    scores, quads, qs = method.influence(tiny_task64.train, tiny_task64.test), [], []
    assert all(p._kept is None for p in method.projectors_)  # each V is freed after its checkpoint's pass
    for state, projector in zip(tiny_task64.trajectory[-2:], method.projectors_):
        model = tiny_task64.make_model().double()
        model.load_state_dict(state.state)
        model.eval()
        (g_tr, q), (g_te, _) = _brute_margin(model, tiny_task64.train), _brute_margin(model, tiny_task64.test)
        v = projector.dense()
        phi_tr, phi_te = g_tr @ v.T, g_te @ v.T
        quads.append(phi_tr @ torch.linalg.solve(phi_tr.T @ phi_tr, phi_te.T)), qs.append(q)
    expected = torch.stack(qs).mean(0)[:, None] * torch.stack(quads).mean(0)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=TOL_EXACT)
    torch.testing.assert_close(method.self_influence(tiny_task64.train),
                               method.influence(tiny_task64.train, tiny_task64.train).diag(), rtol=1e-9, atol=TOL_EXACT)
    torch.testing.assert_close(method.influence_on_mean_test(tiny_task64.train, tiny_task64.test), scores.mean(1),
                               rtol=1e-9, atol=TOL_EXACT)


@pytest.mark.parametrize("options", [{}, {"proj_dim": 128}])
def test_trak_detects_noise_and_keeps_the_sign(digits_task, options):
    """Config defaults (d = 512 >= N = 300: leverage 1, the score is mean 1 - p) and d = 128 < N."""
    method = build_method("trak", **{**_cpu_config("trak"), **options}).fit(digits_task)
    scores = method.self_influence(digits_task.train)
    auroc = _auroc(digits_task, scores)
    print(f"trak {options}: AUROC {auroc:.3f}")
    assert (scores > 0).all() and auroc > MIN_AUROC
    rows = torch.tensor([0, 7, 42, 99])
    pair = method.influence(digits_task.train, digits_task.train.subset(rows))
    assert (pair[rows, torch.arange(4)] > 0).all()
    torch.testing.assert_close(pair[rows, torch.arange(4)], scores[rows], rtol=TOL_FLOAT32, atol=0)


def test_trak_shipped_budget_keeps_a_large_models_projection_whole():
    """The shipped 2 GB budget holds V (d = 512) for the 60k preset's 826k parameters: drawn once per checkpoint,
    not regenerated for every chunk of samples (results/README.md, 60k memorized)."""
    from gex.projection import GaussianProjector
    method = build_method("trak", **_cpu_config("trak"))
    assert GaussianProjector(826_000, method.proj_dim, max_block_mb=method.max_block_mb).block_rows == method.proj_dim


def test_trak_rejects_bad_options(tiny_task64):
    with pytest.raises(MethodError, match="trak.num_checkpoints=9 but task.trajectory holds 5"):
        build_method("trak", num_checkpoints=9).fit(tiny_task64)
    with pytest.raises(MethodError, match="trak.proj_dim=0"):
        build_method("trak", proj_dim=0)
