"""K-FAC primitives (gex.kfac) against brute force: factors from explicit per-sample inputs and output gradients
(explicit patch loops for convs), the diagonal BN Fisher, the EMA, the eigenvalue correction and the hooks'
per-sample gradients against vmap."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL_EXACT
from torch import nn

from gex.attribution import MethodError
from gex.data import Batch
from gex.grads import per_sample_grads
from gex.kfac import (
    KFACFactors,
    block_grads,
    compute_factors,
    eigendecompose,
    eigenvalue_correction,
    layer_map,
    layer_signals,
    param_grads,
    pseudo_grads,
    rotate,
    rotated_block_grads,
)
from gex.models import build_model
from gex.params import param_names

TOL_MC = 0.06  # relative Frobenius error of a 500-draw MC Fisher factor vs the exact expectation (measured <= 0.026)


def _batches(x, y, sizes):
    out, start = [], 0
    for b in sizes:
        out.append(Batch(rows=torch.arange(start, start + b), x=x[start:start + b], y=y[start:start + b],
                         targets=None, weights=None))
        start += b
    return out


def _label_weights(logits, y, fisher):
    """(K,) weight of each label in the curvature: 1 on the label trained on, or the predictive probability."""
    if fisher == "empirical":
        return F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return logits.softmax(-1)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def mlp64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    return model, torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))


def _brute_mlp(model, x, y, fisher):
    """A and G of both layers from explicit per-sample inputs and output gradients, label by label."""
    lin1, lin2 = model[0], model[2]
    A = [torch.zeros(6, 6, dtype=x.dtype), torch.zeros(5, 5, dtype=x.dtype)]
    G = [torch.zeros(4, 4, dtype=x.dtype), torch.zeros(3, 3, dtype=x.dtype)]
    for xi, yi in zip(x, y):
        a1 = torch.cat([xi, xi.new_ones(1)])
        z1 = lin1(xi)
        a2 = torch.cat([torch.tanh(z1), xi.new_ones(1)])
        z2 = lin2(torch.tanh(z1))
        A[0] += torch.outer(a1, a1).detach() / len(x)
        A[1] += torch.outer(a2, a2).detach() / len(x)
        for k, w in enumerate(_label_weights(z2.detach(), yi, fisher)):
            g1, g2 = torch.autograd.grad(F.cross_entropy(z2, torch.tensor(k)), [z1, z2], retain_graph=True)
            G[0] += w * torch.outer(g1, g1) / len(x)
            G[1] += w * torch.outer(g2, g2) / len(x)
    return A, G


@pytest.mark.parametrize("fisher", ["empirical", "ggn"])
def test_linear_factors_equal_brute_force(mlp64, fisher):
    model, x, y = mlp64
    layers = layer_map(model)
    factors = compute_factors(model, layers, _batches(x, y, [5, 4]), "ce", fisher)
    A, G = _brute_mlp(model, x, y, fisher)
    for j, name in enumerate(["0", "2"]):
        torch.testing.assert_close(factors.A[name], A[j], rtol=0, atol=TOL_EXACT)
        torch.testing.assert_close(factors.G[name], G[j], rtol=0, atol=TOL_EXACT)
    assert factors.n_seen == 9


def _patches(x, conv):
    """(T, C*kh*kw) patches of one sample by explicit loops over output positions (F.unfold's order)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    oh = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            rows.append(torch.stack([xp[c, i * sh + u * dh, j * sw + v * dw] for c in range(x.shape[0])
                                     for u in range(kh) for v in range(kw)]))
    return torch.stack(rows)


@pytest.fixture
def conv64():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                          nn.Conv2d(3, 2, 2, stride=2, bias=False), nn.Flatten(), nn.Linear(8, 3)).double()
    bn = model[1]
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.normal_(), bn.bias.data.normal_()
    return model.eval(), torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))


def _brute_conv(model, x, y, fisher):
    conv1, bn, conv2, lin = model[0], model[1], model[3], model[5]
    n, out = len(x), {}
    acc = lambda key, value: out.__setitem__(key, out.get(key, 0) + value / n)  # noqa: E731
    for xi, yi in zip(x, y):
        p1 = torch.cat([_patches(xi, conv1), xi.new_ones(16, 1)], 1)
        z1 = conv1(xi[None])
        h = torch.relu(bn(z1))
        p2 = _patches(h[0].detach(), conv2)
        z2 = conv2(h)
        z3 = lin(z2.flatten(1))
        acc("A:0", p1.T @ p1), acc("A:3", p2.T @ p2)
        a3 = torch.cat([z2.flatten().detach(), xi.new_ones(1)])
        acc("A:5", torch.outer(a3, a3))
        for k, w in enumerate(_label_weights(z3[0].detach(), yi, fisher)):
            grads = torch.autograd.grad(F.cross_entropy(z3, torch.tensor([k])), [z1, z2, z3, bn.weight, bn.bias],
                                        retain_graph=True)
            g1, g2 = grads[0][0].flatten(1).T, grads[1][0].flatten(1).T  # (T, C_out)
            acc("G:0", w * g1.T @ g1 / len(g1)), acc("G:3", w * g2.T @ g2 / len(g2))
            acc("G:5", w * torch.outer(grads[2][0], grads[2][0]))
            acc("D:1.weight", w * grads[3] ** 2), acc("D:1.bias", w * grads[4] ** 2)
    return out


@pytest.mark.parametrize("fisher", ["empirical", "ggn"])
def test_conv_factors_and_bn_diagonal_equal_brute_force(conv64, fisher):
    model, x, y = conv64
    layers = layer_map(model)
    assert list(layers.kron) == ["0", "3", "5"] and list(layers.diag) == ["1"]
    factors = compute_factors(model, layers, _batches(x, y, [4, 2]), "ce", fisher)
    brute = _brute_conv(model, x, y, fisher)
    got = {f"A:{k}": v for k, v in factors.A.items()} | {f"G:{k}": v for k, v in factors.G.items()} \
        | {f"D:{k}": v for k, v in factors.diag.items()}
    assert set(got) == set(brute)
    for key, value in brute.items():
        torch.testing.assert_close(got[key], value.detach(), rtol=0, atol=TOL_EXACT, msg=key)


def test_mc_fisher_converges_to_the_expectation(mlp64):
    model, x, y = mlp64
    layers = layer_map(model)
    exact = compute_factors(model, layers, _batches(x, y, [9]), "ce", "ggn")
    mc = compute_factors(model, layers, _batches(x, y, [9]), "ce", "mc", mc_samples=500,
                         generator=torch.Generator().manual_seed(0))
    for name in exact.G:
        assert _rel(mc.G[name], exact.G[name]) < TOL_MC
    torch.testing.assert_close(mc.A["0"], exact.A["0"], rtol=0, atol=TOL_EXACT)  # inputs do not depend on labels


def test_bce_pseudo_grads_match_the_bce_hessian():
    logits = torch.randn(4, 3, dtype=torch.float64)
    v = pseudo_grads(logits, torch.zeros(4, dtype=torch.long), "bce", "ggn")  # (K, b, K)
    hess = torch.einsum("kbi,kbj->bij", v, v)
    s = logits.sigmoid()
    torch.testing.assert_close(hess, torch.diag_embed(s * (1 - s)), rtol=0, atol=TOL_EXACT)


def test_ema_is_kfac_jax_normalized_average(mlp64):
    model, x, y = mlp64
    layers = layer_map(model)
    decay, sizes = 0.5, [3, 3, 3]
    ema = compute_factors(model, layers, _batches(x, y, sizes), "ce", "empirical", ema_decay=decay)
    per_batch = [compute_factors(model, layers, [b], "ce", "empirical") for b in _batches(x, y, sizes)]
    weights = torch.tensor([decay ** 2, decay, 1.0], dtype=torch.float64)
    expected = sum(w * f.G["2"] for w, f in zip(weights, per_batch)) / weights.sum()
    torch.testing.assert_close(ema.G["2"], expected, rtol=0, atol=TOL_EXACT)


def test_eigen_and_correction_equal_brute_force(mlp64):
    model, x, y = mlp64
    layers = layer_map(model)
    factors = eigendecompose(compute_factors(model, layers, _batches(x, y, [9]), "ce", "empirical"))
    q_a, s_a, q_g, s_g = factors.eig["2"]
    torch.testing.assert_close(q_a @ torch.diag(s_a) @ q_a.T, factors.A["2"], rtol=0, atol=TOL_EXACT)
    eigenvalue_correction(model, layers, factors, _batches(x, y, [4, 5]), "ce", "empirical")
    grads = per_sample_grads(model, x, y, "ce")               # vmap reference, (n, P)
    w = torch.cat([grads[:, 24:36].reshape(9, 3, 4), grads[:, 36:39].reshape(9, 3, 1)], dim=2)  # layer "2"
    expected = (q_g.T @ w @ q_a).pow(2).mean(0)
    torch.testing.assert_close(factors.lam["2"], expected, rtol=0, atol=TOL_EXACT)
    back = KFACFactors.from_state(factors.state())
    torch.testing.assert_close(back.lam["2"], factors.lam["2"], rtol=0, atol=0)
    torch.testing.assert_close(back.eig["2"][3], s_g, rtol=0, atol=0)


@pytest.mark.parametrize("name,shape,options", [("mlp", (3, 4, 4), {"hidden": 5, "depth": 2}),
                                                ("cnn_small", (1, 8, 8), {"widths": (3, 4), "hidden": 6, "pool_to": 2})])
def test_hook_gradients_equal_vmap(name, shape, options):
    """Per-sample gradients from the hooks (BN with in-place ReLU after it included) equal vmap(grad)."""
    model = build_model(name, shape, 4, seed=0, **options).double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0), m.weight.data.normal_()
    model.eval()
    x, y = torch.randn(7, *shape, dtype=torch.float64), torch.randint(0, 4, (7,))
    layers = layer_map(model)
    (kron, diag), = layer_signals(model, layers, x, y, "ce")
    grads = param_grads(layers, kron, diag)
    mine = torch.cat([grads[n].reshape(7, -1) for n in param_names(model)], dim=1)
    torch.testing.assert_close(mine, per_sample_grads(model, x, y, "ce"), rtol=0, atol=TOL_EXACT)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(3, 2), nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.lin(x) * self.scale


@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Conv1d(2, 2, 1), nn.Flatten(), nn.Linear(2, 2)), "Conv1d"),
    (nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten(), nn.Linear(2, 2)), "'0' \\(Conv2d\\)"),
    (nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)), "BatchNorm1d"),
    (nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), "LayerNorm"),
    (_Scaled(), "<root>"),
    (nn.Sequential(nn.BatchNorm1d(2)), "no Linear or Conv2d"),
])
def test_unsupported_layers_fail_with_one_line(model, match):
    with pytest.raises(MethodError, match=match):
        layer_map(model, "la_kfac")


def test_shared_module_fails():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    layers = layer_map(model)
    with pytest.raises(MethodError, match="more than once"):
        next(layer_signals(model, layers, torch.randn(3, 2), torch.zeros(3, dtype=torch.long), "ce"))


def test_unknown_fisher_fails():
    with pytest.raises(MethodError, match="fisher='fim'.*valid choices"):
        pseudo_grads(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "ce", "fim")


@pytest.mark.parametrize("t, d_in, d_out", [(1, 40, 30), (100, 5, 4)])  # signals rotated first; gradients first
def test_rotated_block_grads_equal_the_rotated_block_gradient_in_either_order(t, d_in, d_out):
    gen = torch.Generator().manual_seed(0)
    a, g = (torch.randn(3, t, d, generator=gen, dtype=torch.float64) for d in (d_in, d_out))
    q_a, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))
    q_g, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))
    eig = (q_a, torch.ones(d_in), q_g, torch.ones(d_out))
    torch.testing.assert_close(rotated_block_grads(eig, a, g), rotate(eig, block_grads(a, g)),
                               rtol=TOL_EXACT, atol=TOL_EXACT)
