"""Batched ensemble members (vmap over stacked members) against the sequential path, the batched member
evaluation against the per-member one, resume with batched groups, and the training loop's speed switches."""
import dataclasses

import pytest
import torch
from conftest import make_task

from gex.data import LabeledData
from gex.ensemble import EnsembleConfig, build_ensemble, run_cycle, run_cycles
from gex.evaluation import losses_for_states, losses_for_states_batched
from gex.method import GEX, GEXLin
from gex.models import build_model
from gex.runs import ArtifactCache
from gex.train import (
    TrainConfig,
    batch_stream,
    clone_model,
    regularize_and_clip,
    sgd_steps,
    snapshot,
    stack_states,
    stacked_sgd_steps,
)

# float64: vmap only reorders sums, so members agree to rounding after a few dozen steps (measured ~1e-15).
TOL_F64 = 1e-10
# float32 small CNN: vmap runs the k convolutions as one grouped convolution, whose sums are ordered differently;
# the relative gap after 10 steps measured ~1e-6 (1.3e-6 cosine, 6e-6 constant LR 0.5), and it grows slowly with
# steps through the chaotic SGD dynamics. 1e-4 leaves room for other CPU kernels.
TOL_F32 = 1e-4
SMALL = dict(ft_step=8, ft_lr=0.05, ft_batch_size=32, bn_batches=3)


@pytest.fixture(scope="module")
def cnn_task():
    """Digits, 200 train, a narrow BN CNN (conv, BN2d, max-pool, BN1d), float32: the grouped-conv path of vmap."""
    return make_task(model="cnn_small", n_train=200, n_test=40, options={"widths": [4, 8], "hidden": 16}, epochs=3)


def _rel_gap(a: dict, b: dict) -> float:
    """Largest |a - b| / max|a| over the float tensors; integer buffers must match exactly (else inf)."""
    gap = 0.0
    for key in a:
        if not a[key].is_floating_point():
            gap = gap if torch.equal(a[key], b[key]) else float("inf")
            continue
        scale = a[key].double().abs().max().clamp(min=1e-12)
        gap = max(gap, float((a[key].double() - b[key].double()).abs().max() / scale))
    return gap


def _bn_keys(state: dict) -> list[str]:
    return [k for k in state if "running_" in k or "num_batches" in k]


@pytest.mark.parametrize("kw", [dict(num_members=4, num_chains=2), dict(num_members=3, members="independent"),
                                dict(num_members=4, num_chains=2, ft_schedule="constant", ft_lr=0.5)])
def test_batched_members_equal_sequential_float64(tiny_task64, kw):
    cfg = EnsembleConfig(**SMALL | kw)
    sequential = list(build_ensemble(tiny_task64, cfg))
    batched = list(build_ensemble(tiny_task64, dataclasses.replace(cfg, batch_members=4)))
    for a, b in zip(sequential, batched, strict=True):
        assert a.keys() == b.keys() and _bn_keys(a)                          # BN buffers are compared too
        assert _rel_gap(a, b) < TOL_F64
        assert _rel_gap({k: a[k] for k in _bn_keys(a)}, {k: b[k] for k in _bn_keys(b)}) < TOL_F64
    assert _rel_gap(sequential[0], sequential[1]) > 1e-3                     # members differ from each other


@pytest.mark.parametrize("kw", [dict(num_members=4, num_chains=2), dict(num_members=3, members="independent")])
def test_batched_members_equal_sequential_float32_cnn(cnn_task, kw):
    cfg = EnsembleConfig(**SMALL | kw)
    sequential = list(build_ensemble(cnn_task, cfg))
    batched = list(build_ensemble(cnn_task, dataclasses.replace(cfg, batch_members=2)))
    for a, b in zip(sequential, batched, strict=True):
        assert _rel_gap(a, b) < TOL_F32
        assert all(torch.equal(a[k], b[k]) for k in a if "num_batches" in k)


def test_each_batched_member_sees_its_own_stream(tiny_task64):
    """Member i of a group gets exactly the batches (rows and augmented inputs) it gets alone, step by step."""
    task, cfg = tiny_task64, EnsembleConfig(**SMALL | dict(num_members=3, members="independent"))
    theta = snapshot(task.model)
    alone = {i: [] for i in range(3)}
    for i in range(3):
        run_cycle(task, cfg, theta, i, on_step=lambda step, batch, logits, lr, i=i: alone[i].append((step, batch)))
    calls = []
    run_cycles(task, cfg, [theta] * 3, [0, 1, 2], on_step=lambda step, batch, logits, lr: calls.append((step, batch)))
    assert [s for s, _ in calls] == [s for s in range(cfg.ft_step) for _ in range(3)]  # interleaved by step
    for i in range(3):
        mine = calls[i::3]
        assert all(torch.equal(a.rows, b.rows) and torch.equal(a.x, b.x) for (_, a), (_, b) in zip(mine, alone[i]))
    assert not torch.equal(calls[0][1].rows, calls[1][1].rows)


def test_per_member_clipping_matches_clip_grad_norm():
    """Stacked clipping clips each member's own global norm, as ``clip_grad_norm_`` does for one model."""
    cfg = TrainConfig(schedule="constant", clip_norm=1.0, weight_decay=0.1, epochs=1)
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,)]
    members = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(2)]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes] for scale in (10.0, 0.01)]
    expected = []
    for params, g in zip(members, grads):
        params = [p.clone().requires_grad_() for p in params]
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        regularize_and_clip(params, cfg)
        expected.append([p.grad for p in params])
    stacked = [torch.stack([m[j] for m in members]).requires_grad_() for j in range(len(shapes))]
    for j, p in enumerate(stacked):
        p.grad = torch.stack([g[j] for g in grads])
    regularize_and_clip(stacked, cfg, stacked=True)
    for j, p in enumerate(stacked):
        for m in range(2):
            assert torch.allclose(p.grad[m], expected[m][j], rtol=0, atol=TOL_F64)
    assert torch.stack([p.grad[0].norm() for p in stacked]).norm() == pytest.approx(1.0, abs=1e-5)  # clipped
    assert torch.allclose(stacked[0].grad[1], grads[1][0] + 0.1 * members[1][0], atol=TOL_F64)     # not clipped


def test_resume_with_batch_members_reuses_cached_members(tiny_task64, tmp_path):
    cfg = EnsembleConfig(**SMALL | dict(num_members=4, num_chains=2, batch_members=2))
    reference = list(build_ensemble(tiny_task64, cfg))
    task = dataclasses.replace(tiny_task64, cache=ArtifactCache(tmp_path), cache_spec={"pretrain": "tiny64"})
    calls = [0]

    def crash(*_):  # killed during the second round (members 2 and 3, trained together)
        calls[0] += 1
        if calls[0] == 2 * cfg.ft_step + 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_ensemble(task, cfg, on_step=crash)
    assert sorted(p.name for p in tmp_path.glob("ensemble/*/member_*.pt")) == ["member_0.pt", "member_1.pt"]
    count = lambda *_: calls.__setitem__(0, calls[0] + 1)
    calls[0] = 0
    resumed = list(build_ensemble(task, cfg, on_step=count))
    assert calls[0] == 2 * cfg.ft_step                                  # only the unfinished round, both members
    assert all(_rel_gap(a, b) == 0.0 for a, b in zip(reference, resumed, strict=True))
    calls[0] = 0
    sequential = build_ensemble(task, dataclasses.replace(cfg, batch_members=1), on_step=count)
    assert calls[0] == 0 and len(sequential) == 4                      # batch_members is not in the cache key


def test_batched_eval_equals_per_member_eval(tiny_task64):
    cfg = dict(num_members=3, ft_step=8, ft_batch_size=32, bn_batches=3)
    per_member = GEX(**cfg).fit(tiny_task64)
    batched = GEX(**cfg, eval_batched=True, eval_members=2).fit(tiny_task64)  # passes of 2 + 1 members
    before = snapshot(tiny_task64.model)
    for data in (tiny_task64.train, tiny_task64.test):
        a, b = per_member.member_losses(data), batched.member_losses(data)
        assert b.shape == (len(data), 3) and torch.allclose(a, b, rtol=0, atol=TOL_F64 * a.abs().max())
    assert torch.allclose(per_member.self_influence(tiny_task64.train), batched.self_influence(tiny_task64.train),
                          rtol=1e-6, atol=0)
    assert _rel_gap(before, snapshot(tiny_task64.model)) == 0.0          # the container model is untouched


def test_batched_eval_float32_cnn(cnn_task):
    states = list(build_ensemble(cnn_task, EnsembleConfig(**SMALL | dict(num_members=3))))
    a = losses_for_states(cnn_task.model, states, cnn_task.train, batch_size=64)
    b = losses_for_states_batched(cnn_task.model, states, cnn_task.train, batch_size=64, members_per_pass=3)
    assert torch.allclose(a, b, rtol=TOL_F32, atol=TOL_F32 * a.abs().max())


def _image_stream(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 1, 8, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (96,), generator=gen)
    return batch_stream(LabeledData(x, y, y.clone(), 10), 32, False, torch.Generator().manual_seed(1), "cpu")


def _trained(model, cfg, steps=6, hook=None):
    model = clone_model(model)
    if hook is not None:
        model.register_forward_pre_hook(hook)
    sgd_steps(model, _image_stream(next(model.parameters()).dtype), steps, cfg)
    return model


def test_channels_last_gives_the_same_model():
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model("cnn_small", (1, 8, 8), 10, seed=0, widths=(4, 8), hidden=16)
    finally:
        torch.set_default_dtype(torch.float32)
    cfg = TrainConfig(lr=0.05, epochs=1, bn_batches=1)
    plain = _trained(model, cfg)
    layouts = []
    fast = _trained(model, dataclasses.replace(cfg, channels_last=True),
                    hook=lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    assert layouts and all(layouts)                                     # the switch took effect
    assert _rel_gap(snapshot(plain), snapshot(fast)) < TOL_F64
    assert all(p.is_contiguous() for p in fast.parameters())            # the usual layout is restored afterwards


def test_compile_gives_the_same_model(monkeypatch):
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=16, depth=1)
    cfg = TrainConfig(lr=0.05, epochs=1, bn_batches=1)
    plain = _trained(model, cfg)
    compiles, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiles.append(m) or real_compile(m, **kw))
    compiled = _trained(model, dataclasses.replace(cfg, compile=True))
    assert len(compiles) == 1                                           # the switch took effect
    assert _rel_gap(snapshot(plain), snapshot(compiled)) < TOL_F32  # inductor may fuse and reorder float32 sums


def test_bf16_autocast_is_refused_on_cpu():
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=16, depth=1)
    with pytest.raises(ValueError, match=r"train.amp_bf16=True needs a CUDA device \(got cpu\)"):
        _trained(model, TrainConfig(epochs=1, amp_bf16=True))


def test_stacked_path_refuses_layout_and_compile_switches(tiny_task64):
    model = clone_model(tiny_task64.model)
    stacked = stack_states(model, [snapshot(model)] * 2, torch.device("cpu"))
    for key in ("channels_last", "compile"):
        with pytest.raises(ValueError, match=rf"train.{key}=True is not supported for models stacked under vmap"):
            stacked_sgd_steps(model, stacked, [], 1, TrainConfig(epochs=1, **{key: True}))


def test_speed_switches_stay_out_of_old_cache_keys():
    from dataclasses import asdict
    cfg = TrainConfig()
    assert cfg.cache_spec() == {k: v for k, v in asdict(cfg).items()
                                if k not in ("channels_last", "amp_bf16", "compile")}
    assert TrainConfig(compile=True).cache_spec()["compile"] is True


@pytest.mark.parametrize("build,match", [
    (lambda: TrainConfig(channels_last="yes"), r"train.channels_last='yes' is invalid; valid choices: \[False, True\]"),
    (lambda: TrainConfig(compile=1), r"train.compile=1 is invalid"),
    (lambda: EnsembleConfig(batch_members=0), r"batch_members=0 is invalid; it must be a positive integer"),
    (lambda: GEX(eval_members=0), r"eval_members=0 is invalid; it must be a positive integer"),
    (lambda: GEX(eval_batched="true"), r"eval_batched='true' is invalid; valid choices"),
    (lambda: GEXLin(eval_batched=True), r"eval_batched=True does not apply to GEXLin"),
    (lambda: losses_for_states_batched(None, [], None, members_per_pass=0), r"members_per_pass=0 is invalid")])
def test_bad_switches_are_one_line_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()
