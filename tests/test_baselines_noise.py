"""Label-noise baselines (el2n, forgetting, cl, knn, loss, random): detection on digits plus exact answers."""
from dataclasses import replace

import pytest
import torch
import yaml
from conftest import TOL_EXACT, TOL_FLOAT32
from sklearn.metrics import roc_auc_score
from torch import nn

import baselines  # noqa: F401  (registers every method)
import baselines.cl as cl_module
import gex.train
from baselines.cl import ConfidentLearning
from baselines.el2n import EL2N
from baselines.forgetting import Forgetting
from baselines.knn import KNN, knn_disagreement
from baselines.loss import Loss
from baselines.random import Random
from gex.attribution import METHODS, InfluenceTask, MethodError, build_method
from gex.data import LabeledData
from gex.runs import ArtifactCache
from gex.train import TrainConfig

NOISE_METHODS = ["el2n", "forgetting", "cl", "knn", "loss", "random"]
MIN_AUROC = 0.6          # every real method must beat chance clearly on digits (measured: 0.94-0.998)
RANDOM_AUROC_BAND = 0.2  # |AUROC - 0.5| for random scores; ~4 standard errors with 45 noisy of 300
RANDOM_MOMENT_TOL = 0.03  # mean and std of 20k N(0, 1) draws: ~4 standard errors


def _cpu_config(name):
    with open(f"configs/method/{name}.yaml") as handle:
        cfg = yaml.safe_load(handle)
    assert cfg.pop("name") == name
    return cfg


def _auroc(task, scores):
    return roc_auc_score(task.train.is_noisy.cpu().numpy(), scores.numpy())


@pytest.mark.parametrize("name", NOISE_METHODS)
def test_registered_and_no_pairwise_form(name, digits_task):
    method = build_method(name, **_cpu_config(name))
    assert type(method) is METHODS[name]
    with pytest.raises(NotImplementedError, match=f"'{name}' has no pairwise influence"):
        method.influence(digits_task.train, digits_task.test)


@pytest.mark.parametrize("name", [m for m in NOISE_METHODS if m != "random"])
def test_ranks_noisy_above_clean_on_digits(name, digits_task):
    scores = build_method(name, **_cpu_config(name)).fit(digits_task).self_influence(digits_task.train)
    assert scores.shape == (len(digits_task.train),) and torch.isfinite(scores).all()
    assert _auroc(digits_task, scores) > MIN_AUROC


@pytest.mark.parametrize("name,options,match", [
    ("el2n", {"repeats": 0}, "el2n.repeats"), ("el2n", {"epochs": 5, "schedule_epochs": 2}, "el2n.schedule_epochs"),
    ("forgetting", {"never_learned": "inf"}, "forgetting.never_learned.*valid choices"),
    ("forgetting", {"tie_break": 1.0}, "forgetting.tie_break"), ("cl", {"folds": 1}, "cl.folds"),
    ("cl", {"quality_method": "margin"}, "cl.quality_method.*valid choices"), ("knn", {"k": 0}, "knn.k"),
    ("knn", {"block_size": 0}, "knn.block_size"), ("loss", {"batch_size": 0}, "loss.batch_size")])
def test_bad_options_fail_with_the_key(name, options, match):
    with pytest.raises(MethodError, match=match):
        build_method(name, **options)


# ---- random --------------------------------------------------------------------------------------------------

def test_random_is_deterministic_per_seed_and_chance_level(digits_task):
    scores = Random().fit(digits_task).self_influence(digits_task.train)
    assert torch.equal(scores, Random().fit(digits_task).self_influence(digits_task.train))
    other = Random().fit(replace(digits_task, seed=1)).self_influence(digits_task.train)
    assert not torch.allclose(scores, other)
    assert abs(_auroc(digits_task, scores) - 0.5) < RANDOM_AUROC_BAND
    rows = torch.tensor([5, 2, 250])  # a sample keeps its score in a subset
    assert torch.equal(Random().fit(digits_task).self_influence(digits_task.train.subset(rows)), scores[rows])
    many = LabeledData(x=torch.zeros(20_000, 1), y=torch.zeros(20_000, dtype=torch.long),
                       y_clean=torch.zeros(20_000, dtype=torch.long), num_classes=2)
    draws = Random().fit(digits_task).self_influence(many)
    assert abs(draws.mean()) < RANDOM_MOMENT_TOL and abs(draws.std() - 1) < RANDOM_MOMENT_TOL  # standard normal


# ---- loss ----------------------------------------------------------------------------------------------------

def test_loss_equals_cross_entropy_by_hand(digits_task):
    scores = Loss(batch_size=37).fit(digits_task).self_influence(digits_task.train)
    model, x, y = digits_task.model.eval(), digits_task.train.x, digits_task.train.y
    with torch.no_grad():
        by_hand = torch.stack([-torch.log_softmax(model(x[i:i + 1])[0], -1)[y[i]] for i in range(len(y))])
    torch.testing.assert_close(scores, by_hand, atol=TOL_FLOAT32, rtol=TOL_FLOAT32)


# ---- el2n ----------------------------------------------------------------------------------------------------

def test_el2n_equals_brute_force_brier_and_repeats_differ(digits_task):
    method = EL2N(repeats=2, epochs=2).fit(digits_task)
    scores = method.self_influence(digits_task.train)
    x, y, k = digits_task.train.x, digits_task.train.y, digits_task.train.num_classes
    brute = torch.zeros(len(y))
    for state in method.states_:
        model = method.init_model(digits_task, 0)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            for i in range(len(y)):
                p = torch.softmax(model(x[i:i + 1])[0], -1)
                brute[i] += sum((p[c] - float(c == y[i])) ** 2 for c in range(k)) / len(method.states_)
    torch.testing.assert_close(scores.float(), brute, atol=TOL_FLOAT32, rtol=TOL_FLOAT32)
    # Different inits per repeat, reproducible, and tied to the run seed (not a fixed 42).
    first, second = (dict(method.init_model(digits_task, r).named_parameters()) for r in (0, 1))
    again = dict(method.init_model(digits_task, 0).named_parameters())
    assert len(set(method.init_seeds_)) == 2
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["1.weight"], second["1.weight"])
    reseeded = EL2N(repeats=1).init_model(replace(digits_task, seed=5), 0)
    assert not torch.equal(first["1.weight"], dict(reseeded.named_parameters())["1.weight"])
    assert not torch.equal(method.states_[0]["1.weight"], method.states_[1]["1.weight"])


def test_el2n_stops_inside_the_long_schedule(digits_task, monkeypatch):
    calls = []
    real = gex.train.lr_at
    monkeypatch.setattr(gex.train, "lr_at", lambda step, total, cfg: calls.append((step, total)) or real(step, total, cfg))
    method = EL2N(repeats=1, epochs=2)  # recipe: 30 epochs of ceil(300 / 64) = 5 steps
    method.fit(digits_task)
    assert calls == [(s, 150) for s in range(10)]
    calls.clear()
    EL2N(repeats=1, epochs=2, schedule_epochs=2).fit(digits_task)
    assert calls == [(s, 10) for s in range(10)]


# ---- forgetting ----------------------------------------------------------------------------------------------

def _hand_task(forgetting, never_learned, seed=0, n=6):
    gen = torch.Generator().manual_seed(0)
    data = LabeledData(x=torch.randn(n, 2, generator=gen), y=torch.arange(n) % 2, y_clean=torch.arange(n) % 2,
                       num_classes=2)
    test = LabeledData(x=torch.randn(3, 2, generator=gen), y=torch.zeros(3, dtype=torch.long),
                       y_clean=torch.zeros(3, dtype=torch.long), num_classes=2, name="test")
    return InfluenceTask(model=nn.Linear(2, 2), train=data, test=test, recipe=TrainConfig(),
                         make_model=lambda: nn.Linear(2, 2), forgetting=forgetting, never_learned=never_learned,
                         seed=seed)


def test_forgetting_ranking_and_never_learned_exact():
    counts = torch.tensor([3, 0, 1, 0, 2, 0])
    never = torch.tensor([False, True, False, False, False, True])
    task = _hand_task(counts, never)
    with pytest.raises(MethodError, match="6 entries but task.train has 4"):
        Forgetting().fit(_hand_task(counts, never, n=4))
    top = Forgetting(never_learned="max").fit(task)
    assert torch.equal(top.self_influence(task.train), torch.tensor([3, 4, 1, 0, 2, 4], dtype=torch.float64))
    zero = Forgetting(never_learned="zero").fit(task).self_influence(task.train)
    assert torch.equal(zero, counts.double())
    assert torch.equal(top.self_influence(task.train.subset(torch.tensor([4, 1]))), torch.tensor([2.0, 4.0]).double())
    with pytest.raises(MethodError, match="not \\(a subset of\\) task.train"):
        top.self_influence(task.test)


def test_forgetting_tie_break_keeps_order_and_is_seeded():
    task = _hand_task(torch.tensor([3, 0, 1, 0, 2, 0]), torch.tensor([False, True, False, False, False, True]))
    base = Forgetting().fit(task).self_influence(task.train)
    noisy = Forgetting(tie_break=0.5).fit(task).self_influence(task.train)
    assert ((noisy - base) >= 0).all() and ((noisy - base) < 0.5).all()
    assert len(set(noisy.tolist())) == len(noisy)  # ties broken
    order_base, order_noisy = base.argsort(), noisy.argsort()
    assert torch.equal(base[order_noisy], base[order_base])  # distinct counts never reordered
    assert torch.equal(noisy, Forgetting(tie_break=0.5).fit(task).self_influence(task.train))
    assert not torch.equal(noisy, Forgetting(tie_break=0.5).fit(replace(task, seed=1)).self_influence(task.train))


def test_forgetting_needs_the_log():
    with pytest.raises(MethodError, match="task.forgetting"):
        Forgetting().fit(_hand_task(None, None))
    with pytest.raises(MethodError, match="never_learned='zero'"):
        Forgetting(never_learned="max").fit(_hand_task(torch.zeros(4, dtype=torch.long), None))


# ---- cl ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("folds", [2, 3])
def test_cl_every_sample_out_of_fold_and_sign_flip(folds, digits_task, monkeypatch):
    seen = []
    real_train = cl_module.train
    monkeypatch.setattr(cl_module, "train", lambda model, data, *a, **kw: seen.append(data.index.clone())
                        or real_train(model, data, *a, **kw))
    method = ConfidentLearning(folds=folds, epochs=3).fit(digits_task)
    n, ids = len(digits_task.train), method.fold_ids_
    sizes = torch.bincount(ids, minlength=folds)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1 and ids.min() == 0 and ids.max() == folds - 1
    for fold, trained_on in enumerate(seen):  # each fold model saw exactly the other folds
        assert torch.equal(trained_on.sort().values, digits_task.train.index[ids != fold].sort().values)
    probs = method.oof_probs_
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(1), torch.ones(n, dtype=probs.dtype))
    y = digits_task.train.y
    expected = 1.0 - probs[torch.arange(n), y]  # self_confidence quality is p(given label); we flip it
    torch.testing.assert_close(method.self_influence(digits_task.train), expected, atol=TOL_EXACT, rtol=0)


def test_cl_other_quality_method_is_flipped_too(digits_task):
    method = ConfidentLearning(epochs=3, quality_method="normalized_margin").fit(digits_task)
    import cleanlab.rank
    quality = cleanlab.rank.get_label_quality_scores(digits_task.train.y.numpy(), method.oof_probs_.numpy(),
                                                     method="normalized_margin")
    torch.testing.assert_close(method.scores_, 1.0 - torch.as_tensor(quality, dtype=torch.float64),
                               atol=TOL_EXACT, rtol=0)


@pytest.mark.parametrize("make", [lambda: EL2N(repeats=1, epochs=1), lambda: ConfidentLearning(epochs=1)])
def test_trained_baselines_reuse_their_cache(make, digits_task, tmp_path, monkeypatch):
    task = replace(digits_task, cache=ArtifactCache(tmp_path), cache_spec=dict(digits_task.cache_spec))
    first = make().fit(task).self_influence(task.train)
    fail = lambda *a, **kw: pytest.fail("trained again despite the cache")  # noqa: E731
    monkeypatch.setattr("baselines.el2n.train", fail)
    monkeypatch.setattr(cl_module, "train", fail)
    assert torch.equal(make().fit(task).self_influence(task.train), first)


# ---- knn -----------------------------------------------------------------------------------------------------

def _knn_brute(query, query_y, ref, ref_y, k, num_classes):
    out = []
    for i in range(len(query)):
        dist = [float(((query[i] - ref[j]) ** 2).sum()) for j in range(len(ref))]
        nearest = sorted(range(len(ref)), key=lambda j: dist[j])[:k]
        mean = [sum(int(ref_y[j]) == c for j in nearest) / k for c in range(num_classes)]
        out.append(sum((mean[c] - float(c == int(query_y[i]))) ** 2 for c in range(num_classes)))
    return torch.tensor(out, dtype=torch.float64)


def test_knn_equals_brute_force_and_ignores_block_size():
    gen = torch.Generator().manual_seed(3)
    logits, y = torch.randn(40, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (40,), generator=gen)
    brute = _knn_brute(logits, y, logits, y, 6, 3)
    for block in (7, 1000):
        torch.testing.assert_close(knn_disagreement(logits, y, logits, y, 6, 3, block), brute, atol=TOL_EXACT, rtol=0)
    # k = 1 with query = ref: every sample's only neighbour is itself (self included), so no disagreement.
    assert torch.equal(knn_disagreement(logits, y, logits, y, 1, 3, 7), torch.zeros(40, dtype=torch.float64))


def test_knn_method_averages_checkpoints(digits_task):
    method = KNN(k=5, num_checkpoints=2, block_size=7).fit(digits_task)
    scores = method.self_influence(digits_task.train)
    assert torch.equal(scores, KNN(k=5, num_checkpoints=2, block_size=1000).fit(digits_task).self_influence(
        digits_task.train))
    model, y, per_ckpt = digits_task.make_model(), digits_task.train.y, []
    for ckpt in digits_task.trajectory[-2:]:
        model.load_state_dict(ckpt.state)
        with torch.no_grad():
            logits = model.eval()(digits_task.train.x).double()
        per_ckpt.append(knn_disagreement(logits, y, logits, y, 5, 10, 64))
    torch.testing.assert_close(scores, torch.stack(per_ckpt).mean(0), atol=TOL_FLOAT32, rtol=0)
    assert KNN().fit(digits_task).k_ == len(y) // 10
    with pytest.raises(MethodError, match="knn.num_checkpoints=9"):
        KNN(num_checkpoints=9).fit(digits_task)


def test_aum_margins_equal_a_brute_force_loop():
    from gex.train import aum_margins
    logits, y = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 1.0], [1.0, 1.0, 0.0]]), torch.tensor([0, 0, 1])
    expected = [2.0 - 1.0, 0.5 - 3.0, 1.0 - 1.0]   # assigned logit minus the largest other one
    assert aum_margins(logits, y).tolist() == expected


def test_aum_is_minus_the_mean_pretraining_margin_and_refuses_a_task_without_one(digits_task):
    method = build_method("aum").fit(digits_task)
    scores = method.self_influence(digits_task.train)
    assert torch.equal(scores, -digits_task.aum.double())
    assert roc_auc_score(digits_task.train.is_noisy.numpy(), scores.numpy()) > 0.8  # low margins = mislabeled
    rows = torch.tensor([5, 2, 9])
    assert torch.equal(method.self_influence(digits_task.train.subset(rows)), scores[rows])
    with pytest.raises(MethodError, match="aum needs the margins recorded during pretraining"):
        build_method("aum").fit(replace(digits_task, aum=None))
