"""Gradient-based baselines against exact answers: ``if_exact`` vs a brute-force Hessian solve; ``if_cg``,
``lissa`` and full-rank ``arnoldi`` vs ``if_exact``; ``tracin`` vs a Python loop over checkpoints and samples;
``tracin_rp`` tending to ``tracin`` as d grows; ``randproj`` unbiased for ``||g||^2``; chunk sizes that do not
matter; pairwise diagonals equal to self-influence; the sign; mislabel detection on digits; misuse errors."""
import dataclasses
import time
from pathlib import Path

import pytest
import torch
from conftest import TOL_EXACT
from omegaconf import OmegaConf
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.func import functional_call

import baselines  # noqa: F401  (registers the methods)
from gex.attribution import MethodError, build_method
from gex.grads import per_sample_grads
from gex.ihvp import explicit_curvature
from gex.losses import per_sample_loss
from gex.params import model_state, num_params, params_vector, vector_to_params

torch.set_flush_denormal(True)
ALPHA = 1.0          # damping of the exactness comparisons (keeps LiSSA's contraction fast)
N_SUB, N_TEST = 30, 8
TOL_ITER = 1e-4      # relative Frobenius error of converged iterative solvers vs if_exact
TOL_CHUNK = 1e-6     # relative difference between chunk sizes (round-off only: every row is solved on its own)
MIN_SPEARMAN = 0.99
GRAD_METHODS = ["grad_dot", "randproj", "tracin", "tracin_rp", "if_exact", "if_cg", "lissa", "arnoldi"]
# Cheap but faithful settings on the tiny float64 task (P ~ 470): the algorithms are those of the defaults.
TINY_KW = {"if_exact": {"damping": ALPHA}, "if_cg": {"damping": ALPHA, "tol": 1e-6},
           "lissa": {"depth": 8, "scale": 10.0, "damping": 0.05, "batch_size": 32}, "arnoldi": {"damping": ALPHA}}
# Digits (P ~ 1240, float32): defaults, except a shorter LiSSA and a better-conditioned CG to keep the file quick.
DIGITS_KW = {"if_cg": {"damping": 1.0, "tol": 1e-3}, "lissa": {"depth": 20}}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _rows(data, n):
    return data.subset(torch.arange(n))


@pytest.fixture(scope="module")
def tiny(tiny_task64):
    return tiny_task64, _rows(tiny_task64.train, N_SUB), _rows(tiny_task64.test, N_TEST)


@pytest.fixture(scope="module")
def exact(tiny):
    task, sub, test = tiny
    method = build_method("if_exact", damping=ALPHA).fit(task)
    return method, method.self_influence(sub), method.influence(sub, test)


def _loop_grads(model, data, loss):
    """(n, P) gradients of each sample's eval loss, one backward pass per sample."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(data)):
        li = per_sample_loss(model(data.x[i:i + 1]), data.y[i:i + 1], loss).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, params)]))
    return torch.stack(rows)


def test_if_exact_equals_a_brute_force_hessian_solve(tiny, exact):
    task, sub, test = tiny
    _, frozen = model_state(task.model)

    def mean_loss(theta):
        logits = functional_call(task.model, (vector_to_params(task.model, theta), frozen), (task.train.x,))
        return per_sample_loss(logits, task.train.y, task.loss).mean()
    hessian = torch.autograd.functional.hessian(mean_loss, params_vector(task.model), vectorize=True)
    a = hessian + ALPHA * torch.eye(len(hessian), dtype=hessian.dtype)
    g_sub, g_test = _loop_grads(task.model, sub, task.loss), _loop_grads(task.model, test, task.loss)
    _, self_scores, pair = exact
    torch.testing.assert_close(self_scores, (g_sub * torch.linalg.solve(a, g_sub.T).T).sum(1),
                               rtol=TOL_EXACT, atol=TOL_EXACT)
    torch.testing.assert_close(pair, g_sub @ torch.linalg.solve(a, g_test.T), rtol=TOL_EXACT, atol=TOL_EXACT)


def test_if_exact_ggn_option_and_refusals(tiny, digits_task):
    task, sub, _ = tiny
    ggn = build_method("if_exact", damping=0.01, curvature="ggn").fit(task)  # PSD: small damping suffices
    assert (ggn.self_influence(sub) > 0).all()
    with pytest.raises(MethodError, match=r"not positive definite .*use damping > 0.0"):
        build_method("if_exact", damping=0.0).fit(task)  # the Hessian at theta* has negative eigenvalues
    with pytest.raises(MethodError, match=f"max_params=1000, the model has P={num_params(digits_task.model)}"):
        build_method("if_exact", max_params=1000).fit(digits_task)


@pytest.mark.parametrize("name,kw", [
    ("if_cg", {"damping": ALPHA, "tol": 1e-10, "max_iter": 300}),
    ("lissa", "full"),  # the exact Neumann series on the full training set, scaled and damped to match
    ("arnoldi", "full"),  # every Ritz pair: n_iter = P + 1, top_k = P
])
def test_iterative_solvers_match_if_exact(tiny, exact, name, kw):
    task, sub, test = tiny
    if name == "lissa":
        spectrum = torch.linalg.eigvalsh(explicit_curvature(task.model, task.train, task.loss))
        # Mode lam contracts by 1 - (ALPHA + lam)/scale; this scale balances the two extreme modes (~0.87 here).
        scale = float(spectrum[0] + spectrum[-1]) / 2 + ALPHA
        kw = {"depth": 90, "scale": scale, "damping": ALPHA / scale, "batch_size": None}
    if name == "arnoldi":
        p = num_params(task.model)
        kw = {"n_iter": p + 1, "top_k": p, "damping": ALPHA}
    method = build_method(name, **kw).fit(task)
    _, self_ref, pair_ref = exact
    assert _rel(method.self_influence(sub), self_ref) < TOL_ITER
    assert _rel(method.influence(sub, test), pair_ref) < TOL_ITER


def test_lissa_with_mini_batches_ranks_like_if_exact(tiny, exact):
    task, sub, _ = tiny
    scale = 10.0
    method = build_method("lissa", depth=60, scale=scale, damping=ALPHA / scale, batch_size=60)
    rho = spearmanr(method.fit(task).self_influence(_rows(sub, 20)), exact[1][:20]).statistic
    assert rho >= MIN_SPEARMAN, f"lissa mini-batch Spearman {rho:.4f}"


def test_arnoldi_top_k_is_a_truncation_of_if_exact(tiny):
    """With damping 0 and top_k < P, Arnoldi keeps only the top curvature directions; its scores are below the
    full-rank ones and correlate with them (the authors' setting)."""
    task, sub, _ = tiny
    full = build_method("if_exact", damping=ALPHA).fit(task).self_influence(sub)
    part = build_method("arnoldi", n_iter=30, top_k=10, damping=ALPHA).fit(task).self_influence(sub)
    assert (part <= full * (1 + TOL_ITER)).all() and spearmanr(part, full).statistic > 0.8


def test_arnoldi_mini_batches_of_the_whole_set_equal_the_full_hessian(tiny):
    """A mini-batch as large as the training set is the full set in shuffled order: the same Hessian."""
    task, sub, _ = tiny
    n = len(task.train)
    full = build_method("arnoldi", n_iter=20, top_k=8).fit(task)
    batched = build_method("arnoldi", n_iter=20, top_k=8, hvp_data="minibatch", hvp_batch_size=n).fit(task)
    torch.testing.assert_close(batched.eigenvalues_, full.eigenvalues_, rtol=1e-8, atol=1e-8)
    assert _rel(batched.self_influence(sub), full.self_influence(sub)) < 1e-6
    half = build_method("arnoldi", n_iter=20, top_k=8, hvp_data="minibatch", hvp_batch_size=n // 2).fit(task)
    assert _rel(half.eigenvalues_, full.eigenvalues_) > 1e-3  # genuinely stochastic otherwise


def _explicit_tracin(task, data_a, data_b, weighting):
    """sum_c w_c g_c(a) . g_c(b) by loops over checkpoints and samples (fresh float64 models)."""
    total = 0.0
    c_count = len(task.trajectory)
    for ckpt in task.trajectory:
        model = task.make_model().double()
        model.load_state_dict(ckpt.state)
        w = ckpt.lr if weighting == "lr" else 1.0 / c_count
        total = total + w * _loop_grads(model, data_a, task.loss) @ _loop_grads(model, data_b, task.loss).T
    return total


@pytest.mark.parametrize("weighting", ["lr", "mean"])
def test_tracin_equals_a_python_loop_over_checkpoints(tiny, weighting):
    task, sub, test = tiny
    method = build_method("tracin", weighting=weighting).fit(task)
    sub10 = _rows(sub, 10)
    ref_self = _explicit_tracin(task, sub10, sub10, weighting).diagonal()
    torch.testing.assert_close(method.self_influence(sub10), ref_self, rtol=TOL_EXACT, atol=TOL_EXACT)
    torch.testing.assert_close(method.influence(sub10, test), _explicit_tracin(task, sub10, test, weighting),
                               rtol=TOL_EXACT, atol=TOL_EXACT)


@pytest.mark.parametrize("weighting", ["mean", "lr"])
def test_tracin_rp_approaches_tracin_as_d_grows(tiny, weighting):
    task, sub, test = tiny
    ref = build_method("tracin", weighting=weighting).fit(task)
    ref_self, ref_pair = ref.self_influence(sub), ref.influence(sub, test)
    errors = []
    for dim in (20, 5000):
        rp = build_method("tracin_rp", dim=dim, weighting=weighting, seed=0).fit(task)
        errors.append((_rel(rp.self_influence(sub), ref_self), _rel(rp.influence(sub, test), ref_pair)))
    (small_self, small_pair), (big_self, big_pair) = errors
    assert big_self < 0.08 and big_pair < 0.15     # O(sqrt(2/d)) = 0.02 for d = 5000
    assert big_self < small_self / 4 and big_pair < small_pair / 4  # errors shrink like 1/sqrt(d): ~16x


def test_randproj_self_influence_is_unbiased_for_the_squared_gradient_norm(digits_task):
    """(1/d) sum_k (g.v_k)^2 / ||g||^2 ~ chi2_d / d for every g: mean 1. Averaged over K seeds and the samples, its
    standard deviation is sqrt(2 tr(A^2) / (d K)) with A = mean_i g_i g_i^T / ||g_i||^2 (computed, not guessed)."""
    data, dim, seeds = _rows(digits_task.train, 100), 20, 50
    exact = build_method("grad_dot").fit(digits_task).self_influence(data).double()
    ratios = torch.stack([build_method("randproj", dim=dim, seed=s).fit(digits_task).self_influence(data).double()
                          / exact for s in range(seeds)])                     # (K, n)
    g = per_sample_grads(digits_task.model, data.x, data.y, digits_task.loss).double()
    unit = g / g.norm(dim=1, keepdim=True)
    tr_a2 = float(((unit @ unit.T) ** 2).mean())
    sigma_mean = (2 * tr_a2 / (dim * seeds)) ** 0.5
    assert abs(float(ratios.mean()) - 1) < 4 * sigma_mean, (float(ratios.mean()), sigma_mean)
    per_sample = ratios.mean(0)                                             # each ~ chi2_{dK} / (dK)
    assert float((per_sample - 1).abs().max()) < 5 * (2 / (dim * seeds)) ** 0.5
    # grad_dot is the d -> infinity limit: one huge projection is within a few percent everywhere.
    huge = build_method("randproj", dim=5000, seed=0).fit(digits_task).self_influence(data).double()
    assert float((huge / exact - 1).abs().max()) < 5 * (2 / 5000) ** 0.5


@pytest.mark.parametrize("name", GRAD_METHODS)
def test_scores_ignore_chunk_size_and_pairwise_diagonal_is_self(tiny, name):
    task, sub, test = tiny
    sub, test = _rows(sub, 16), _rows(test, 4)
    kw = TINY_KW.get(name, {})
    small = build_method(name, chunk_size=7, **kw).fit(task)
    large = build_method(name, chunk_size=64, **kw).fit(task)
    s7, s64 = small.self_influence(sub), large.self_influence(sub)
    assert _rel(s7, s64) < TOL_CHUNK
    assert _rel(small.influence(sub, test), large.influence(sub, test)) < TOL_CHUNK
    assert _rel(small.influence(sub, sub).diagonal(), s7) < TOL_CHUNK


@pytest.mark.parametrize("name", ["grad_dot", "if_exact"])
def test_an_identical_training_sample_is_a_proponent(tiny, name):
    task, sub, _ = tiny
    method = build_method(name, **TINY_KW.get(name, {})).fit(task)
    for i in (0, 5, 17):
        twin = sub.subset(torch.tensor([i]))          # the same x and the same y, as a test sample
        assert float(method.influence(sub, twin)[i, 0]) > 0


@pytest.mark.parametrize("name", GRAD_METHODS)
def test_mislabeled_digits_have_high_self_influence(digits_task, name):
    start = time.perf_counter()
    scores = build_method(name, **DIGITS_KW.get(name, {})).fit(digits_task).self_influence(digits_task.train)
    wall = time.perf_counter() - start
    noisy = digits_task.train.is_noisy.cpu().numpy()
    auroc, ap = roc_auc_score(noisy, scores.numpy()), average_precision_score(noisy, scores.numpy())
    print(f"{name}: auroc={auroc:.3f} ap={ap:.3f} wall_s={wall:.2f}")
    assert auroc > 0.6


@pytest.mark.parametrize("name,kw,match", [
    ("tracin", {"weighting": "sum"}, r"tracin.weighting='sum' is unknown; valid choices: \['lr', 'mean'\]"),
    ("tracin_rp", {"dim": 0}, "tracin_rp.dim must be >= 1, got 0"),
    ("randproj", {"chunk_size": 0}, "randproj.chunk_size must be >= 1, got 0"),
    ("if_exact", {"curvature": "fisher"}, r"if_exact.curvature='fisher' is unknown"),
    ("if_cg", {"tol": 0}, "if_cg needs damping >= 0 and tol > 0"),
    ("lissa", {"damping": 1.0}, "lissa needs scale > 0 and 0 <= damping < 1"),
    ("arnoldi", {"hvp_data": "half"}, r"arnoldi.hvp_data='half' is unknown; valid choices: \['full', 'minibatch'\]"),
    ("arnoldi", {"n_iter": 1}, "arnoldi needs n_iter >= 2"),
])
def test_bad_options_are_one_line_errors(name, kw, match):
    with pytest.raises(MethodError, match=match):
        build_method(name, **kw)


def test_scoring_before_fit_and_missing_trajectory_are_errors(tiny):
    task, sub, _ = tiny
    with pytest.raises(MethodError, match="call fit"):
        build_method("grad_dot").self_influence(sub)
    bare = dataclasses.replace(task, trajectory=[])
    for name in ("tracin", "tracin_rp"):
        with pytest.raises(MethodError, match="task.trajectory is empty"):
            build_method(name).fit(bare)


def test_lissa_with_too_small_a_scale_is_reported(tiny):
    task, sub, _ = tiny
    with pytest.raises(MethodError, match="lissa diverged with scale=1.0"):
        build_method("lissa", depth=25, scale=1.0, batch_size=None).fit(task).self_influence(_rows(sub, 3))


@pytest.mark.parametrize("name", GRAD_METHODS)
def test_method_configs_build_their_method(name):
    path = Path(__file__).resolve().parents[1] / "configs" / "method" / f"{name}.yaml"
    assert path.read_text().startswith("# "), f"{path} must open with a comment line"
    options = OmegaConf.to_container(OmegaConf.load(path))
    assert options.pop("name") == name
    method = build_method(name, **options)
    assert all(getattr(method, key) == value for key, value in options.items())
