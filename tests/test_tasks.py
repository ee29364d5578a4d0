"""The four task entry points (detect, relabel, prune, separate): end to end on the smoke preset, the pipeline pieces
against exact answers and brute force, and bad input as one-line errors with exit status 2."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_task
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from experiments import detect, prune, relabel, separate
from experiments.launch import entry_point
from experiments.metrics import accuracy, detection_by_fit, found_at, ranking_order
from experiments.prune import PruneConfig, prune_rows, random_prune_rows
from experiments.relabel import otsu_flags, rdia_targets, relabeled_data
from experiments.retrain import retrain_recipe, retrain_test_acc, unchanged_test_acc
from experiments.scaffold import RunLogger, has_pairwise, register_methods
from gex.attribution import Attributor, build_method, register
from gex.data import DataConfig, NoiseConfig, load_data
from gex.grads import iter_grad_chunks, loss_grad
from gex.losses import per_sample_loss

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
JOBS = {"detect": detect, "relabel": relabel, "prune": prune, "separate": separate}
TOL_CE = 1e-6          # RDIA identity: the 1e-12 guards move the cross-entropy by far less than this
SEP_DATA = ["data.n_train=200", "data.n_test=100"]   # the smoke preset's sizes also apply to data=mixed

register_methods()


@register("first_order_test")
class FirstOrder(Attributor):
    """Test-only first-order influence g_train . g_test at theta*: positive = one SGD step on the training sample
    lowers the test loss (a proponent), the sign every pairwise method must have."""

    def influence(self, train, test):
        task = self._require_fit()
        g_test = torch.cat([g for _, g in iter_grad_chunks(task.model, test, task.loss)])
        g_train = torch.cat([g for _, g in iter_grad_chunks(task.model, train, task.loss)])
        return g_train @ g_test.T

    def influence_on_mean_test(self, train, test):
        task = self._require_fit()
        g_mean = loss_grad(task.model, test, task.loss)
        return torch.cat([g @ g_mean for _, g in iter_grad_chunks(task.model, train, task.loss)])

    def self_influence(self, data):
        task = self._require_fit()
        return torch.cat([(g * g).sum(1) for _, g in iter_grad_chunks(task.model, data, task.loss)])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One artefact cache for the module: each smoke theta* is trained once."""
    return tmp_path_factory.mktemp("cache")


def _cfg(job: str, cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(job, overrides=["experiment=smoke", "logger=none", f"paths.cache={cache}", *overrides])


def _run(job: str, cache: Path, run_dir: Path, *overrides: str) -> dict:
    cfg = _cfg(job, cache, *overrides)
    logger = RunLogger(cfg, run_dir, job)
    try:
        return JOBS[job].run(cfg, run_dir, logger)
    finally:
        logger.finish()


REQUIRED = {
    "detect": ["auroc", "ap", "found_at_5", "found_at_10", "found_at_20", "noise_rate_realized", "noisy_fit"],
    "relabel": ["test_acc", "test_acc_no_relabel", "flag_precision", "flag_recall", "n_flagged"],
    "prune": [f"{p}test_acc_at_{pct}" for p in ("", "random.") for pct in (0, 10, 20, 30, 40)],
    "separate": ["auroc", "ap", "minority_test_acc_weighted", "minority_test_acc_uniform"],
}
SCORES = {"detect": "is_noisy", "relabel": "flagged", "prune": "prune_order", "separate": "is_minority"}
FIGURE = {"detect": "self_influence_hist", "relabel": "relabel_bars", "prune": "pruning_curves",
          "separate": "self_influence_hist"}
EXTRA = {"detect": [], "relabel": [], "prune": [], "separate": ["task.cross=false", *SEP_DATA]}


@pytest.mark.parametrize("job", list(JOBS))
def test_each_task_runs_end_to_end_and_method_free_rows_agree(job, cache, tmp_path):
    runs = {m: _run(job, cache, tmp_path / m, f"method={m}", *EXTRA[job]) for m in ("loss", "random")}
    for method, metrics in runs.items():
        stored = json.loads((tmp_path / method / "metrics.json").read_text())
        for key in REQUIRED[job] + ["wall_s_fit", "wall_s_score", "peak_mem_mb", "noise_rate", "seed", "torch"]:
            assert math.isfinite(stored[key]) if not isinstance(stored[key], str) else stored[key], key
        for key in REQUIRED[job]:
            assert key == "n_flagged" or 0.0 <= stored[key] <= 1.0, (key, stored[key])
        assert (stored["method"], stored["task"], stored["noise_kind"]) == (method, job, metrics["noise_kind"])
        scores = torch.load(tmp_path / method / "scores.pt")
        assert scores["self_influence"].shape == scores[SCORES[job]].shape == (int(stored["n_train"]),)
        assert (tmp_path / method / f"{FIGURE[job]}.png").stat().st_size > 0
    method_free = {"relabel": ["test_acc_no_relabel"], "prune": REQUIRED["prune"][5:] + ["test_acc_at_0"],
                   "separate": ["minority_test_acc_uniform"]}.get(job, [])
    for key in method_free:  # cached by theta*'s spec: the second method reuses the first one's retrain
        assert runs["loss"][key] == runs["random"][key], key
    if job == "prune":
        assert runs["loss"]["noise_kind"] == "none"
    if job == "separate":
        assert runs["loss"]["data"] == "mixed"


def test_detect_merges_gex_diagnostics_and_cross_scores(cache, tmp_path):
    metrics = _run("detect", cache, tmp_path / "self", "method=gex")
    assert {"member_loss_noisy", "member_loss_clean"} <= set(metrics)
    cross = _run("detect", cache, tmp_path / "cross", "method=gex", "task.score=cross")
    assert cross["score_kind"] == "cross" and 0.0 <= cross["auroc"] <= 1.0
    assert "cross_score" in torch.load(tmp_path / "cross" / "scores.pt")


def test_relabel_modes_drop_and_oracle(cache, tmp_path):
    drop = _run("relabel", cache, tmp_path / "drop", "method=loss", "task.mode=drop")
    oracle = _run("relabel", cache, tmp_path / "oracle", "method=random", "task.mode=oracle")
    assert drop["relabel_mode"] == "drop" and 0.0 <= drop["test_acc"] <= 1.0
    assert 0.0 <= oracle["test_acc"] <= 1.0
    assert drop["test_acc_no_relabel"] == oracle["test_acc_no_relabel"]


# ---------------------------------------------------------------------------------------------- pipeline pieces


def test_otsu_flags_exactly_the_high_mode_of_a_bimodal_vector():
    gen = torch.Generator().manual_seed(0)
    low, high = torch.randn(90, generator=gen) * 0.1, 5.0 + torch.randn(10, generator=gen) * 0.1
    scores = torch.cat([low, high])[torch.randperm(100, generator=gen)]
    flags, threshold = otsu_flags(scores)
    assert torch.equal(flags, scores > 2.5) and int(flags.sum()) == 10
    assert float(low.max()) < threshold < float(high.min())


def test_rdia_soft_target_cross_entropy_equals_minus_log_one_minus_p_y():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 10, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (64,), generator=gen)
    probs = logits.softmax(-1)
    targets = rdia_targets(probs, y)
    ce = per_sample_loss(logits, y, "ce", targets)
    expected = -torch.log1p(-probs.gather(1, y[:, None]).squeeze(1))
    assert torch.allclose(ce, expected, rtol=0, atol=TOL_CE)
    assert torch.all(targets.gather(1, y[:, None]) == 0) and torch.all(targets >= 0)


def test_relabeled_data_changes_only_what_each_mode_says():
    bundle = load_data(DataConfig(name="digits", n_train=60, n_test=20), NoiseConfig(rate=0.3), 0)
    train, k = bundle.train, bundle.train.num_classes
    probs = torch.rand(60, k, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).softmax(-1)
    flags = torch.zeros(60, dtype=torch.bool)
    flags[::7] = True
    rdia = relabeled_data("rdia", train, probs, flags, "ce")
    assert torch.equal(rdia.targets[~flags], torch.nn.functional.one_hot(train.y[~flags], k).float())
    assert torch.allclose(rdia.targets[flags].double(), rdia_targets(probs, train.y)[flags], atol=1e-6)
    bce = relabeled_data("rdia", train, probs, flags, "bce")
    assert torch.allclose(bce.targets[flags].double(), probs[flags], atol=1e-6)
    assert len(relabeled_data("drop", train, probs, flags, "ce")) == 60 - int(flags.sum())
    assert torch.equal(relabeled_data("oracle", train, probs, flags, "ce").y, train.y_clean)
    assert torch.allclose(relabeled_data("soft_all", train, probs, flags, "ce").targets.double(), probs, atol=1e-6)


def test_an_unchanged_retrain_reproduces_theta_star():
    """Same initialization, data order and recipe: the no-change reference retrain is pretraining itself (CPU)."""
    task = make_task(n_train=100, n_test=40, epochs=2)
    assert retrain_test_acc(task, task.train, task.recipe, task.test) == accuracy(task.model, task.test)
    shorter = retrain_recipe(task.recipe, 1)
    assert (shorter.epochs, shorter.steps, shorter.lr) == (1, None, task.recipe.lr)


def test_the_unchanged_retrain_with_the_pretraining_recipe_is_theta_star_without_training(monkeypatch):
    from experiments import retrain as tasks
    task = make_task(n_train=100, n_test=40, epochs=2)
    calls = []
    real_train = tasks.train
    monkeypatch.setattr(tasks, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    assert unchanged_test_acc(task, task.recipe, task.test, "test") == accuracy(task.model, task.test)
    assert not calls                                      # the previous test shows the retrain would be theta*
    unchanged_test_acc(task, retrain_recipe(task.recipe, 1), task.test, "test")
    unchanged_test_acc(task, task.recipe, task.test, "test", replicate=1)
    assert len(calls) == 2                                # another recipe or another data order does train


def test_retrains_are_cached_by_what_they_see_so_an_interrupted_task_resumes(tmp_path, monkeypatch):
    from experiments import retrain as tasks
    from gex.runs import ArtifactCache
    task = make_task(n_train=100, n_test=40, epochs=2)
    task.cache, task.cache_spec = ArtifactCache(tmp_path / "cache"), {"theta": "star"}
    calls = []
    real_train = tasks.train
    monkeypatch.setattr(tasks, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    first = retrain_test_acc(task, task.train.subset(torch.arange(80)), task.recipe, task.test)
    again = retrain_test_acc(task, task.train.subset(torch.arange(80)), task.recipe, task.test)
    assert len(calls) == 1 and again == first  # the second run of the same retrain is read back
    flipped = task.train.with_labels(torch.where(torch.arange(100) == 3, (task.train.y + 1) % 10, task.train.y))
    retrain_test_acc(task, flipped.subset(torch.arange(80)), task.recipe, task.test)        # one label differs
    retrain_test_acc(task, task.train.subset(torch.arange(80).flip(0)), task.recipe, task.test)  # another order
    retrain_test_acc(task, task.train.subset(torch.arange(80)), task.recipe, task.test.subset(torch.arange(20)))
    assert len(calls) == 4


def test_prune_averages_replicate_retrains_that_differ_only_in_data_order(tmp_path, monkeypatch):
    """``task.retrains=2``: every point (pruned, random, unpruned) is the mean of two retrains from theta*'s init,
    the second with another data order; replicate 0 is the single-retrain run's retrain (shared cache)."""
    from experiments import retrain as tasks
    from gex.runs import ArtifactCache
    task = make_task(n_train=100, n_test=40, epochs=2)
    task.cache, task.cache_spec = ArtifactCache(tmp_path / "cache"), {"theta": "star"}
    seeds = []
    real_train = tasks.train
    monkeypatch.setattr(tasks, "train", lambda *a, **k: seeds.append(k["seed"]) or real_train(*a, **k))
    scores = torch.linspace(0, 1, 100)
    recipe = retrain_recipe(task.recipe, 1)  # not the pretraining recipe, so the unchanged point retrains too
    single = prune._curves(task, scores, PruneConfig(fractions=[0.2], retrains=1), recipe)
    assert sorted(seeds) == [task.seed] * 3 and "test_acc_at_20_std" not in single
    seeds.clear()
    double = prune._curves(task, scores, PruneConfig(fractions=[0.2], retrains=2), recipe)
    assert seeds == [task.seed * 1000 + 1] * 3      # only the new replicates train; replicate 0 is read back
    for name in ("test_acc_at_0", "test_acc_at_20", "random.test_acc_at_20"):
        assert double[f"{name}_std"] >= 0
        second = 2 * double[name] - single[name]     # mean of two = (first + second) / 2
        assert abs(second - single[name]) == pytest.approx(double[f"{name}_std"] * 2 ** 0.5, abs=1e-9)
    with pytest.raises(ValueError, match="task.retrains=0 must be a positive integer"):
        PruneConfig(retrains=0)


def test_tensor_digests_tell_contents_order_dtype_and_none_apart():
    from gex.runs import tensors_digest
    a = torch.arange(6)
    assert tensors_digest(a, None) == tensors_digest(torch.arange(6), None)
    others = [tensors_digest(a.flip(0), None), tensors_digest(a.double(), None), tensors_digest(a.view(2, 3), None),
              tensors_digest(a, a), tensors_digest(a), tensors_digest(torch.zeros(0)), tensors_digest(a, None, None)]
    assert len({tensors_digest(a, None), *others}) == 1 + len(others)


def test_pruning_removes_exactly_the_lowest_scores():
    scores = torch.randperm(50, generator=torch.Generator().manual_seed(3)).double()
    kept = prune_rows(scores, 0.3, seed=0)
    assert torch.equal(kept, torch.nonzero(scores >= 15).squeeze(1))


def test_pruning_breaks_integer_ties_deterministically_without_index_order():
    scores = torch.tensor([2, 0, 1, 1, 1, 1, 0, 2, 1, 1], dtype=torch.float64)  # remove 4: both 0s and two of six 1s
    choices = set()
    for seed in range(6):
        kept = prune_rows(scores, 0.4, seed=seed)
        assert torch.equal(kept, prune_rows(scores, 0.4, seed=seed))
        assert len(kept) == 6 and {0, 7} <= set(kept.tolist()) and not {1, 6} & set(kept.tolist())
        choices.add(tuple(kept.tolist()))
    assert len(choices) > 1  # the tie-break is a seeded random key, not the row index


def test_random_pruning_is_seeded_and_exact():
    kept = random_prune_rows(100, 0.25, seed=4)
    assert len(kept) == 75 == len(set(kept.tolist())) and torch.equal(kept, random_prune_rows(100, 0.25, seed=4))
    assert not torch.equal(kept, random_prune_rows(100, 0.25, seed=5))


def test_found_at_equals_a_brute_force_count():
    rng = np.random.default_rng(5)
    scores = torch.as_tensor(rng.integers(0, 8, 200), dtype=torch.float64)  # many ties
    positive = torch.as_tensor(rng.random(200) < 0.15)
    tie = np.random.default_rng([7, 0x71E]).uniform(0.0, 0.5, 200)
    brute_order = sorted(range(200), key=lambda i: (-float(scores[i]), tie[i]))
    assert ranking_order(scores, seed=7).tolist() == brute_order
    for frac in (0.05, 0.1, 0.2):
        k = round(frac * 200)
        expected = sum(bool(positive[i]) for i in brute_order[:k]) / int(positive.sum())
        assert found_at(scores, positive, frac, seed=7) == pytest.approx(expected, abs=1e-12)


def test_detection_by_fit_scores_each_noisy_group_against_the_clean_samples():
    # clean scores 1, 2, 3; fitted noisy 2.5 and 0 (beats 2 of 3 and 0 of 3); unfitted noisy 5 (beats all 3)
    scores = torch.tensor([1.0, 2.0, 3.0, 2.5, 0.0, 5.0])
    noisy = torch.tensor([False, False, False, True, True, True])
    fitted = torch.tensor([True, True, False, True, True, False])
    out = detection_by_fit(scores, noisy, fitted)
    assert out == {"auroc_noisy_fit": pytest.approx(2 / 6), "auroc_noisy_unfit": pytest.approx(1.0)}
    assert set(detection_by_fit(scores, noisy, torch.zeros(6, dtype=torch.bool))) == {"auroc_noisy_unfit"}


def test_the_mixture_has_the_stated_minority_fraction():
    bundle = load_data(DataConfig(name="mixed", minority_frac=0.1), NoiseConfig(kind="none", rate=0.0), 0)
    is_min = bundle.train.extra["is_minority"]
    assert abs(float(is_min.double().mean()) - 0.1) <= 1.0 / len(is_min)
    assert bool(bundle.test.extra["is_minority"].all()) and bundle.noise_rate_realized == 0.0


def test_separate_ranks_minority_proponents_by_plus_influence(cache, tmp_path):
    """On a mixture, first-order influence g_train . g_minority_test is larger for minority training samples: with
    the documented +influence ranking auroc_cross > 0.5 (a flipped sign would give 1 - auroc_cross < 0.5)."""
    metrics = _run("separate", cache, tmp_path / "s", "method=random", "method.name=first_order_test", *SEP_DATA)
    assert metrics["auroc_cross"] > 0.6 and metrics["upweight_by"] == "cross"
    scores = torch.load(tmp_path / "s" / "scores.pt")
    minority = scores["is_minority"]
    assert scores["cross_influence"][minority].mean() > scores["cross_influence"][~minority].mean()


def test_pairwise_support_is_known_before_fit():
    assert has_pairwise(build_method("gex")) and has_pairwise(FirstOrder())
    assert not has_pairwise(build_method("loss")) and not has_pairwise(build_method("gex_mean_loss"))


def test_prune_fractions_are_validated():
    with pytest.raises(ValueError, match=r"task.fractions contains 1.5: each fraction removed must lie in \(0, 1\)"):
        PruneConfig(fractions=[0.1, 1.5])
    with pytest.raises(ValueError, match=r"repeats an integer percent"):
        PruneConfig(fractions=[0.1, 0.101])


# ------------------------------------------------------------------------------------------------- bad input

def _entry(job: str, cache: Path, run_dir: Path, monkeypatch, *overrides: str) -> None:
    """Call the Hydra wrapper as ``python -m experiments.<job>`` would, with ``run_dir`` as the run directory."""
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(
        runtime=SimpleNamespace(output_dir=str(run_dir)))))
    entry_point(job)(JOBS[job].run)(_cfg(job, cache, *overrides))


@pytest.mark.parametrize("job,overrides,message", [
    ("detect", ["method.name=nope"], r"method='nope' is unknown; valid choices: \[.*'loss'"),
    ("separate", ["method=loss", *SEP_DATA], r"task.cross=true needs pairwise influence.*set task.cross=false"),
    ("detect", ["method=random", "task.score=cross"], r"task.score=cross needs pairwise influence"),
    ("separate", ["method.name=gex_mean_loss", *SEP_DATA], r"method=gex_mean_loss does not have; set task.cross"),
    ("prune", ["method=loss", "task.fractions=[0.2,1.0]"], r"task.fractions contains 1.0"),
    ("prune", ["method=loss", "task.fractions=[0]"], r"task.fractions contains 0"),
    ("detect", ["method=loss", "task=prune"], r"task='prune' does not fit python -m experiments.detect"),
    ("detect", ["method=loss", "noise=none"], r"task=detect needs mislabeled samples"),
    ("relabel", ["method=loss", "task.mode=magic"], r"task.mode='magic' is unknown; valid choices"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(job, overrides, message, cache, tmp_path, monkeypatch,
                                                         capsys):
    fresh_cache = tmp_path / "fresh_cache"
    cache_dir = fresh_cache if job == "prune" else cache  # an impossible fraction must fail before pretraining
    with pytest.raises(SystemExit) as exit_info:
        _entry(job, cache_dir, tmp_path / "run", monkeypatch, *overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "run").exists()
    assert not fresh_cache.exists()


def test_a_finished_run_with_another_config_is_refused_and_kept(cache, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    _entry("detect", cache, run_dir, monkeypatch, "method=loss")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        _entry("detect", cache, run_dir, monkeypatch, "method=random")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a finished run with a different config" in err[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_command_line_error_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.prune", "experiment=smoke", "logger=none",
                           "method=loss", "task.fractions=[0.5,1.2]", "threads=1", f"paths.cache={tmp_path / 'cache'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "GEX_QUIET": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: task.fractions contains 1.2: each fraction removed must lie in (0, 1)"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("job", ["prune", "separate", "relabel"])
def test_every_task_records_the_clamp_diagnostics_of_gex(tmp_path, job):
    """Not only detection: a GEX run of any task records the share of samples its clamp inverts."""
    from hydra import compose, initialize_config_dir
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    extra = {"prune": ["task.fractions=[0.2]", "task.retrain_epochs=1"],
             "separate": ["data=mixed", "data.n_train=200", "task.retrain_epochs=1"],
             "relabel": ["task.retrain_epochs=1"]}[job]
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose(job, overrides=["experiment=smoke", "logger=none", f"paths.cache={tmp_path / 'cache'}",
                                      "method.reference=clamped", *extra])
    module = __import__(f"experiments.{job}", fromlist=["run"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = module.run(cfg, run_dir, RunLogger(cfg, run_dir, job))
    assert 0.0 <= metrics["frac_clamp_inverted"] <= 1.0 and metrics["tau"] == 0.05
