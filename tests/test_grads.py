"""Per-sample gradients by per-layer hooks (gex.grads) against the vmap(grad) reference and a brute-force loop, the
fallback to vmap for what the hooks cannot handle, iter_grad_chunks' chunk-size and backend invariance, and one
smoke run of the speed benchmark (experiments.bench)."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TOL_EXACT
from hydra import compose, initialize_config_dir
from torch import nn

from experiments import bench
from experiments.scaffold import RunLogger
from gex import grads as grads_module
from gex.data import LabeledData
from gex.grads import (
    HookError,
    iter_grad_chunks,
    per_sample_grads,
    per_sample_grads_fast,
    per_sample_grads_hooks,
    resolve_backend,
    unsupported_modules,
)
from gex.losses import per_sample_loss
from gex.models import _BasicBlock, _conv_bn_relu, build_model
from gex.params import param_names

K = 5          # classes
B = 6          # samples per check
TOL_FLOAT32_GRADS = 1e-4   # hooks vs vmap in float32 (the bench's models): summation order only


class _Zoo(nn.Module):
    """Every branch of the layer rules: conv bias, asymmetric 'same' padding, groups, stride + dilation, 'valid'
    padding, both conv paths (im2col for few input columns, grouped convolution otherwise), BatchNorm1d on
    (b, C, L), a Linear on (b, L, d) inputs, and in-place ReLUs after hooked layers."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(2, 16, (2, 3), padding="same")                          # im2col
        self.wide = nn.Conv2d(16, 8, (2, 3), padding="same", groups=2)                 # grouped convolution
        self.grouped = nn.Conv2d(8, 4, 3, stride=2, dilation=2, padding=1, groups=2)   # im2col, 2 groups
        self.valid = nn.Conv2d(4, 3, 2, padding="valid", bias=False)
        self.bn2d = nn.BatchNorm2d(16)
        self.bn1d = nn.BatchNorm1d(3)
        self.token = nn.Linear(3, 2)
        self.head = nn.Linear(2 * 4, K)

    def forward(self, x):
        x = self.wide(torch.relu_(self.bn2d(self.same(x))))
        x = self.valid(torch.relu(self.grouped(x)))           # (b, 3, 2, 2)
        x = self.bn1d(x.flatten(2)).transpose(1, 2)            # (b, 4, 3)
        return self.head(torch.relu_(self.token(x)).flatten(1))


def _tiny_resnet() -> nn.Module:
    """The real ResNet block (gex.models) at toy width: a strided block with a conv shortcut, then a plain one."""
    return nn.Sequential(*_conv_bn_relu(3, 4), _BasicBlock(4, 8, 2, False), _BasicBlock(8, 8, 1, True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K))


MODELS = {
    "mlp": (lambda: build_model("mlp", (12,), K, hidden=8, depth=2), (12,)),
    "cnn_small": (lambda: build_model("cnn_small", (1, 8, 8), K, widths=(3, 4), hidden=8, pool_to=2), (1, 8, 8)),
    "vgg": (lambda: build_model("vgg", (3, 8, 8), K, widths=(2, 3, 4, 4)), (3, 8, 8)),
    "resnet": (_tiny_resnet, (3, 8, 8)),
    "zoo": (_Zoo, (2, 7, 7)),
}


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BN's rule is really exercised."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
    return model.eval()


def _setup(name: str, seed: int = 0):
    build, shape = MODELS[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _randomize_bn(build().double(), gen)
    x = torch.randn(B, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=gen)
    return model, x, y


def _loop_grads(model: nn.Module, x, y, loss: str) -> torch.Tensor:
    """Brute force: one autograd call per sample, ``(b, P)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        total = per_sample_loss(model(x[i:i + 1]), y[i:i + 1], loss).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)]))
    return torch.stack(rows)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hooks_equal_vmap_and_loop(name):
    """Both losses against vmap(grad) (the reference) and the per-sample loop."""
    model, x, y = _setup(name)
    assert resolve_backend(model) == "hooks", unsupported_modules(model)
    for loss in ("ce", "bce"):
        hooks = per_sample_grads_hooks(model, x, y, loss)
        torch.testing.assert_close(hooks, _loop_grads(model, x, y, loss), rtol=0, atol=TOL_EXACT)
        torch.testing.assert_close(hooks, per_sample_grads(model, x, y, loss), rtol=0, atol=TOL_EXACT)
        assert hooks.abs().max() > 1e-3  # not trivially zero


class _WithUnused(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body, self.unused = body, nn.Linear(3, 3).double()

    def forward(self, x):
        return self.body(x)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("name", ["zoo", "resnet"])
def test_both_conv_paths_equal_the_loop(name, monkeypatch):
    """Every conv layer through im2col, then every one through the grouped convolution."""
    model, x, y = _setup(name)
    ref = _loop_grads(model, x, y, "ce")
    for columns in (10**9, 0):
        monkeypatch.setattr(grads_module, "IM2COL_MAX_COLUMNS", columns)
        torch.testing.assert_close(per_sample_grads_hooks(model, x, y, "ce"), ref, rtol=0, atol=TOL_EXACT)


def test_hooks_skip_frozen_and_zero_unused():
    """Frozen parameters get no column (as vmap); a layer that never runs gets a zero gradient (as vmap)."""
    body, x, y = _setup("mlp")
    body[2].requires_grad_(False)           # the first BN: frozen
    model = _WithUnused(body)
    hooks = per_sample_grads_hooks(model, x, y, "ce")
    assert hooks.shape == (B, sum(p.numel() for p in model.parameters() if p.requires_grad))
    torch.testing.assert_close(hooks, per_sample_grads(model, x, y, "ce"), rtol=0, atol=TOL_EXACT)
    assert hooks[:, -12:].abs().max() == 0   # unused.weight, unused.bias (last in param_names order)


class _WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.out = nn.Linear(12, 6), nn.LayerNorm(6), nn.Linear(6, K)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.fc(x))))


class _Shared(nn.Module):
    """One Linear applied twice: the hooks would see two inputs for one weight."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(12, 12), nn.Linear(12, K)

    def forward(self, x):
        return self.out(self.fc(torch.tanh(self.fc(x))))


def test_unsupported_module_falls_back_to_vmap():
    model = _WithLayerNorm().double().eval()
    x, y = torch.randn(B, 12, dtype=torch.float64), torch.randint(0, K, (B,))
    assert unsupported_modules(model) == ["norm (LayerNorm)"]
    assert resolve_backend(model, "auto") == "vmap"
    torch.testing.assert_close(per_sample_grads_fast(model, x, y), per_sample_grads(model, x, y), rtol=0, atol=0)
    with pytest.raises(HookError, match=r"cannot handle norm \(LayerNorm\); use grad_backend='vmap'"):
        per_sample_grads_fast(model, x, y, backend="hooks")


def test_layer_called_twice_falls_back_at_run_time():
    model = _Shared().double().eval()
    x, y = torch.randn(B, 12, dtype=torch.float64), torch.randint(0, K, (B,))
    assert resolve_backend(model) == "hooks"        # statically nothing is wrong ...
    with pytest.raises(HookError, match="module 'fc' .* called twice"):
        per_sample_grads_hooks(model, x, y)           # ... the forward shows it
    torch.testing.assert_close(per_sample_grads_fast(model, x, y), _loop_grads(model, x, y, "ce"),
                               rtol=0, atol=TOL_EXACT)
    assert not model.fc._forward_hooks              # the hooks were removed despite the error


def test_shared_parameter_is_unsupported():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert unsupported_modules(model) == ["1.weight (shared with 0)"]


def test_bad_backend_is_one_line_error():
    model, _, _ = _setup("mlp")
    with pytest.raises(ValueError, match=r"grad_backend='fast' is unknown; valid choices: \['auto', 'hooks', 'vmap'\]"):
        resolve_backend(model, "fast")
    data = LabeledData(torch.zeros(3, 12, dtype=torch.float64), torch.zeros(3, dtype=torch.long),
                       torch.zeros(3, dtype=torch.long), K)
    with pytest.raises(ValueError, match="grad_backend='fast'"):
        next(iter_grad_chunks(model, data, grad_backend="fast"))


def test_iter_grad_chunks_invariant_to_chunk_size_and_backend():
    """Rows come back in data order and the gradients ignore the chunk size and the backend."""
    model, _, _ = _setup("cnn_small")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(23, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, K, (23,), generator=gen)
    data = LabeledData(x, y, y.clone(), K)
    runs = {}
    for chunk, backend in ((23, "vmap"), (5, "hooks"), (8, "auto")):
        parts = list(iter_grad_chunks(model, data, "ce", chunk, grad_backend=backend))
        assert len(parts) == -(-23 // chunk)
        assert torch.equal(torch.cat([r for r, _ in parts]), torch.arange(23))
        runs[(chunk, backend)] = torch.cat([g for _, g in parts])
    ref = runs[(23, "vmap")]
    assert ref.shape == (23, sum(p.numel() for p in model.parameters()))
    for grads in runs.values():
        torch.testing.assert_close(grads, ref, rtol=0, atol=TOL_EXACT)
    assert len(param_names(model)) == len(list(model.parameters()))


def test_bench_smoke_writes_its_record(tmp_path):
    """``experiments.bench`` on tiny settings (in one process): the tables, the plot and the metric names of docs/run_records.md."""
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    overrides = ["data=digits", "data.n_train=200", "data.n_test=50", "model=mlp", "model.options.hidden=16",
                 "model.options.depth=1", "train=smoke", f"paths.cache={tmp_path / 'cache'}", "bench.n_train=200",
                 "bench.sweep_methods=[grad_dot]",
                 "bench.sweep_n=[100,200]", "bench.repeats=1", "bench.grad_n=64", "bench.grad_chunk=32",
                 "bench.grad_paths=[hooks,vmap]", "bench.isolate=false", "bench.warmup=false",
                 "bench.member_batches=[1,2]", "bench.speed_members=2", "bench.speed_steps=4",
                 "bench.floor_n=100", "bench.methods=[loss,grad_dot,gex,not_a_method]",
                 "+bench.method_options.gex={num_members:2,ft_step:3,bn_batches:1,ft_batch_size:32}"]
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose("bench", overrides=overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = bench.run(cfg, run_dir, RunLogger(cfg, run_dir, "bench"))
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["task"] == "bench" and stored["wall_s"] > 0
    for name in ("loss", "grad_dot"):
        assert stored[f"{name}.wall_s"] > 0 and stored[f"{name}.samples_per_s"] > 0
        assert stored[f"{name}.peak_mem_mb"] > 0
    assert "not_a_method.wall_s" not in stored
    # GEX against its floor at bench.floor_n: the ratio of the medians, inside the range of the per-round ratios
    assert stored["gex.floor_n"] == 100 and stored["gex.floor_s"] > 0 and stored["gex.floor_bn_s"] > 0
    assert stored["gex.ratio_to_floor_min"] <= stored["gex.ratio_to_floor"] <= stored["gex.ratio_to_floor_max"] \
        or stored["gex.ratio_to_floor_min"] == stored["gex.ratio_to_floor_max"]
    assert stored["grad_dot.grad_forwards"] >= 1                       # the per-sample-gradient forwards
    assert stored["grads.vmap.ratio_to_hooks"] > 0 and stored["grads.hooks.ratio_to_hooks"] == 1
    for stem in ("bench_methods", "bench_grads", "bench_sweep", "bench_speed"):
        assert (run_dir / f"{stem}.csv").stat().st_size > 0 and (run_dir / f"{stem}.md").stat().st_size > 0
    sweep = pd.read_csv(run_dir / "bench_sweep.csv")
    assert sorted(sweep["n"]) == [100, 200] and set(sweep["method"]) == {"grad_dot"}
    assert (run_dir / "bench_sweep.png").stat().st_size > 0
    assert "Hardware and versions" in (run_dir / "bench.md").read_text()
    grads = pd.read_csv(run_dir / "bench_grads.csv")
    assert grads["max_abs_err"].max() < TOL_FLOAT32_GRADS
    assert metrics["loss.wall_s"] == stored["loss.wall_s"]
    speed = pd.read_csv(run_dir / "bench_speed.csv")
    assert list(speed["setting"]) == ["batch_members=1", "batch_members=2", "per member", "batched (2 per pass)",
                                      "plain", "channels_last", "compile"]
    assert (speed["wall_s"] > 0).all() and (speed["speedup"] > 0).all()
