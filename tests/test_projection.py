"""Streamed gradient products and Gaussian projections against dense brute force: block-wise V equals the dense
V, seeds fix it, projections equal explicit gradients times V, chunk sizes do not matter, trajectory helpers
restore the model."""
import pytest
import torch
from conftest import TOL_EXACT

from gex.grads import per_sample_grads
from gex.params import num_params, params_vector
from gex.projection import (
    GaussianProjector,
    MatrixProjector,
    gradient_cross_products,
    gradient_self_products,
    project_gradients,
    project_trajectory,
    trajectory_weights,
    using_state,
)
from gex.train import clone_model

torch.set_flush_denormal(True)
N_SUB = 30          # samples scored in the brute-force comparisons
TOL_MOMENT = 0.02   # |mean| and |var - 1| of 200k N(0, 1) draws: std 0.002 and 0.003


@pytest.fixture(scope="module")
def sub64(tiny_task64):
    return tiny_task64.train.subset(torch.arange(N_SUB))


@pytest.fixture(scope="module")
def grads64(tiny_task64, sub64):
    """Explicit (N_SUB, P) per-sample gradients: the brute-force reference."""
    return per_sample_grads(tiny_task64.model, sub64.x, sub64.y, tiny_task64.loss)


def test_blocks_regenerated_from_seeds_equal_one_dense_matrix():
    p, d = 1000, 12
    whole = GaussianProjector(p, d, seed=3)
    one_row = GaussianProjector(p, d, seed=3, max_block_mb=p * 4 / 2**20)  # budget = exactly one float32 row
    assert whole.block_rows == d and one_row.block_rows == 1
    assert all(len(block) == 1 for _, block in one_row.blocks())
    torch.testing.assert_close(one_row.dense(), whole.dense(), rtol=0, atol=0)
    g = torch.randn(7, p, dtype=torch.float64)
    torch.testing.assert_close(one_row.project(g), g @ whole.dense().double().T, rtol=TOL_EXACT, atol=TOL_EXACT)
    three = GaussianProjector(p, d, seed=3, max_block_mb=3.5 * p * 4 / 2**20)
    assert three.block_rows == 3 and [s for s, _ in three.blocks()] == [0, 3, 6, 9]
    torch.testing.assert_close(three.project(g), one_row.project(g), rtol=TOL_EXACT, atol=TOL_EXACT)


def test_a_kept_matrix_is_reused_until_released_then_regenerated_identically():
    p, d = 500, 6
    proj = GaussianProjector(p, d, seed=4)  # the default budget holds all of V: kept between calls
    first = next(proj.blocks())[1]
    assert next(proj.blocks())[1] is first
    proj.release()
    again = next(proj.blocks())[1]
    assert again is not first and torch.equal(again, first)


def test_seed_fixes_the_matrix_and_entries_are_standard_normal():
    a, b, c = (GaussianProjector(1000, 200, seed=s).dense() for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A smaller d gives the leading rows of a larger one: row k depends on (seed, k) only.
    torch.testing.assert_close(GaussianProjector(1000, 7, seed=5).dense(), a[:7], rtol=0, atol=0)
    assert abs(float(a.mean())) < TOL_MOMENT and abs(float(a.var()) - 1) < TOL_MOMENT


def test_projector_misuse_is_a_one_line_error():
    with pytest.raises(ValueError, match="dim >= 1"):
        GaussianProjector(10, 0)
    with pytest.raises(ValueError, match="expects P=10"):
        GaussianProjector(10, 2).project(torch.zeros(3, 11))
    with pytest.raises(ValueError, match=r"\(d, P\) matrix"):
        MatrixProjector(torch.zeros(3))


def test_projected_gradients_equal_explicit_gradients_times_v_for_any_chunk(tiny_task64, sub64, grads64):
    proj = GaussianProjector(num_params(tiny_task64.model), 9, seed=1, dtype=torch.float64, max_block_mb=0.01)
    assert proj.block_rows < 9  # the memory-safe path is the one tested
    dense = grads64 @ proj.dense().T
    for chunk in (7, 64):
        got = project_gradients(tiny_task64.model, sub64, proj, tiny_task64.loss, chunk_size=chunk)
        torch.testing.assert_close(got, dense, rtol=TOL_EXACT, atol=TOL_EXACT)
    rows = torch.randn(4, num_params(tiny_task64.model), dtype=torch.float64)
    got = project_gradients(tiny_task64.model, sub64, MatrixProjector(rows), tiny_task64.loss, chunk_size=7)
    torch.testing.assert_close(got, grads64 @ rows.T, rtol=TOL_EXACT, atol=TOL_EXACT)
    with pytest.raises(ValueError, match="num_params=5"):
        project_gradients(tiny_task64.model, sub64, GaussianProjector(5, 2), tiny_task64.loss)


def test_streamed_products_equal_dense_products(tiny_task64, sub64, grads64):
    test = tiny_task64.test.subset(torch.arange(5))
    g_test = per_sample_grads(tiny_task64.model, test.x, test.y, tiny_task64.loss)
    m = torch.randn(grads64.shape[1], grads64.shape[1], dtype=torch.float64)
    transform = lambda g: g @ m.T  # noqa: E731  (row-wise map g -> M g)
    for chunk in (7, 64):
        self_ = gradient_self_products(tiny_task64.model, sub64, tiny_task64.loss, chunk, transform)
        torch.testing.assert_close(self_, torch.einsum("ip,qp,iq->i", grads64, m, grads64), rtol=TOL_EXACT,
                                   atol=TOL_EXACT)
        cross = gradient_cross_products(tiny_task64.model, sub64, test, tiny_task64.loss, chunk, transform)
        torch.testing.assert_close(cross, grads64 @ m @ g_test.T, rtol=TOL_EXACT, atol=TOL_EXACT)
    plain = gradient_self_products(tiny_task64.model, sub64, tiny_task64.loss, 7)
    torch.testing.assert_close(plain, grads64.pow(2).sum(1), rtol=TOL_EXACT, atol=TOL_EXACT)


def test_trajectory_projection_loads_each_state_and_restores_the_model(tiny_task64, sub64):
    model = clone_model(tiny_task64.model)
    before = params_vector(model).clone()
    states = [c.state for c in tiny_task64.trajectory[:2]]
    proj = GaussianProjector(num_params(model), 4, seed=0, dtype=torch.float64)
    got = project_trajectory(model, states, sub64, proj, tiny_task64.loss, chunk_size=7)
    assert got.shape == (2, N_SUB, 4)
    torch.testing.assert_close(params_vector(model), before, rtol=0, atol=0)
    for c, state in enumerate(states):
        fresh = tiny_task64.make_model().double()
        fresh.load_state_dict(state)
        fresh.eval()
        g = per_sample_grads(fresh, sub64.x, sub64.y, tiny_task64.loss)
        torch.testing.assert_close(got[c], g @ proj.dense().T, rtol=TOL_EXACT, atol=TOL_EXACT)
    with pytest.raises(RuntimeError):
        with using_state(model, {"nope": torch.zeros(1)}):
            pass
    torch.testing.assert_close(params_vector(model), before, rtol=0, atol=0)


def test_trajectory_weights():
    assert trajectory_weights([0.1, 0.3], "lr") == [0.1, 0.3]
    assert trajectory_weights([0.1, 0.3, 0.2, 0.0], "mean") == [0.25] * 4
    with pytest.raises(ValueError, match="valid choices: \\['lr', 'mean'\\]"):
        trajectory_weights([0.1], "sum")
    with pytest.raises(ValueError, match="task.trajectory is empty"):
        trajectory_weights([], "lr")
