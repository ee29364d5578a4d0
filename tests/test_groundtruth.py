"""Ground truth (gex.groundtruth, experiments.groundtruth): LOO and LDS against closed-form answers, caching,
shards, the SGD retrainer's data order, and the entry point end to end."""
import json
from pathlib import Path

import pytest
import torch
from conftest import TOL_EXACT, make_task
from hydra import compose, initialize_config_dir
from scipy.stats import pearsonr, spearmanr

from experiments.groundtruth import GroundTruthConfig, run, select_methods
from experiments.scaffold import RunLogger, UsageError
from gex import groundtruth as gt
from gex.runs import ArtifactCache

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
LAMBDA = 1.0            # L2 strength of the closed-form model (sum-form objective)
NEWTON_TOL = 1e-12      # gradient norm at which a logistic-regression fit counts as converged
MIN_LOO_CORR = 0.95     # exact IF vs exact LOO on the closed-form model
MIN_LDS_CLOSED = 0.8    # exact IF vs 50%-subset retrains on the closed-form model
RANDOM_LDS = 0.05       # |mean LDS| of random predictions (S=100, m=200: its std is ~0.007)


# ------------------------------------------------------------------------- the closed-form model (the oracle)

def _logistic_data(n=40, m=20, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n + m, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n + m, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w)).double()
    return x[:n], y[:n], x[n:], y[n:]


def _fit(x, y):
    """argmin sum_i l_i(w) + LAMBDA/2 |w|^2 by Newton's method (float64, to convergence)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) + LAMBDA * w
        if grad.norm() < NEWTON_TOL:
            return w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + LAMBDA * torch.eye(x.shape[1], dtype=torch.float64)
        w = w - torch.linalg.solve(hess, grad)
    raise AssertionError("Newton did not converge")


def _losses(w, x, y):
    z = x @ w
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none"), z * (2 * y - 1)


class LogisticRetrainer:
    """Exact retraining of the closed-form model; counts its calls."""

    def __init__(self):
        self.x, self.y, self.xt, self.yt = _logistic_data()
        self.calls = 0

    def spec(self):
        return {"model": "logistic", "lambda": LAMBDA}

    def __call__(self, rows, seed):
        self.calls += 1
        w = _fit(self.x[rows], self.y[rows])
        test_loss, test_margin = _losses(w, self.xt, self.yt)
        return {"test_loss": test_loss, "test_margin": test_margin, "train_loss": _losses(w, self.x, self.y)[0]}


def _exact_if(r: LogisticRetrainer):
    """g_test^T H^-1 g_train at the optimum, (n, m), and g_i^T H^-1 g_i, (n,): positive = proponent."""
    w = _fit(r.x, r.y)
    p = torch.sigmoid(r.x @ w)
    hess = r.x.T @ (r.x * (p * (1 - p))[:, None]) + LAMBDA * torch.eye(r.x.shape[1], dtype=torch.float64)
    g_train = r.x * (p - r.y)[:, None]
    g_test = r.xt * (torch.sigmoid(r.xt @ w) - r.yt)[:, None]
    solved = torch.linalg.solve(hess, g_train.T)              # (d, n)
    return (g_test @ solved).T, (g_train * solved.T).sum(1)


def test_loo_of_the_closed_form_model_agrees_with_the_exact_influence_function(tmp_path):
    r = LogisticRetrainer()
    influence, self_if = _exact_if(r)
    rows, test_rows = torch.arange(0, 40, 2), torch.arange(20)
    loo = gt.measure_loo(r, 40, rows, [0], test_rows, ArtifactCache(tmp_path))
    corr = gt.loo_correlations(influence[rows], loo["test"])
    assert min(corr.values()) >= MIN_LOO_CORR, corr
    assert float(gt.column_corr(self_if[rows], loo["self"], rank=True)[0]) >= MIN_LOO_CORR
    # the sign: removing a proponent raises the test loss, and the exact IF agrees in sign almost everywhere
    assert (torch.sign(influence[rows]) == torch.sign(loo["test"])).double().mean() > 0.9


def test_lds_of_the_closed_form_model_is_high_for_the_exact_if_and_low_for_its_negation(tmp_path):
    r = LogisticRetrainer()
    influence, _ = _exact_if(r)
    masks = gt.subset_masks(40, 30, 0.5, seed=1)
    per_seed, trained = gt.measure_subsets(r, masks, [0], torch.arange(20), ArtifactCache(tmp_path), "loss")
    assert trained == 30 and per_seed.shape == (30, 1, 20)
    lds = gt.lds_per_test(influence, masks, per_seed.mean(1), "loss")
    assert lds.mean() >= MIN_LDS_CLOSED, lds
    assert torch.allclose(gt.lds_per_test(-influence, masks, per_seed.mean(1), "loss"), -lds, atol=TOL_EXACT)
    margins, _ = gt.measure_subsets(r, masks, [0], torch.arange(20), ArtifactCache(tmp_path), "margin")
    assert gt.lds_per_test(influence, masks, margins.mean(1), "margin").mean() >= MIN_LDS_CLOSED


# --------------------------------------------------------------------------------- LDS / LOO / bootstrap maths

def test_lds_is_one_for_a_linear_datamodel_and_near_zero_for_random_predictions():
    g = torch.Generator().manual_seed(0)
    masks = gt.subset_masks(60, 100, 0.5, seed=0)
    beta, offset = torch.randn(60, 200, generator=g, dtype=torch.float64), torch.randn(200, generator=g)
    outcome = masks.double() @ beta + offset                     # a loss that each member raises by beta[i, j]
    # influence = -beta (members with beta < 0 lower the loss, i.e. are proponents)
    assert torch.allclose(gt.lds_per_test(-beta, masks, outcome, "loss"), torch.ones(200, dtype=torch.float64),
                          atol=TOL_EXACT)
    assert torch.allclose(gt.lds_per_test(beta, masks, outcome, "margin"), torch.ones(200, dtype=torch.float64),
                          atol=TOL_EXACT)
    noise = torch.randn(60, 200, generator=g, dtype=torch.float64)
    assert abs(float(gt.lds_per_test(noise, masks, outcome, "loss").mean())) < RANDOM_LDS


def test_column_correlations_equal_scipy_column_by_column():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 5, generator=g), torch.randn(30, 5, generator=g)
    b[:, 0] = a[:, 0].round()                                  # ties
    spear = [spearmanr(a[:, k], b[:, k]).statistic for k in range(5)]
    pears = [pearsonr(a[:, k], b[:, k]).statistic for k in range(5)]
    assert torch.allclose(gt.column_corr(a, b, rank=True), torch.tensor(spear, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(gt.column_corr(a, b), torch.tensor(pears, dtype=torch.float64), atol=1e-6)
    assert torch.isnan(gt.column_corr(a, torch.ones(30, 5))).all()   # a constant column has no correlation
    corr = gt.loo_correlations(a, a)
    assert all(v == pytest.approx(1.0) for v in corr.values())
    assert gt.loo_correlations(a, -a)["loo_spearman"] == pytest.approx(-1.0)
    assert gt.loo_correlations(a, b)["loo_spearman_per_test"] == pytest.approx(sum(spear) / 5, abs=1e-6)


def test_bootstrap_interval_contains_the_mean_and_matches_the_normal_width():
    values = torch.randn(400, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.3
    mean, low, high = gt.bootstrap_ci(values, n_boot=2000, seed=0)
    assert low < mean < high and mean == pytest.approx(float(values.mean()))
    normal = 2 * 1.96 * float(values.std()) / 400 ** 0.5
    assert (high - low) == pytest.approx(normal, rel=0.15)
    assert gt.bootstrap_ci(torch.tensor([0.5, 0.5, float("nan")])) == (0.5, 0.5, 0.5)   # NaN left out
    summary = gt.lds_summary(values, n_boot=200, seed=0)
    assert summary["lds_ci_low"] <= summary["lds"] <= summary["lds_ci_high"]
    with pytest.raises(ValueError, match="ci_level"):
        gt.bootstrap_ci(values, level=1.5)


def test_seed_agreement_is_one_for_identical_seeds_and_near_zero_for_independent_noise():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100, 50, generator=g, dtype=torch.float64)
    same = gt.seed_agreement(torch.stack([x, x, x]))
    assert all(v == pytest.approx(1.0) for v in same.values())
    noise = gt.seed_agreement(torch.randn(3, 100, 50, generator=g, dtype=torch.float64))
    assert abs(noise["seed_spearman"]) < RANDOM_LDS and abs(noise["seed_spearman_per_test"]) < RANDOM_LDS
    r = noise["seed_spearman_per_test"]
    assert noise["reliability_per_test"] == pytest.approx(3 * r / (1 + 2 * r))    # Spearman-Brown, k = 3
    assert all(v != v for v in gt.seed_agreement(x[None]).values())               # one seed: NaN


def test_rows_subsets_and_seeds_are_deterministic_and_well_formed():
    masks = gt.subset_masks(41, 20, 0.5, seed=3)
    assert masks.shape == (20, 41) and (masks.sum(1) == 20).all()              # round(0.5 * 41) = 20
    assert torch.equal(masks, gt.subset_masks(41, 20, 0.5, seed=3))
    assert len({tuple(m.tolist()) for m in masks}) == 20
    rows = gt.choose_rows(100, 10, seed=4)
    assert torch.equal(rows, rows.sort().values) and len(rows.unique()) == 10
    assert gt.retrain_seeds(7, 3)[0] == 7 and len(set(gt.retrain_seeds(7, 3))) == 3
    assert gt.rows_hash(torch.tensor([3, 1, 2])) == gt.rows_hash(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="task.alpha=1.2"):
        gt.subset_masks(10, 5, 1.2, seed=0)
    with pytest.raises(ValueError, match=r"task.n_loo=11 must lie in \[1, 10\]"):
        gt.choose_rows(10, 11, seed=0, what="task.n_loo")
    with pytest.raises(ValueError, match="task.outcome='logit' is unknown"):
        gt.lds_per_test(torch.zeros(4, 2), masks[:, :4], torch.zeros(20, 2), "logit")


# --------------------------------------------------------------------------------------- caching and shards

def test_a_second_run_trains_nothing_and_a_killed_run_resumes(tmp_path):
    r, cache = LogisticRetrainer(), ArtifactCache(tmp_path)
    rows, seeds = torch.tensor([1, 5, 9]), [0, 11]
    jobs = gt.loo_jobs(40, rows, seeds)
    _, trained = gt.collect_outcomes(r, gt.shard_jobs(jobs, 0, 3), cache)    # "killed" after one third
    assert trained == len(jobs[0::3])
    first = gt.measure_loo(r, 40, rows, seeds, torch.arange(20), cache)
    assert int(first["trained"]) == len(jobs) - len(jobs[0::3]) and r.calls == len(jobs)
    again = gt.measure_loo(r, 40, rows, seeds, torch.arange(20), cache)
    assert int(again["trained"]) == 0 and r.calls == len(jobs)
    assert torch.equal(first["test"], again["test"]) and torch.equal(first["self"], again["self"])


def test_shards_partition_the_retrains():
    jobs = gt.loo_jobs(40, torch.tensor([0, 3]), [0, 1]) + gt.subset_jobs(gt.subset_masks(40, 5, 0.5, 0), [0])
    ident = lambda j: (j.kind, j.ident, j.seed)  # noqa: E731
    parts = [{ident(j) for j in gt.shard_jobs(jobs, k, 3)} for k in range(3)]
    assert set().union(*parts) == {ident(j) for j in jobs} and sum(map(len, parts)) == len(jobs)
    keys = {json.dumps(j.spec(LogisticRetrainer()), sort_keys=True) for j in jobs}
    assert len(keys) == len(jobs)                                              # one artefact per retrain
    with pytest.raises(ValueError, match=r"task.shard=3 must lie in \[0, task.num_shards=3\)"):
        gt.shard_jobs(jobs, 3, 3)


# ------------------------------------------------------------------------------------------- SGD retrainer

@pytest.fixture(scope="module")
def small_task():
    return make_task(n_train=80, n_test=20, rate=0.0, noise="none", epochs=3, batch_size=16)


def test_the_full_retrain_replays_theta_star_and_loo_skips_one_row_in_the_same_order(small_task):
    task = small_task
    retrainer = gt.SGDRetrainer(task, task.recipe)
    model = retrainer.train_model(torch.arange(80), task.seed)
    for (name, p), q in zip(task.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    kept = torch.cat([torch.arange(7), torch.arange(8, 80)])
    stream = gt.filtered_stream(task.train, kept, 16, False, seed=5, device=task.device)
    first_epoch = torch.cat([next(stream).x for _ in range(5)])                 # 79 rows = 5 batches
    order = torch.randperm(80, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first_epoch, task.train.x[order[order != 7]])
    out = retrainer(kept, task.seed)
    assert out["test_loss"].shape == (20,) and out["train_loss"].shape == (80,)
    # softmax CE: margin = -log(exp(loss) - 1), so loss and margin rank the samples in reverse
    assert torch.allclose(out["test_margin"], -torch.log(torch.expm1(out["test_loss"])), atol=1e-6)


# --------------------------------------------------------------------------------------------- entry point

TINY = ["data.n_train=60", "data.n_test=30", "train.epochs=2", "train.batch_size=32", "train.bn_batches=2",
        "model.options.hidden=8", "logger=none", "task.n_test_eval=10", "task.n_loo=4", "task.retrain_seeds=2",
        "task.n_subsets=4", "task.n_bootstrap=50"]


def _compose(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("groundtruth", overrides=[*TINY, f"paths.cache={tmp_path / 'cache'}", *overrides])


def _run(cfg, run_dir):
    return run(cfg, run_dir, RunLogger(cfg, run_dir, "groundtruth"))


def test_entry_point_writes_the_record_reuses_retrains_and_shards(tmp_path, capsys):
    cfg = _compose(tmp_path, "methods=[grad_dot,randproj,loss,nope]")
    first = _run(cfg, tmp_path / "r1")
    assert first["n_trained"] == 2 + 4 * 2 + 4                                 # full + LOO x seeds + subsets
    for key in ("lds", "lds_ci_low", "lds_ci_high", "loo_spearman", "loo_pearson", "self_loo_spearman"):
        assert torch.isfinite(torch.tensor(first[f"grad_dot.{key}"])), key
    assert first["grad_dot.lds_ci_low"] <= first["grad_dot.lds"] <= first["grad_dot.lds_ci_high"]
    assert -1.0 <= first["loo.seed_spearman_per_test"] <= 1.0                     # 2 retrain seeds
    assert "nope.lds" not in first and torch.isnan(torch.tensor(first["loss.lds"]))   # unknown; no pairwise form
    scores = torch.load(tmp_path / "r1" / "scores.pt")
    assert scores["grad_dot.predicted"].shape == scores["loo_measured"].shape == (4, 10)
    assert (tmp_path / "r1" / "loo_scatter.png").is_file() and (tmp_path / "r1" / "lds_per_test.png").is_file()
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())["task"] == "groundtruth"
    second = _run(cfg, tmp_path / "r2")
    assert second["n_trained"] == 0 and second["grad_dot.lds"] == first["grad_dot.lds"]
    fresh = [f"paths.cache={tmp_path / 'cache2'}", "task.num_shards=2"]
    shards = [_run(_compose(tmp_path, *fresh, f"task.shard={k}"), tmp_path / f"s{k}") for k in (0, 1)]
    assert sum(s["n_trained"] for s in shards) == first["n_trained"]
    final = _run(_compose(tmp_path, f"paths.cache={tmp_path / 'cache2'}", "methods=[grad_dot]"), tmp_path / "r3")
    assert final["n_trained"] == 0 and final["grad_dot.loo_spearman"] == first["grad_dot.loo_spearman"]


@pytest.mark.parametrize("override,message", [
    ("task.outcome=logit", "task.outcome='logit' is unknown"),
    ("task.n_subsets=1", "n_subsets = 0 or >= 2"),
    ("task.shard=2", r"task.shard=2 must lie in \[0, task.num_shards=1\)"),
])
def test_bad_task_options_are_one_line_errors(override, message):
    key, value = override.split("=")
    with pytest.raises(UsageError, match=message):
        GroundTruthConfig(**{key.split(".")[1]: int(value) if value.isdigit() else value})


def test_unknown_methods_and_model_options_fail_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="holds no registered method; valid choices"):
        select_methods(["nope"])
    cfg = _compose(tmp_path, "model=cnn_small", "methods=[grad_dot]")
    with pytest.raises(UsageError, match=r"model.options.depth is not an option of model=cnn_small"):
        _run(cfg, tmp_path / "r")
    assert not (tmp_path / "cache").exists()
