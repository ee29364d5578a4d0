"""The one training loop: schedules, loss decrease, checkpoints, forgetting counts, BN refresh, clipping."""

import pytest
import torch

from gex.data import Batch, LabeledData
from gex.evaluation import per_sample_losses
from gex.models import build_model
from gex.train import (
    TrainConfig,
    _Recorder,
    batch_stream,
    lr_at,
    sgd_steps,
    train,
    update_bn,
)


def _blobs(n=120, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, d, generator=g) + 3 * torch.nn.functional.one_hot(y, d).float()
    return LabeledData(x=x, y=y.clone(), y_clean=y.clone(), num_classes=k, name="blobs")


def test_warmup_cosine_and_constant_schedules():
    cfg = TrainConfig(lr=0.4, warmup_frac=0.1, epochs=1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)  # linear warmup over 10 steps
    assert lrs[10] == pytest.approx(0.4) and lrs[55] == pytest.approx(0.2, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3
    const = TrainConfig(lr=0.01, schedule="constant", clip_norm=1.0, epochs=1)
    assert {lr_at(s, 50, const) for s in range(50)} == {0.01}


def test_training_lowers_the_loss_and_is_deterministic():
    data = _blobs()
    cfg = TrainConfig(epochs=15, batch_size=16, lr=0.05, bn_batches=4)
    before = per_sample_losses(build_model("mlp", (5,), 3, seed=0, hidden=16), data).mean()
    models = []
    for _ in range(2):
        model = build_model("mlp", (5,), 3, seed=0, hidden=16)
        result = train(model, data, cfg, seed=3, device=torch.device("cpu"))
        models.append(model)
    after = per_sample_losses(models[0], data).mean()
    assert after < 0.5 * before
    assert all(torch.equal(p, q) for p, q in zip(models[0].state_dict().values(), models[1].state_dict().values()))
    assert result.history[-1]["train/acc"] >= 0.85 and len(result.history) == 15


def test_trajectory_checkpoints_sit_at_the_configured_fractions_with_their_lr():
    data = _blobs(n=64)
    cfg = TrainConfig(epochs=10, batch_size=16, lr=0.1, ckpt_fracs=[0.5, 1.0], bn_batches=2)
    model = build_model("mlp", (5,), 3, seed=0, hidden=8)
    result = train(model, data, cfg, seed=0, device=torch.device("cpu"))
    total = cfg.total_steps(len(data))
    assert [c.step for c in result.trajectory] == [20, 40] and total == 40
    assert result.trajectory[0].lr == pytest.approx(lr_at(19, total, cfg))
    final = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(final[k], v) for k, v in result.trajectory[-1].state.items())


def test_forgetting_counts_correct_to_wrong_transitions_of_pre_update_predictions():
    data = _blobs(n=4, d=3, k=3)
    model = build_model("mlp", (3,), 3, hidden=4)
    cfg = TrainConfig(epochs=100, batch_size=4, ckpt_fracs=[1.0], bn_batches=1)
    rec = _Recorder(model, data, cfg, total=100, generator=torch.Generator(), device=torch.device("cpu"), log_fn=None)
    y = data.y  # labels 0, 1, 2, 0
    # correctness per step for the 4 samples; sample 0: 1,0,1,0 -> 2 forgettings; sample 3 never correct
    pattern = [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0]]
    for step, correct in enumerate(pattern):
        pred = torch.where(torch.tensor(correct).bool(), y, (y + 1) % 3)
        logits = torch.nn.functional.one_hot(pred, 3).float()
        rec(step, Batch(rows=torch.arange(4), x=data.x, y=y, targets=None, weights=None), logits, 0.1)
    assert rec.forgetting.tolist() == [2, 1, 0, 0]
    assert (~rec.ever_correct).tolist() == [False, False, False, True]


def test_update_bn_recomputes_exact_statistics_of_the_batches_seen():
    data = _blobs(n=64)
    model = build_model("mlp", (5,), 3, hidden=8, depth=1)
    cfg = TrainConfig(batch_size=64, bn_batches=1, epochs=1)
    update_bn(model, data, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    hidden = model[1](data.x)  # Linear output feeding the BN layer
    bn = model[2]
    assert torch.allclose(bn.running_mean, hidden.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, hidden.var(0, unbiased=True), atol=1e-4)
    assert bn.momentum == 0.1 and not model.training


def test_clipping_sees_the_l2_term_and_bounds_the_step():
    data = _blobs(n=32)
    model = build_model("mlp", (5,), 3, hidden=8)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(50)  # huge weights: the L2 gradient dominates
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    cfg = TrainConfig(steps=1, batch_size=32, lr=0.5, momentum=0.0, schedule="constant", clip_norm=1.0,
                      weight_decay=0.5)
    stream = batch_stream(data, 32, False, torch.Generator().manual_seed(0), torch.device("cpu"))
    sgd_steps(model, stream, 1, cfg)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() == pytest.approx(0.5, rel=1e-4)  # lr * clipped norm 1


def test_soft_targets_and_weights_enter_the_loss():
    data = _blobs(n=48)
    soft = torch.full((48, 3), 1 / 3)
    cfg = TrainConfig(epochs=30, batch_size=16, lr=0.05, bn_batches=2)
    model = build_model("mlp", (5,), 3, seed=0, hidden=8)
    train(model, LabeledData(**{**data.__dict__, "targets": soft}), cfg, seed=0, device=torch.device("cpu"))
    probs = torch.softmax(model(data.x), -1)
    assert (probs - 1 / 3).abs().max() < 0.15  # uniform targets -> near-uniform predictions


@pytest.mark.parametrize("kwargs,match", [({"epochs": 0}, "train.epochs must be positive"),
                                          ({"schedule": "linear"}, "train.schedule='linear' is unknown"),
                                          ({"loss": "mse"}, "train.loss='mse' is unknown"),
                                          ({"ckpt_fracs": [0.0]}, "ckpt_fracs must lie in"),
                                          ({"batch_size": -1}, "batch_size must be positive")])
def test_bad_recipes_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_max_steps_stops_inside_the_longer_schedule():
    data = _blobs(n=64)
    cfg = TrainConfig(epochs=10, batch_size=16, lr=0.1, ckpt_fracs=[0.5, 1.0], bn_batches=2)
    full, cut = (build_model("mlp", (5,), 3, seed=0, hidden=8) for _ in range(2))
    lrs = []
    train(full, data, cfg, seed=0, device=torch.device("cpu"), log_fn=lambda row: lrs.append(row["train/lr"]))
    result = train(cut, data, cfg, seed=0, device=torch.device("cpu"), max_steps=8)
    assert result.history[-1]["train/lr"] == pytest.approx(lrs[1])  # the LR of step 8 of the 40-step schedule
    assert result.trajectory == []  # the checkpoints sit past the stop
    assert not torch.equal(full[1].weight, cut[1].weight)


class _Interrupt(Exception):
    pass


def _stop_after_epoch(epoch):
    def log_fn(row):
        if row["epoch"] == epoch:
            raise _Interrupt
    return log_fn


def test_an_interrupted_run_resumes_from_its_last_save_to_the_same_result(tmp_path):
    from gex.train import ResumeFile
    data = _blobs(n=70)
    data.augment = lambda x, g: x + 0.1 * torch.randn(x.shape, generator=g)  # draws from the order generator
    cfg = TrainConfig(epochs=12, batch_size=16, lr=0.1, augment=True, ckpt_fracs=[0.25, 0.5, 1.0], bn_batches=3)
    cpu = torch.device("cpu")
    whole_model = build_model("mlp", (5,), 3, seed=0, hidden=8)
    whole = train(whole_model, data, cfg, seed=5, device=cpu)

    progress = ResumeFile(tmp_path / "progress.pt", every_s=0)
    model = build_model("mlp", (5,), 3, seed=0, hidden=8)
    with pytest.raises(_Interrupt):  # dies while logging epoch 8: the last save is that of epoch 7
        train(model, data, cfg, seed=5, device=cpu, resume=progress, log_fn=_stop_after_epoch(8))
    assert torch.load(progress.path, weights_only=True)["step"] == 7 * 5
    model = build_model("mlp", (5,), 3, seed=0, hidden=8)  # a new process starts from a fresh model
    resumed = train(model, data, cfg, seed=5, device=cpu, resume=progress)

    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(model.state_dict(), whole_model.state_dict())
    assert [c.step for c in resumed.trajectory] == [c.step for c in whole.trajectory] == [15, 30, 60]
    assert all(same(c.state, d.state) and c.lr == d.lr for c, d in zip(resumed.trajectory, whole.trajectory))
    assert torch.equal(resumed.forgetting, whole.forgetting) and whole.forgetting.sum() > 0
    assert torch.equal(resumed.never_learned, whole.never_learned)
    assert resumed.history == whole.history and resumed.wall_s >= 0


def test_resuming_without_the_momentum_would_differ(tmp_path):
    """The resume test above can fail: a save that drops the momentum buffer gives another model."""
    from gex.train import ResumeFile
    data = _blobs(n=70)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.1)
    whole_model = build_model("mlp", (5,), 3, seed=0, hidden=8)
    train(whole_model, data, cfg, seed=5, device=torch.device("cpu"))
    progress = ResumeFile(tmp_path / "progress.pt", every_s=0)
    with pytest.raises(_Interrupt):
        train(build_model("mlp", (5,), 3, seed=0, hidden=8), data, cfg, seed=5, device=torch.device("cpu"),
              resume=progress, log_fn=_stop_after_epoch(4))
    state = torch.load(progress.path, weights_only=True)
    state["optimizer"]["state"] = {}
    torch.save(state, progress.path)
    model = build_model("mlp", (5,), 3, seed=0, hidden=8)
    train(model, data, cfg, seed=5, device=torch.device("cpu"), resume=progress)
    resumed, whole = model.state_dict(), whole_model.state_dict()
    assert not all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_progress_saved_for_another_schedule_is_a_one_line_error(tmp_path):
    from gex.runs import ArtifactError
    from gex.train import ResumeFile
    data = _blobs(n=70)
    progress = ResumeFile(tmp_path / "progress.pt", every_s=0)
    with pytest.raises(_Interrupt):
        train(build_model("mlp", (5,), 3, seed=0, hidden=8), data, TrainConfig(epochs=6, batch_size=16), seed=0,
              device=torch.device("cpu"), resume=progress, log_fn=_stop_after_epoch(3))
    with pytest.raises(ArtifactError, match="is for 30 steps, this run has 50"):
        train(build_model("mlp", (5,), 3, seed=0, hidden=8), data, TrainConfig(epochs=10, batch_size=16), seed=0,
              device=torch.device("cpu"), resume=progress)
