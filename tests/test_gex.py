"""GEX, GEX-lin and the mean-loss ablation against brute-force loops over members, the clamp's inversion,
determinism, caching and resume, the registry and the method configs."""
import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL_EXACT, TOL_FLOAT32
from omegaconf import OmegaConf
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import gex.method as gex_module
from gex.attribution import METHODS, InfluenceTask, MethodError, build_method
from gex.data import DataConfig, NoiseConfig, load_data
from gex.method import (GEX, ClampRegimeWarning, GEXClamped, GEXLin, GEXMeanLoss, clamp_inverted, reference_values,
                        warn_if_inverted)
from gex.runs import ArtifactCache
from gex.train import TrainConfig, clone_model, train

SMALL = dict(num_members=4, ft_step=10, ft_lr=0.05, ft_batch_size=32, bn_batches=2)
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"


@pytest.fixture(scope="module")
def fitted(digits_task):
    return GEX(**SMALL).fit(digits_task)


@pytest.fixture(scope="module")
def clamped(digits_task):
    """The authors' form on the same members (the ensemble does not depend on the reference)."""
    method = GEXClamped(**SMALL).fit(digits_task)
    return method


def _brute_losses(task, state, data, loss="ce"):
    """Eval-mode per-sample loss of ``data`` under ``state``, one sample at a time."""
    model = clone_model(task.model)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(data.x[i:i + 1]) for i in range(len(data))])
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, F.one_hot(data.y, logits.shape[1]).to(logits),
                                                  reduction="none").sum(1)
    return F.cross_entropy(logits, data.y, reduction="none")


def _brute_deviations(method, data):
    """(n, M) deviations L[i, m] - r_i by loops over members and samples: r_i = max(l_i(theta*), eps) for the
    clamped reference, and l_i(theta*) where theta* predicts the label (else 0) for fit_aware."""
    task = method.task
    reference = _brute_losses(task, task.model.state_dict(), data, task.loss)
    members = torch.stack([_brute_losses(task, s, data, task.loss) for s in method.ensemble], dim=1)
    if method.reference == "clamped":
        return members - torch.clamp(reference, min=method.eps)[:, None], members, reference
    with torch.no_grad():
        fits = torch.stack([task.model(data.x[i:i + 1]).argmax(-1)[0] == data.y[i] for i in range(len(data))])
    return members - torch.where(fits, reference, torch.zeros_like(reference))[:, None], members, reference


def test_self_influence_is_nonnegative_and_equals_the_brute_force_formula(fitted, digits_task):
    scores = fitted.self_influence(digits_task.train)
    dev, _, _ = _brute_deviations(fitted, digits_task.train)
    assert scores.shape == (len(digits_task.train),) and (scores >= 0).all()
    torch.testing.assert_close(scores, (dev ** 2).mean(1), rtol=TOL_FLOAT32, atol=TOL_FLOAT32)


def test_pairwise_diagonal_equals_self_influence(fitted, digits_task):
    matrix = fitted.influence(digits_task.train, digits_task.train)
    assert matrix.shape == (len(digits_task.train),) * 2
    torch.testing.assert_close(matrix.diagonal(), fitted.self_influence(digits_task.train), rtol=1e-5, atol=1e-7)


def test_influence_on_mean_test_is_the_authors_formula_and_differs_from_the_matrix_mean(clamped, digits_task):
    fitted = clamped
    train, test = digits_task.train, digits_task.test
    dev_train, _, _ = _brute_deviations(fitted, train)
    dev_test, test_members, test_ref = _brute_deviations(fitted, test)
    m = dev_train.shape[1]
    # authors: clamp the *mean* test loss at theta*, then correlate with the members' mean test loss
    authors = sum(dev_train[:, k] * (test_members[:, k].mean() - max(test_ref.mean().item(), fitted.eps))
                  for k in range(m)) / m
    matrix_mean = dev_train @ dev_test.mean(0) / m  # each test reference clamped on its own
    got_authors = fitted.influence_on_mean_test(train, test)
    got_matrix = fitted.influence(train, test).mean(1)
    torch.testing.assert_close(got_authors, authors, rtol=TOL_FLOAT32, atol=TOL_FLOAT32)
    torch.testing.assert_close(got_matrix, matrix_mean, rtol=TOL_FLOAT32, atol=TOL_FLOAT32)
    assert (test_ref < fitted.eps).any()  # the clamp is active on some test samples, so the two differ
    assert (got_authors - got_matrix).abs().max() > 100 * TOL_FLOAT32


def test_without_a_clamp_influence_on_mean_test_is_the_matrix_mean(fitted, digits_task):
    train, test = digits_task.train, digits_task.test
    torch.testing.assert_close(fitted.influence_on_mean_test(train, test), fitted.influence(train, test).mean(1),
                               rtol=TOL_FLOAT32, atol=TOL_FLOAT32)


def test_without_clamp_both_cross_influences_agree(digits_task):
    method = GEX(**SMALL | dict(num_members=2), eps=0.0).fit(digits_task)
    torch.testing.assert_close(method.influence_on_mean_test(digits_task.train, digits_task.test),
                               method.influence(digits_task.train, digits_task.test).mean(1), rtol=1e-4, atol=1e-7)


def test_member_losses_are_computed_once_per_dataset(digits_task, monkeypatch):
    calls = []
    original = gex_module.losses_for_states
    monkeypatch.setattr(gex_module, "losses_for_states", lambda *a, **k: calls.append(1) or original(*a, **k))
    method = GEX(**SMALL | dict(num_members=2)).fit(digits_task)
    method.self_influence(digits_task.train)
    method.influence(digits_task.train, digits_task.test)
    method.influence_on_mean_test(digits_task.train, digits_task.test)
    assert len(calls) == 2  # train and test, once each


def test_loss_follows_the_task_bce(digits_task):
    task = dataclasses.replace(digits_task, loss="bce")
    method = GEX(**SMALL | dict(num_members=2)).fit(task)
    dev, members, _ = _brute_deviations(method, task.train)
    torch.testing.assert_close(method.member_losses(task.train), members, rtol=TOL_FLOAT32, atol=TOL_FLOAT32)
    ce = _brute_losses(task, method.ensemble[0], task.train, "ce")
    assert (members[:, 0] - ce).abs().max() > 0.01


@pytest.fixture(scope="module")
def smooth_task():
    """A float64 tanh MLP without BN on 80 digits: the linearization is the only difference GEX-lin makes."""
    torch.set_default_dtype(torch.float64)
    try:
        bundle = load_data(DataConfig(name="digits", n_train=80, n_test=20), NoiseConfig(rate=0.2), 0)
        train_split, test_split = bundle.train, bundle.test
        train_split.x, test_split.x = train_split.x.double(), test_split.x.double()
        make = lambda: (torch.manual_seed(0), nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(),  # noqa: E731
                                                            nn.Linear(8, 10)))[1]
        model, recipe = make(), TrainConfig(epochs=20, batch_size=40, lr=0.1, bn_batches=1)
        train(model, train_split, recipe, seed=0, device=torch.device("cpu"))
    finally:
        torch.set_default_dtype(torch.float32)
    return InfluenceTask(model=model, train=train_split, test=test_split, recipe=recipe, make_model=make)


def test_gex_lin_approaches_gex_as_the_step_size_vanishes(smooth_task):
    gaps = []
    for lr in (1e-1, 1e-2, 1e-3):
        options = dict(num_members=2, ft_step=5, ft_lr=lr, ft_batch_size=80, ft_augment=False, bn_batches=1, eps=0.0,
                       reference="clamped")  # tau 0: the plain deviation from theta*
        exact = GEX(**options).fit(smooth_task).loss_deviations(smooth_task.train)
        linear = GEXLin(**options).fit(smooth_task).loss_deviations(smooth_task.train)
        gaps.append(float((exact - linear).norm() / exact.norm()))
    # the linearization error is second order in the step, the deviation first order: the ratio falls ~ lr
    assert gaps[0] > 0.05 and gaps[1] < gaps[0] / 4 and gaps[2] < gaps[1] / 4 and gaps[2] < 0.01, gaps


def test_gex_lin_is_exact_for_a_model_linear_in_its_parameters(smooth_task):
    linear_task = dataclasses.replace(smooth_task, model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double())
    options = dict(num_members=2, ft_step=5, ft_lr=0.1, ft_batch_size=40, bn_batches=1, ft_augment=False)
    exact = GEX(**options).fit(linear_task).self_influence(linear_task.train)
    torch.testing.assert_close(GEXLin(**options).fit(linear_task).self_influence(linear_task.train), exact,
                               rtol=1e-9, atol=TOL_EXACT)


def test_clamp_inverts_the_ranking_when_members_stay_below_eps_and_warns(digits_task):
    """Members barely move (tiny ft_lr) and eps sits above every loss: score = (eps - L)^2 falls as L rises."""
    options = SMALL | dict(ft_lr=1e-6, num_members=2)
    probe = GEX(**options).fit(digits_task)
    eps = 2.0 * float(probe.member_losses(digits_task.train).max())
    method = GEX(**options, eps=eps, reference="clamped").fit(digits_task)
    with pytest.warns(ClampRegimeWarning, match="inverts the ranking"):
        scores = method.self_influence(digits_task.train)
    mean_loss = method.member_losses(digits_task.train).mean(1)
    noisy = digits_task.train.is_noisy.numpy()
    assert spearmanr(scores.numpy(), mean_loss.numpy()).statistic < -0.99
    assert roc_auc_score(noisy, scores.numpy()) < 0.2 < 0.8 < roc_auc_score(noisy, mean_loss.numpy())
    assert method.diagnostics()["frac_below_eps"] == 1.0 and method.diagnostics()["frac_clamp_inverted"] == 1.0
    fit_aware = GEX(**options, eps=eps).fit(digits_task)   # the default reference: no clamp, nothing inverted
    assert roc_auc_score(noisy, fit_aware.self_influence(digits_task.train).numpy()) > 0.8
    assert fit_aware.diagnostics()["frac_clamp_inverted"] == 0.0


def test_no_warning_and_noisy_members_unmemorize_in_the_working_regime(fitted, digits_task):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClampRegimeWarning)
        scores = fitted.self_influence(digits_task.train)
    diag = fitted.diagnostics()
    assert set(diag) == {"member_loss_top", "member_loss_rest", "member_loss_noisy", "member_loss_clean",
                         "frac_below_eps", "tau", "frac_clamp_inverted", "frac_reference_unfit"}
    assert diag["member_loss_noisy"] > 3 * diag["member_loss_clean"] and diag["frac_below_eps"] < 0.5
    # brute force: median over the top 10% by score of each sample's median member loss
    median = fitted.member_losses(digits_task.train).double().quantile(0.5, dim=1)
    top = scores.argsort(descending=True)[:math.ceil(0.1 * len(scores))]
    assert diag["member_loss_top"] == pytest.approx(float(median[top].quantile(0.5)))


def test_mean_loss_ablation(digits_task):
    method = GEXMeanLoss(**SMALL | dict(num_members=2)).fit(digits_task)
    _, members, _ = _brute_deviations(method, digits_task.train)
    torch.testing.assert_close(method.self_influence(digits_task.train), members.mean(1), rtol=TOL_FLOAT32,
                               atol=TOL_FLOAT32)
    with pytest.raises(NotImplementedError, match="'gex_mean_loss' has no pairwise influence"):
        method.influence(digits_task.train, digits_task.test)


def test_scores_are_deterministic_for_a_seed(fitted, digits_task):
    again = GEX(**SMALL).fit(digits_task).self_influence(digits_task.train)
    assert torch.equal(again, fitted.self_influence(digits_task.train))
    other = GEX(**SMALL).fit(dataclasses.replace(digits_task, seed=1)).self_influence(digits_task.train)
    assert not torch.allclose(other, again)


def test_cached_fit_trains_nothing_and_resume_gives_identical_scores(fitted, digits_task, tmp_path):
    task = dataclasses.replace(digits_task, cache=ArtifactCache(tmp_path), cache_spec={"pretrain": "digits-test"})
    count = [0]
    handle = register_optimizer_step_post_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        first = GEX(**SMALL).fit(task).self_influence(task.train)
        assert count[0] == SMALL["num_members"] * SMALL["ft_step"]
        second = GEX(**SMALL).fit(task).self_influence(task.train)
        assert count[0] == SMALL["num_members"] * SMALL["ft_step"]  # every member loaded
        for name in ("member_2.pt", "member_3.pt"):  # interrupted after member 1
            next(tmp_path.glob(f"ensemble/*/{name}")).unlink()
        resumed = GEX(**SMALL).fit(task).self_influence(task.train)
        assert count[0] == (SMALL["num_members"] + 2) * SMALL["ft_step"]
    finally:
        handle.remove()
    reference = fitted.self_influence(digits_task.train)
    assert torch.equal(first, reference) and torch.equal(second, reference) and torch.equal(resumed, reference)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-0.1), r"eps=-0.1 is invalid"), (dict(ft_schedule="linear"), r"ft_schedule='linear' is unknown"),
    (dict(top_frac=0.0), r"top_frac=0.0"), (dict(members="bagging"), r"members='bagging' is unknown"),
    (dict(num_members=2, num_chains=4), r"num_chains=4 exceeds num_members=2")])
def test_bad_options_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GEX(**kwargs)


def test_scoring_before_fit_is_an_error(digits_task):
    with pytest.raises(MethodError, match="call fit"):
        GEXLin().self_influence(digits_task.train)


@pytest.mark.parametrize("name,cls", [("gex", GEX), ("gex_lin", GEXLin), ("gex_mean_loss", GEXMeanLoss)])
def test_method_configs_build_the_registered_classes(name, cls):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert cfg.pop("name") == name and METHODS[name] is cls
    method = build_method(name, **cfg)
    assert type(method) is cls and method.config.num_members == cfg["num_members"] and method.eps == cfg["eps"]


def test_the_clamp_inverts_exactly_the_samples_below_tau_and_fit_aware_inverts_none():
    """Hand-made losses, members above theta* everywhere (they moved away from it): raising a member loss raises
    the score, except under the clamp for the samples whose theta* and member losses sit below tau."""
    tau = 0.05
    star = torch.tensor([0.001, 0.001, 0.03, 0.2, 0.6, 0.001], dtype=torch.float64)
    members = star[:, None] + torch.tensor([[0.001, 0.002], [0.03, 0.04], [0.005, 0.01], [0.1, 0.3],
                                            [0.0, 0.4], [0.1, 0.2]], dtype=torch.float64)
    fitted = torch.tensor([True, True, True, True, False, True])
    below = clamp_inverted(members, star, tau)
    assert below.tolist() == [True, True, True, False, False, False]

    def score(losses, rule):
        return (losses - reference_values(star, fitted, rule, tau)[:, None]).pow(2).mean(1)

    bumped = members + 1e-3
    assert ((score(bumped, "clamped") < score(members, "clamped")) == below).all()   # falls exactly there
    assert (score(bumped, "fit_aware") > score(members, "fit_aware")).all()          # never inverted
    # the two below-tau samples swap order under the clamp: the one whose members moved more scores lower
    assert score(members, "clamped")[0] > score(members, "clamped")[1]
    assert score(members, "fit_aware")[0] < score(members, "fit_aware")[1]
    # a sample theta* never fit keeps its member losses as its score (its deviation from theta* is small)
    assert reference_values(star, fitted, "fit_aware", tau)[4] == 0.0


def test_the_clamp_warning_fires_above_its_threshold(caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClampRegimeWarning)
        assert not warn_if_inverted("gex", 0.05, 0.05, 0.05)
    with pytest.warns(ClampRegimeWarning, match=r"inverts the ranking of 5\.1% of the samples .*reference=fit_aware"):
        assert warn_if_inverted("gex", 0.051, 0.05, 0.05)
    assert "inverts the ranking" in caplog.text


def test_gex_clamped_is_the_authors_form_and_adaptive_tau_reads_theta_stars_losses(digits_task):
    options = SMALL | dict(num_members=2)
    authors = GEXClamped(**options).fit(digits_task)
    assert authors.reference == "clamped" and authors.tau() == 0.05
    adaptive = GEX(**options, reference="clamped", eps_quantile=0.1).fit(digits_task)
    expected = float(adaptive.reference_losses(digits_task.train).double().quantile(0.1))
    assert adaptive.tau() == pytest.approx(expected)
    dev = adaptive.loss_deviations(digits_task.train)
    ref = adaptive.reference_losses(digits_task.train).clamp(min=expected)
    torch.testing.assert_close(dev, adaptive.member_losses(digits_task.train) - ref[:, None])
    with pytest.raises(ValueError, match="reference='tau' is unknown"):
        GEX(reference="tau")
