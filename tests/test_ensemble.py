"""The geometric ensemble: step count, cycle semantics, chain / independent / num_chains wiring, determinism,
cache reuse and resume."""
import dataclasses
import itertools
import logging

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from gex.ensemble import (
    CONSTANT_CLIP_NORM,
    EnsembleConfig,
    build_ensemble,
    cycle_recipe,
    member_start,
    run_cycle,
)
from gex.runs import ArtifactCache
from gex.train import lr_at, snapshot

SMALL = dict(num_members=3, ft_step=6, ft_lr=0.05, ft_batch_size=32, bn_batches=2)


@pytest.fixture
def steps():
    """Counts every optimizer step taken while the test runs (a global post-step hook)."""
    count = [0]
    handle = register_optimizer_step_post_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    yield count
    handle.remove()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cached(task, root, spec=None):
    return dataclasses.replace(task, cache=ArtifactCache(root), cache_spec=spec or {"pretrain": "digits-test"})


@pytest.mark.parametrize("num_members,num_chains,members", [(3, 1, "chain"), (3, 2, "chain"), (4, 3, "chain"),
                                                            (3, 1, "independent")])
def test_exactly_m_times_ft_step_optimizer_steps(digits_task, steps, num_members, num_chains, members):
    cfg = EnsembleConfig(**SMALL | dict(num_members=num_members, num_chains=num_chains, members=members))
    ensemble = build_ensemble(digits_task, cfg)
    assert len(ensemble) == num_members and len(list(ensemble)) == num_members
    assert steps[0] == num_members * cfg.ft_step


def test_cycle_trains_on_the_noisy_augmented_stream_with_a_cosine_schedule(digits_task):
    task, seen = digits_task, []
    cfg = EnsembleConfig(**SMALL)
    theta = snapshot(task.model)
    run_cycle(task, cfg, theta, 0, on_step=lambda step, batch, logits, lr: seen.append((batch, lr)))
    lrs = [lr for _, lr in seen]
    assert len(seen) == cfg.ft_step and lrs[0] == pytest.approx(cfg.ft_lr)  # no warmup
    assert all(a > b for a, b in itertools.pairwise(lrs)) and lrs[-1] < 0.1 * cfg.ft_lr
    assert all(torch.equal(b.y, task.train.y[b.rows]) for b, _ in seen)     # the labels trained on (noisy)
    assert any(not torch.equal(b.x, task.train.x[b.rows]) for b, _ in seen)  # augmented
    assert _same(snapshot(task.model), theta)                                # theta* untouched
    seen.clear()
    run_cycle(task, dataclasses.replace(cfg, ft_augment=False), theta, 0,
              on_step=lambda step, batch, logits, lr: seen.append((batch, lr)))
    assert all(torch.equal(b.x, task.train.x[b.rows]) for b, _ in seen)


def test_cycle_recipes():
    cosine = cycle_recipe(EnsembleConfig(ft_step=100, ft_lr=0.05), "bce")
    assert cosine.steps == 100 and cosine.warmup_frac == 0 and cosine.clip_norm is None and cosine.loss == "bce"
    assert lr_at(50, 100, cosine) == pytest.approx(0.025) and lr_at(99, 100, cosine) < 1e-4
    constant = cycle_recipe(EnsembleConfig(ft_schedule="constant", ft_lr=0.01), "ce")
    assert constant.schedule == "constant" and constant.clip_norm == CONSTANT_CLIP_NORM == 1.0
    assert constant.weight_decay == 5e-4 and constant.momentum == 0.9


def test_chain_member_continues_the_previous_member(digits_task):
    cfg = EnsembleConfig(**SMALL)
    ensemble = build_ensemble(digits_task, cfg)
    theta = snapshot(digits_task.model)
    assert _same(ensemble[0], run_cycle(digits_task, cfg, theta, 0))
    for k in range(2):
        assert _same(ensemble[k + 1], run_cycle(digits_task, cfg, ensemble[k], k + 1))
    assert not _same(ensemble[2], run_cycle(digits_task, cfg, theta, 2))  # not restarted from theta*


def test_num_chains_interleave_members_of_parallel_chains(digits_task):
    cfg = EnsembleConfig(**SMALL | dict(num_members=5, num_chains=2))
    assert [member_start(cfg, i) for i in range(5)] == [None, None, 0, 1, 2]
    ensemble = build_ensemble(digits_task, cfg)
    theta = snapshot(digits_task.model)
    assert _same(ensemble[1], run_cycle(digits_task, cfg, theta, 1))   # chain 1 starts at theta*
    assert not _same(ensemble[0], ensemble[1])                          # with its own data order
    assert _same(ensemble[3], run_cycle(digits_task, cfg, ensemble[1], 3))
    assert _same(ensemble[4], run_cycle(digits_task, cfg, ensemble[2], 4))


def test_independent_members_all_start_from_theta_star(digits_task):
    cfg = EnsembleConfig(**SMALL | dict(members="independent"))
    ensemble = build_ensemble(digits_task, cfg)
    theta = snapshot(digits_task.model)
    assert [member_start(cfg, i) for i in range(3)] == [None] * 3
    assert _same(ensemble[2], run_cycle(digits_task, cfg, theta, 2))
    assert not _same(ensemble[1], ensemble[2])


def test_deterministic_for_a_seed_and_different_across_seeds(digits_task):
    cfg = EnsembleConfig(**SMALL | dict(num_members=2))
    a, b = build_ensemble(digits_task, cfg), build_ensemble(digits_task, cfg)
    c = build_ensemble(dataclasses.replace(digits_task, seed=1), cfg)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert not _same(a[0], c[0])


def test_second_build_loads_every_member_and_trains_nothing(digits_task, tmp_path, steps, caplog):
    task, cfg = _cached(digits_task, tmp_path), EnsembleConfig(**SMALL)
    first = list(build_ensemble(task, cfg))
    files = sorted(p.name for p in tmp_path.glob("ensemble/*/member_*.pt"))
    assert files == ["member_0.pt", "member_1.pt", "member_2.pt"] and steps[0] == 3 * cfg.ft_step
    with caplog.at_level(logging.INFO, logger="gex.ensemble"):
        second = list(build_ensemble(task, cfg))
    assert steps[0] == 3 * cfg.ft_step and "reused 3 of 3" in caplog.text
    assert all(_same(x, y) for x, y in zip(first, second, strict=True))
    build_ensemble(task, dataclasses.replace(cfg, ft_lr=0.02))  # another config: another folder, trained afresh
    assert steps[0] == 6 * cfg.ft_step and len(list(tmp_path.glob("ensemble/*"))) == 2


def test_resume_after_interruption_equals_an_uninterrupted_build(digits_task, tmp_path, steps):
    cfg = EnsembleConfig(**SMALL)
    reference = list(build_ensemble(digits_task, cfg))
    task, calls = _cached(digits_task, tmp_path), [0]

    def crash(*_):  # killed during the third member
        calls[0] += 1
        if calls[0] == 2 * cfg.ft_step + 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_ensemble(task, cfg, on_step=crash)
    assert sorted(p.name for p in tmp_path.glob("ensemble/*/member_*.pt")) == ["member_0.pt", "member_1.pt"]
    steps[0] = 0
    resumed = list(build_ensemble(task, cfg))
    assert steps[0] == cfg.ft_step  # only the unfinished member
    assert all(_same(x, y) for x, y in zip(reference, resumed, strict=True))
    next(tmp_path.glob("ensemble/*/member_2.pt")).unlink()  # a lost last member is retrained from member 1
    assert _same(build_ensemble(task, cfg)[2], reference[2]) and steps[0] == 2 * cfg.ft_step


def test_growing_m_reuses_the_members_already_built(digits_task, tmp_path, steps):
    task = _cached(digits_task, tmp_path)
    build_ensemble(task, EnsembleConfig(**SMALL | dict(num_members=2)))
    bigger = build_ensemble(task, EnsembleConfig(**SMALL))
    assert steps[0] == 3 * SMALL["ft_step"] and len(bigger) == 3


def test_cache_needs_a_spec_to_key_members(digits_task, tmp_path):
    task = dataclasses.replace(digits_task, cache=ArtifactCache(tmp_path), cache_spec={})
    with pytest.raises(ValueError, match="cache_spec is empty"):
        build_ensemble(task, EnsembleConfig(**SMALL))


def test_member_index_out_of_range(digits_task):
    with pytest.raises(IndexError, match="member 3 out of range"):
        build_ensemble(digits_task, EnsembleConfig(**SMALL | dict(ft_step=1)))[3]


@pytest.mark.parametrize("key,value,match", [
    ("num_members", 0, r"num_members=0 is invalid"), ("ft_step", 2.5, r"ft_step=2.5 is invalid"),
    ("ft_lr", 0.0, r"ft_lr=0.0 is invalid"), ("ft_schedule", "linear", r"ft_schedule='linear' is unknown.*cosine"),
    ("members", "swa", r"members='swa' is unknown.*independent"), ("num_chains", 9, r"num_chains=9 exceeds"),
    ("momentum", 1.0, r"momentum=1.0 are invalid"), ("bn_batches", -1, r"bn_batches=-1 is invalid")])
def test_bad_options_are_one_line_errors(key, value, match):
    with pytest.raises(ValueError, match=match):
        EnsembleConfig(**{key: value})


def test_independent_members_take_no_chains():
    with pytest.raises(ValueError, match="num_chains=2 applies to members='chain' only"):
        EnsembleConfig(num_chains=2, members="independent")
