"""Curvature primitives against brute force: the explicit Hessian vs ``torch.autograd.functional.hessian``, the
GGN vs ``J^T H_out J`` from explicit Jacobians, batched products vs ``gex.ihvp.hvp``, and the solvers (CG,
LiSSA, Arnoldi + distill, power iteration) vs dense linear algebra on small explicit matrices."""
import pytest
import torch
from conftest import TOL_EXACT
from torch.func import functional_call

from gex.attribution import MethodError
from gex.ihvp import (
    DampedInverse,
    arnoldi_iteration,
    conjugate_gradient,
    curvature_block,
    curvature_matvec,
    distill,
    explicit_curvature,
    hvp,
    lissa_recursion,
    top_eigenvalue,
)
from gex.losses import per_sample_loss
from gex.params import model_state, num_params, params_vector, vector_to_params

torch.set_flush_denormal(True)  # denormal weights late in the cosine schedule slow CPUs ~3x
N_SUB = 40        # train samples in the brute-force Hessian checks (P ~ 470, float64)
TOL_SOLVER = 1e-6  # relative error of converged iterative solvers on well-conditioned matrices


@pytest.fixture(scope="module")
def sub64(tiny_task64):
    return tiny_task64.train.subset(torch.arange(N_SUB))


def _flat_mean_loss(task, data):
    """theta (P,) -> mean eval loss over ``data``: the function brute-force derivatives are taken of."""
    model = task.model
    _, frozen = model_state(model)

    def f(theta):
        logits = functional_call(model, (vector_to_params(model, theta), frozen), (data.x,))
        return per_sample_loss(logits, data.y, task.loss).mean()
    return f


def _spd(p=30, seed=0, low=0.5, high=5.0):
    """A random symmetric positive-definite (p, p) float64 matrix with spectrum in [low, high], and its spectrum."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    values = torch.linspace(low, high, p, dtype=torch.float64)
    return q @ torch.diag(values) @ q.T, values


def test_explicit_hessian_equals_autograd_hessian_of_the_flat_parameter_vector(tiny_task64, sub64):
    brute = torch.autograd.functional.hessian(_flat_mean_loss(tiny_task64, sub64), params_vector(tiny_task64.model))
    ours = explicit_curvature(tiny_task64.model, sub64, tiny_task64.loss, "hessian", batch_size=16)
    assert ours.shape == (num_params(tiny_task64.model),) * 2
    torch.testing.assert_close(ours, brute, rtol=TOL_EXACT, atol=TOL_EXACT)


def test_explicit_ggn_equals_jacobian_sandwich_and_is_psd(tiny_task64, sub64):
    model, frozen = tiny_task64.model, model_state(tiny_task64.model)[1]
    logits_fn = lambda th: functional_call(model, (vector_to_params(model, th), frozen), (sub64.x,))  # noqa: E731
    jac = torch.autograd.functional.jacobian(logits_fn, params_vector(model))              # (n, K, P)
    prob = torch.softmax(logits_fn(params_vector(model)), -1)
    h_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]                     # CE Hessian in logits
    brute = torch.einsum("nkp,nkl,nlq->pq", jac, h_out, jac) / N_SUB
    ours = explicit_curvature(model, sub64, "ce", "ggn")
    torch.testing.assert_close(ours, brute, rtol=TOL_EXACT, atol=TOL_EXACT)
    assert torch.linalg.eigvalsh(ours)[0] > -TOL_EXACT


def test_batched_products_equal_the_foundation_hvp(tiny_task64, sub64):
    gen = torch.Generator().manual_seed(1)
    vecs = torch.randn(3, num_params(tiny_task64.model), generator=gen, dtype=torch.float64)
    ours = curvature_matvec(tiny_task64.model, sub64, "ce", batch_size=16, vec_chunk=2)(vecs)
    brute = torch.stack([hvp(tiny_task64.model, sub64, v, "ce") for v in vecs])
    torch.testing.assert_close(ours, brute, rtol=TOL_EXACT, atol=TOL_EXACT)
    block = curvature_block(tiny_task64.model, sub64.x, sub64.y, vecs)  # one batch = the same mean
    torch.testing.assert_close(block, brute, rtol=TOL_EXACT, atol=TOL_EXACT)


def test_auto_vec_chunk_takes_one_vector_at_a_time_with_convolutions_and_all_at_once_without(tiny_task64, sub64):
    from torch import nn

    from gex.ihvp import resolve_vec_chunk
    assert resolve_vec_chunk(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), "auto") == 1
    assert resolve_vec_chunk(tiny_task64.model, "auto") is None
    assert resolve_vec_chunk(tiny_task64.model, 3) == 3 and resolve_vec_chunk(tiny_task64.model, None) is None
    for bad in (0, "all", True, 1.5):
        with pytest.raises(MethodError, match="must be auto, null or an integer >= 1"):
            resolve_vec_chunk(tiny_task64.model, bad)
    vecs = torch.randn(3, num_params(tiny_task64.model), generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)   # the chunking never changes the products
    one = curvature_matvec(tiny_task64.model, sub64, "ce", vec_chunk=1, mode="rev-rev")(vecs)
    torch.testing.assert_close(curvature_matvec(tiny_task64.model, sub64, "ce", vec_chunk=None, mode="rev-rev")(vecs),
                               one, rtol=TOL_EXACT, atol=TOL_EXACT)


def test_explicit_curvature_refuses_large_models_and_unknown_curvature(tiny_task64, sub64):
    with pytest.raises(MethodError, match="max_params=100"):
        explicit_curvature(tiny_task64.model, sub64, max_params=100)
    with pytest.raises(MethodError, match="valid choices: \\['hessian', 'ggn'\\]"):
        explicit_curvature(tiny_task64.model, sub64, curvature="fisher")


def test_damped_inverse_solves_and_names_the_damping_needed():
    a, _ = _spd()
    b = torch.randn(4, 30, dtype=torch.float64)
    inv = DampedInverse(a, damping=0.3)
    torch.testing.assert_close(inv.solve(b), torch.linalg.solve(a + 0.3 * torch.eye(30, dtype=a.dtype), b.T).T,
                               rtol=TOL_EXACT, atol=TOL_EXACT)
    expected = r"not positive definite \(smallest eigenvalue of H is -1.5\); use damping > 1.5"
    with pytest.raises(MethodError, match=expected):
        DampedInverse(a - 2.0 * torch.eye(30, dtype=a.dtype), damping=0.0)


def test_conjugate_gradient_matches_the_dense_solve_row_by_row():
    a, _ = _spd()
    b = torch.randn(5, 30, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: v @ a, b, tol=1e-12, max_iter=100)
    torch.testing.assert_close(x, torch.linalg.solve(a, b.T).T, rtol=TOL_SOLVER, atol=TOL_SOLVER)
    assert info["iterations"] <= 60 and info["max_rel_residual"] <= 1e-12
    with pytest.warns(UserWarning, match="max_iter=2"):
        conjugate_gradient(lambda v: v @ a, b, tol=1e-12, max_iter=2)
    with pytest.raises(MethodError, match="not positive definite"):
        conjugate_gradient(lambda v: -(v @ a), b)


def test_conjugate_gradient_solves_rows_of_any_scale_and_zero_rows_in_float32():
    # a sample fitted to ~1e-20 loss has a ~1e-20 gradient: unscaled, p^T A p underflows to 0 in float32 and reads
    # as a non-positive curvature (seen on logistic regression, MNIST 5k)
    a, _ = _spd()
    a32 = a.float()
    b = torch.randn(4, 30, dtype=torch.float64)
    sizes = torch.tensor([1.0, 1e-22, 1e20, 0.0], dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: v @ a32, (b * sizes[:, None]).float(), tol=1e-5, max_iter=200)
    exact = torch.linalg.solve(a, b.T).T
    for row in range(3):
        torch.testing.assert_close(x[row].double() / sizes[row], exact[row], rtol=1e-3, atol=1e-3)
    assert torch.equal(x[3], torch.zeros(30)) and info["max_rel_residual"] <= 1e-5


def test_lissa_recursion_converges_to_the_damped_inverse_and_flags_divergence():
    a, values = _spd(low=0.5, high=5.0)
    b = torch.randn(3, 30, dtype=torch.float64)
    scale, damping = 4.0, 0.05  # effective damping 0.2; contraction max(|1 - 0.05 - 0.5/4|, |1 - 0.05 - 5/4|)
    forever = iter(lambda: (lambda v: v @ a), None)
    h = lissa_recursion(b, forever, depth=200, scale=scale, damping=damping)
    exact = torch.linalg.solve(a + scale * damping * torch.eye(30, dtype=a.dtype), b.T).T
    torch.testing.assert_close(h, exact, rtol=TOL_SOLVER, atol=TOL_SOLVER)
    with pytest.raises(MethodError, match="lissa diverged with scale=1.0"):
        lissa_recursion(b, forever, depth=100, scale=1.0, damping=0.0)  # 1 - 5/1 = -4: divergent


def test_arnoldi_full_rank_recovers_the_spectrum_and_partial_runs_find_the_top():
    a, values = _spd(p=20, low=-1.0, high=6.0)
    start = torch.randn(20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    basis, hess = arnoldi_iteration(lambda v: a @ v, start, n_iter=21)
    assert basis.shape == (21, 20) and hess.shape == (21, 20)
    torch.testing.assert_close(basis[:20] @ basis[:20].T, torch.eye(20, dtype=a.dtype), rtol=0, atol=1e-10)
    top, ritz = distill(basis, hess, top_k=20)
    torch.testing.assert_close(top, values.flip(0), rtol=TOL_SOLVER, atol=TOL_SOLVER)
    torch.testing.assert_close(ritz.T @ torch.diag(top) @ ritz, a, rtol=TOL_SOLVER, atol=TOL_SOLVER)
    # A gap-separated top eigenvalue is found by a short run.
    gapped = a + 20.0 * torch.outer(ritz[0], ritz[0])
    basis, hess = arnoldi_iteration(lambda v: gapped @ v, start, n_iter=8)
    top, _ = distill(basis, hess, top_k=1)
    assert abs(float(top[0]) - float(torch.linalg.eigvalsh(gapped)[-1])) < TOL_SOLVER


def test_arnoldi_stops_at_an_invariant_subspace():
    q, _ = torch.linalg.qr(torch.randn(15, 15, dtype=torch.float64))
    low_rank = q[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ q[:, :3].T
    start = q[:, :3].sum(1)  # lies in a 3-dim invariant subspace: the fourth vector vanishes
    basis, hess = arnoldi_iteration(lambda v: low_rank @ v, start, n_iter=10)
    assert basis.shape[0] == 4 and hess.shape == (4, 3) and float(basis[-1].abs().max()) == 0.0
    top, _ = distill(basis, hess, top_k=5)
    torch.testing.assert_close(top, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), rtol=1e-8, atol=1e-8)


def test_power_iteration_finds_the_largest_magnitude_eigenvalue():
    a, values = _spd(low=0.1, high=4.0)
    start = torch.ones(30, dtype=torch.float64)
    assert abs(top_eigenvalue(lambda v: a @ v, start, iters=200) - float(values[-1])) < 1e-3
