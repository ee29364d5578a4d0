"""The speed-ups of issue 6 change how, not what: reverse-over-reverse Hessian products (if_cg's default, as
dattri's CG) equal forward-over-reverse ones and the foundation ``hvp``; TRAK's kernel from the Gram matrix's eigh
equals the SVD's (and falls back to the SVD where the Gram would lose accuracy); the Gaussian projector's rows are
still the per-row seeded draws of a fresh generator."""
import pytest
import torch
from conftest import TOL_EXACT

import baselines  # noqa: F401  (registers the methods)
import baselines.trak as trak_module
from gex.attribution import MethodError, build_method
from gex.ihvp import HVP_MODES, curvature_block, curvature_matvec, hvp
from gex.params import num_params
from gex.projection import _SEED_STRIDE, GaussianProjector

N_SUB = 40            # train samples of the product checks (tiny_task64: P ~ 470, float64)
TOL_TOL_GRAM_SPECTRUM = 1e-10  # relative error of the Gram route's kernel at cond(Phi) ~ 10 (bound ~ eps * cond^2)


@pytest.fixture(scope="module")
def sub64(tiny_task64):
    return tiny_task64.train.subset(torch.arange(N_SUB))


def test_rev_rev_products_equal_fwd_rev_and_the_foundation_hvp(tiny_task64, sub64):
    model = tiny_task64.model
    vecs = torch.randn(3, num_params(model), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    brute = torch.stack([hvp(model, sub64, v, "ce") for v in vecs])
    for mode in HVP_MODES:
        ours = curvature_matvec(model, sub64, "ce", batch_size=16, vec_chunk=2, mode=mode)(vecs)
        torch.testing.assert_close(ours, brute, rtol=TOL_EXACT, atol=TOL_EXACT)
        with torch.no_grad():  # functorch transforms ignore an outer no_grad (the scoring loops run under one)
            block = curvature_block(model, sub64.x, sub64.y, vecs, mode=mode)
        torch.testing.assert_close(block, brute, rtol=TOL_EXACT, atol=TOL_EXACT)
    with pytest.raises(MethodError, match=r"mode='rev' is unknown; valid choices: \['fwd-rev', 'rev-rev'\]"):
        curvature_matvec(model, sub64, mode="rev")


def test_if_cg_scores_do_not_depend_on_the_hvp_mode(tiny_task64, sub64):
    kw = {"damping": 1.0, "tol": 1e-10, "max_iter": 300}
    test = tiny_task64.test.subset(torch.arange(5))
    runs = {m: build_method("if_cg", hvp_mode=m, **kw).fit(tiny_task64) for m in HVP_MODES}
    self_scores = {m: r.self_influence(sub64) for m, r in runs.items()}
    torch.testing.assert_close(self_scores["rev-rev"], self_scores["fwd-rev"], rtol=TOL_EXACT, atol=TOL_EXACT)
    torch.testing.assert_close(runs["rev-rev"].influence(sub64, test), runs["fwd-rev"].influence(sub64, test),
                               rtol=TOL_EXACT, atol=TOL_EXACT)
    with pytest.raises(MethodError, match=r"if_cg.hvp_mode='fast' is unknown; valid choices: \['fwd-rev', 'rev-rev'\]"):
        build_method("if_cg", hvp_mode="fast")


@pytest.mark.parametrize("batch_size", [32, None])   # seeded mini-batches, and the full-set Neumann series
def test_lissa_scores_do_not_depend_on_the_hvp_mode(tiny_task64, sub64, batch_size):
    kw = {"depth": 20, "scale": 50.0, "damping": 0.01, "batch_size": batch_size}
    scores = {m: build_method("lissa", hvp_mode=m, **kw).fit(tiny_task64).self_influence(sub64) for m in HVP_MODES}
    torch.testing.assert_close(scores["rev-rev"], scores["fwd-rev"], rtol=TOL_EXACT, atol=TOL_EXACT)
    with pytest.raises(MethodError, match=r"lissa.hvp_mode='fast' is unknown"):
        build_method("lissa", hvp_mode="fast")


def _kernel_matrix(s, w):
    return (w / s.pow(2)) @ w.T


@pytest.mark.parametrize("shape", [(30, 80), (80, 30)])
def test_gram_spectrum_gives_the_svd_kernel(shape):
    phi = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s, w = trak_module.spectrum(phi)
    _, s_ref, wt_ref = torch.linalg.svd(phi, full_matrices=False)
    assert s.shape == s_ref.shape and w.shape == (shape[1], min(shape))
    torch.testing.assert_close(s.sort().values, s_ref.sort().values, rtol=TOL_TOL_GRAM_SPECTRUM, atol=0)
    ref = _kernel_matrix(s_ref, wt_ref.T)
    assert float((_kernel_matrix(s, w) - ref).norm() / ref.norm()) < TOL_TOL_GRAM_SPECTRUM
    torch.testing.assert_close(w.T @ w, torch.eye(min(shape), dtype=phi.dtype), rtol=0, atol=TOL_TOL_GRAM_SPECTRUM)


def test_spectrum_falls_back_to_the_svd_when_the_gram_loses_accuracy():
    phi = torch.randn(20, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    phi[1] = phi[0]                                  # rank-deficient: the Gram's smallest eigenvalue is round-off
    _, s_ref, wt_ref = torch.linalg.svd(phi, full_matrices=False)
    s, w = trak_module.spectrum(phi)
    assert torch.equal(s, s_ref) and torch.equal(w, wt_ref.T)
    ref = torch.linalg.svd(phi[2:], full_matrices=False).S
    assert torch.equal(trak_module.spectrum(phi[2:], max_cond=1.0)[0], ref)  # full rank, over the allowed cond
    assert torch.equal(trak_module.spectrum(phi[2:], gram=False)[0], ref)
    assert not torch.equal(trak_module.spectrum(phi[2:])[0], ref)          # the Gram route otherwise


@pytest.mark.parametrize("proj_dim,damping", [(32, 0.0), (32, 0.1), (256, 0.0), (256, 0.1)])  # N = 120
def test_trak_scores_equal_those_of_the_svd_kernel(tiny_task64, monkeypatch, proj_dim, damping):
    kw = {"num_checkpoints": 2, "proj_dim": proj_dim, "damping": damping}
    fast = build_method("trak", **kw).fit(tiny_task64)
    original = trak_module.spectrum
    monkeypatch.setattr(trak_module, "spectrum", lambda phi, gram=True: original(phi, gram=False))
    ref = build_method("trak", **kw).fit(tiny_task64)
    train, test = tiny_task64.train, tiny_task64.test
    torch.testing.assert_close(fast.self_influence(train), ref.self_influence(train), rtol=TOL_TOL_GRAM_SPECTRUM, atol=0)
    torch.testing.assert_close(fast.influence(train, test), ref.influence(train, test), rtol=1e-8, atol=TOL_EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projector_rows_are_the_per_row_seeded_draws(dtype):
    projector = GaussianProjector(num_params=37, dim=9, seed=5, dtype=dtype)
    expected = torch.stack([torch.randn(37, dtype=dtype, generator=torch.Generator().manual_seed(
        (5 * _SEED_STRIDE + k) % 2**63)) for k in range(9)])
    assert torch.equal(projector.rows(0, 9), expected)
    assert torch.equal(projector.rows(4, 7), expected[4:7])
