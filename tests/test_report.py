"""experiments.report on a synthetic tree of run records written here (no training): statistics against
hand-computed values, exclusions, best marking, every output format, and the Hydra entry point end to end."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from experiments import report
from experiments.scaffold import UsageError

TOL = 1e-12          # float64 sums of a few numbers
ROOT = Path(__file__).resolve().parents[1]
ENTRY_TIMEOUT_S = 120


def write_run(root: Path, name: str, *, task: str, method: str, seed: int, metrics: dict, data: str = "digits",
              rate: float = 0.1, method_opts: dict | None = None, scores: dict | None = None,
              config: dict | None = None, finished: bool = True) -> Path:
    """One run record as the entry points write it: config.yaml (resolved), metrics.json, optional scores.pt."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = {"data": {"name": data, "root": "data", "n_train": 300}, "noise": {"kind": "symmetric", "rate": rate},
           "model": {"name": "mlp"}, "train": {"epochs": 30}, "method": {"name": method, **(method_opts or {})},
           "task": {"name": task}, "seed": seed, "device": "auto", "paths": {"cache": "cache"},
           "logger": {"mode": "disabled"}} | (config or {})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    if scores is not None:
        torch.save(scores, run_dir / "scores.pt")
    if finished:
        record = {"method": method, "data": data, "task": task, "seed": float(seed), "git": "abc1234",
                  "torch": torch.__version__} | metrics
        (run_dir / "metrics.json").write_text(json.dumps(record))
    return run_dir


def _detect_scores(seed: int, n: int = 60) -> dict:
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[: n // 6] = True
    return {"self_influence": torch.rand(n, generator=gen) + 2.0 * noisy, "is_noisy": noisy}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """Detect (2 methods x 3 seeds + 4 bad runs), relabel, prune, toy, groundtruth, bench and an unknown task."""
    root = tmp_path / "runs"
    for seed, (g, t) in enumerate([(0.8, 0.70), (0.9, 0.75), (1.0, 0.80)]):
        write_run(root, f"detect/gex_{seed}", task="detect", method="gex", seed=seed,
                  metrics={"auroc": g, "ap": g - 0.1, "wall_s_fit": 10.0 + seed, "wall_s_score": 1.0,
                           "peak_mem_mb": 100.0}, scores=_detect_scores(seed) if seed == 0 else None)
        write_run(root, f"detect/tracin_{seed}", task="detect", method="tracin", seed=seed,
                  metrics={"auroc": t, "ap": t - 0.2, "wall_s_fit": 2.0, "wall_s_score": 0.5, "peak_mem_mb": 50.0},
                  scores=_detect_scores(seed) if seed == 0 else None)
    dup = root / "detect" / "gex_0_again"
    shutil.copytree(root / "detect" / "gex_0", dup)
    (dup / "metrics.json").write_text(json.dumps(json.loads((dup / "metrics.json").read_text()) | {"auroc": 0.0}))
    os.utime(dup / "metrics.json", (1e9, 1e9))  # older: the report keeps the newer copy
    write_run(root, "detect/crashed", task="detect", method="gex", seed=7, metrics={}, finished=False)
    write_run(root, "detect/no_ap", task="detect", method="gex", seed=8, metrics={"auroc": 0.0})
    write_run(root, "detect/old_config", task="detect", method="gex", seed=9, metrics={"auroc": 0.0, "ap": 0.0},
              config={"config_version": 0})
    for seed, method in itertools.product(range(2), ["gex", "el2n"]):
        write_run(root, f"relabel/{method}_{seed}", task="relabel", method=method, seed=seed,
                  metrics={"test_acc": 0.8 + 0.01 * seed + (0.05 if method == "gex" else 0.0),
                           "test_acc_no_relabel": 0.5 + 0.1 * seed})
    for seed, method in itertools.product(range(2), ["gex", "el2n"]):
        acc = {f"test_acc_at_{p}": 0.9 - p / 100 - (0.02 if method == "el2n" else 0.0) for p in (10, 20, 40)}
        write_run(root, f"prune/{method}_{seed}", task="prune", method=method, seed=seed, rate=0.0,
                  metrics=acc | {f"random.test_acc_at_{p}": 0.6 + 0.1 * seed for p in (10, 20, 40)},
                  config={"noise": {"kind": "none", "rate": 0.0}})
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
    toy = {f"{m}.self_influence": x.norm(dim=1) * (i + 1) for i, m in enumerate(["loo", "gex"])}
    write_run(root, "toy/0", task="toy", method="gex", seed=0, data="two_circles", rate=0.0,
              metrics={"loo.auroc": 1.0, "loo.ap": 1.0, "gex.auroc": 0.99, "gex.ap": 0.95, "gex.spearman_loo": 0.9,
                       "if_exact.auroc": 0.9, "if_exact.ap": 0.8},
              scores=toy | {"x": x, "is_influential": x.norm(dim=1) < 0.5}, config={"noise": {"kind": "none"}})
    write_run(root, "groundtruth/0", task="groundtruth", method="gex", seed=0, metrics={
        "gex.lds": 0.3, "gex.lds_ci_low": 0.2, "gex.lds_ci_high": 0.4, "tracin.lds": 0.1},
        scores={"gex.predicted": torch.arange(10.0), "gex.measured": torch.arange(10.0) ** 2})
    write_run(root, "bench/0", task="bench", method="gex", seed=0, metrics={
        "gex.wall_s": 10.0, "gex.peak_mem_mb": 300.0, "gex.samples_per_s": 100.0,
        "tracin.wall_s": 5.0, "tracin.peak_mem_mb": 400.0, "tracin.samples_per_s": 50.0})
    write_run(root, "custom/0", task="custom", method="gex", seed=0, metrics={"score": 1.5})
    return root


def test_bootstrap_ci_hand_computed():
    """Seeds 0.8, 0.9, 1.0: P(resampled mean = 0.8) = 1/27 > 2.5%, so the 95% interval is exactly [0.8, 1.0]."""
    low, high = report.bootstrap_ci([0.8, 0.9, 1.0], resamples=20000, level=0.95, seed=0)
    assert low == pytest.approx(0.8, abs=TOL) and high == pytest.approx(1.0, abs=TOL)
    assert report.bootstrap_ci([0.8, 0.9, 1.0], 500, 0.95, 3) == report.bootstrap_ci([0.8, 0.9, 1.0], 500, 0.95, 3)
    assert report.bootstrap_ci([0.7], 100) == (0.7, 0.7)
    assert all(np.isnan(report.bootstrap_ci([], 100)))


def test_bootstrap_ci_matches_exact_enumeration():
    """All 4^4 equally likely resamples of 4 values give the exact quantiles the bootstrap must approach."""
    values = np.array([0.1, 0.2, 0.4, 0.9])
    means = np.sort([np.mean(c) for c in itertools.product(values, repeat=4)])
    cdf = np.arange(1, len(means) + 1) / len(means)
    for level in (0.5, 0.9):
        exact = [means[np.searchsorted(cdf, q)] for q in ((1 - level) / 2, (1 + level) / 2)]
        got = report.bootstrap_ci(values, resamples=50000, level=level, seed=1)
        # the quantiles fall inside a run of equal resample means, so the sampled quantile is the exact atom
        assert got == pytest.approx(exact, abs=0.02), (level, got, exact)
        assert values.min() <= got[0] <= values.mean() <= got[1] <= values.max()


@pytest.mark.parametrize("kw, match", [({"level": 1.5}, r"ci=1\.5 is invalid"),
                                       ({"resamples": 0}, r"bootstrap=0 is invalid")])
def test_bootstrap_ci_rejects_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        report.bootstrap_ci([0.1, 0.2], **kw)


def test_load_runs_excludes_and_reports(tree: Path):
    frame, problems = report.load_runs(tree)
    text = "\n".join(problems)
    assert f"incomplete: {tree / 'detect/crashed'}: no metrics.json" in text
    assert f"incomplete: {tree / 'detect/no_ap'}: task detect misses metric(s) ap" in text
    assert f"duplicate: {tree / 'detect/gex_0_again'} has the same config and seed as {tree / 'detect/gex_0'}" in text
    assert f"config version: {tree / 'detect/old_config'} has config_version=0" in text
    paths = set(frame["path"])
    assert not {str(tree / p) for p in ("detect/crashed", "detect/no_ap", "detect/gex_0_again",
                                        "detect/old_config")} & paths
    assert (frame["task"] == "detect").sum() == 6 and len(frame) == 6 + 4 + 4 + 4
    row = frame[frame["path"] == str(tree / "detect/gex_1")].iloc[0]
    assert (row["setting"], row["variant"], row["seed"], row["auroc"], row["git"]) == \
        ("digits symmetric 0.1", "gex", 1, 0.9, "abc1234")
    assert frame[frame["task"] == "prune"]["setting"].unique().tolist() == ["digits"]


def test_git_mismatch_is_info_only(tree: Path):
    metrics = tree / "detect/gex_2/metrics.json"
    metrics.write_text(json.dumps(json.loads(metrics.read_text()) | {"git": "fff0000"}))
    frame, problems = report.load_runs([str(tree / "detect" / "*")])
    assert str(tree / "detect/gex_2") in set(frame["path"])
    assert any(p.startswith("info: runs come from several git revisions") and "fff0000: 1 runs" in p
               for p in problems)


def _stats(tree: Path, resamples: int = 1000):
    frame, _ = report.load_runs(tree)
    pooled = report._map_references(report.pool_seeds(report.long_metrics(frame)))
    return report.summarize(pooled, resamples, 0.95, 0)


def test_mean_std_interval_hand_computed(tree: Path):
    stats = _stats(tree).set_index(["task", "method", "metric"])
    gex = stats.loc["detect", "gex", "auroc"]   # seeds 0.8, 0.9, 1.0; the duplicate's 0.0 is left out
    assert gex["n"] == 3 and gex["mean"] == pytest.approx(0.9, abs=TOL)
    # sample std (ddof=1): sqrt(((0.8-0.9)^2 + 0 + (1.0-0.9)^2) / (3-1)) = 0.1
    assert gex["std"] == pytest.approx(0.1, abs=TOL)
    assert 0.8 - TOL <= gex["ci_low"] <= 0.9 <= gex["ci_high"] <= 1.0 + TOL
    # a reference that every method's run measured counts once per seed: no relabel = mean(0.5, 0.6), n = 2
    ref = stats.loc["relabel", "no relabel", "test_acc"]
    assert (ref["n"], ref["mean"], ref["std"]) == (2, pytest.approx(0.55, abs=TOL), pytest.approx(0.1 / 2**0.5))
    rnd = stats.loc["prune", "random", "test_acc_at_20"]
    assert (rnd["n"], rnd["mean"]) == (2, pytest.approx(0.65, abs=TOL))
    assert stats.loc["toy", "loo", "auroc"]["mean"] == 1.0 and np.isnan(stats.loc["toy", "loo", "auroc"]["std"])


def test_best_marking_max_and_min(tree: Path):
    stats = _stats(tree)
    detect = report.build_table(stats, "detect")
    assert [label for *_, label in detect.columns] == ["auroc", "ap"]
    assert detect.cells["gex", "auroc"].best and not detect.cells["tracin", "auroc"].best
    bench = report.build_table(stats, "bench")
    assert bench.cells["tracin", "wall_s"].best and not bench.cells["gex", "wall_s"].best       # min is best
    assert bench.cells["gex", "peak_mem_mb"].best and bench.cells["gex", "samples_per_s"].best
    md, tex = report.render_markdown(bench), report.render_latex(bench)
    assert [label for *_, label in bench.columns] == ["wall_s", "peak_mem_mb", "samples_per_s"]
    assert "| gex | 10.0 | **300.0** | **100.0** |" in md and "| tracin | **5.0** | 400.0 | 50.0 |" in md
    assert r"\textbf{5.0}" in tex and r"peak\_mem\_mb" in tex


def test_table_layouts(tree: Path):
    stats = _stats(tree)
    prune = report.build_table(stats, "prune")
    assert [label for *_, label in prune.columns] == ["10%", "20%", "40%"]     # numeric, not text order
    assert prune.rows[-1] == "random"                                             # references last
    first = prune.columns[0][2]                                                   # best first in the 10% column
    assert prune.cells[prune.rows[0], first].mean > prune.cells[prune.rows[1], first].mean
    relabel = report.build_table(stats, "relabel")
    assert relabel.rows == ["gex", "el2n", "no relabel"] and relabel.cells["gex", "test_acc"].best
    gt = report.build_table(stats, "groundtruth")
    cell = gt.cells["gex", "lds"]      # one seed: the run's own interval over test samples is shown
    assert (cell.n, cell.low, cell.high) == (1, 0.2, 0.4)
    assert "| gex | **0.3000** [0.2000, 0.4000] |" in report.render_markdown(gt)
    toy = report.build_table(stats, "toy")    # leave-one-out is the ground truth, not a competitor: never bold
    assert toy.rows == ["gex", "if_exact", "loo"] and toy.cells["gex", "auroc"].best and not toy.cells["loo", "auroc"].best
    custom = report.build_table(stats, "custom")
    assert custom.title == "custom (generic)" and custom.cells["gex", "score"].mean == 1.5
    detect = report.build_table(stats, "detect")
    assert "| gex | **0.9000 ± 0.1000** [" in report.render_markdown(detect)
    tex = report.render_latex(detect)
    assert r"\textbf{0.9000 $\pm$ 0.1000} {\scriptsize [" in tex and "textbackslash" not in tex
    with pytest.raises(ValueError, match="task='nothing' has no metrics"):
        report.build_table(stats, "nothing")


def test_method_variants_are_not_averaged(tmp_path: Path):
    for seed, members in itertools.product(range(2), (8, 32)):
        write_run(tmp_path, f"m{members}_{seed}", task="detect", method="gex", seed=seed,
                  metrics={"auroc": members / 100, "ap": 0.5}, method_opts={"num_members": members})
    write_run(tmp_path, "other_lr", task="detect", method="gex", seed=0, metrics={"auroc": 0.1, "ap": 0.1},
              method_opts={"num_members": 8}, config={"train": {"epochs": 5}})
    frame, problems = report.load_runs(tmp_path)
    assert problems == []
    assert sorted(set(frame["variant"])) == ["gex", "gex (num_members=32)", "gex (num_members=8)"]
    assert sorted(set(frame["setting"])) == ["digits symmetric 0.1 train.epochs=30",
                                             "digits symmetric 0.1 train.epochs=5"]
    for mode in ("otsu", "oracle"):   # a task option is a row (how the method is applied), not a setting
        write_run(tmp_path / "relabel", mode, task="relabel", method="gex", seed=0,
                  metrics={"test_acc": 0.9, "test_acc_no_relabel": 0.8}, config={"task": {"name": "relabel",
                                                                                         "mode": mode}})
    frame, _ = report.load_runs(tmp_path / "relabel")
    assert sorted(frame["variant"]) == ["gex (task.mode=oracle)", "gex (task.mode=otsu)"]
    assert set(frame["setting"]) == {"digits symmetric 0.1"}


def test_rows_are_ranked_by_the_first_column_that_tells_them_apart(tmp_path: Path):
    """Prune's 0% column is the same unpruned retrain for every method: the ranking falls to the next column; a
    time column ranks lowest first; a method without a value in the ranking column comes after the ranked ones."""
    for method, acc0, acc20, seed in (("a", 0.9, 0.80, 0), ("b", 0.9, 0.85, 0), ("c", 0.9, 0.70, 0)):
        write_run(tmp_path, method, task="prune", method=method, seed=seed,
                  metrics={"test_acc_at_0": acc0, "test_acc_at_20": acc20, "random.test_acc_at_20": 0.82})
    assert report.build_table(_stats(tmp_path), "prune").rows == ["b", "a", "c", "random"]
    spec = report.TableSpec("cost", ("wall_s", "peak_mem_mb"))
    for method, wall in (("a_slow", 9.0), ("z_fast", 1.0)):
        write_run(tmp_path / "bench", method, task="cost", method=method, seed=0,
                  metrics={"wall_s": wall, "peak_mem_mb": 5.0})
    write_run(tmp_path / "bench", "nowall", task="cost", method="nowall", seed=0, metrics={"peak_mem_mb": 1.0})
    assert report.build_table(_stats(tmp_path / "bench"), "cost", spec).rows == ["z_fast", "a_slow", "nowall"]


def test_an_oracle_relabel_run_is_the_unranked_oracle_row(tmp_path: Path):
    """``task.mode=oracle`` retrains on the true labels whatever the method: its row is ``oracle``, never bold."""
    flags = {"flag_precision": 0.9, "flag_recall": 0.2, "n_flagged": 199}
    write_run(tmp_path, "gex", task="relabel", method="gex", seed=0,
              metrics={"test_acc": 0.87, "test_acc_no_relabel": 0.86, "relabel_mode": "rdia"} | flags)
    write_run(tmp_path, "oracle", task="relabel", method="loss", seed=0,
              metrics={"test_acc": 0.90, "test_acc_no_relabel": 0.86, "relabel_mode": "oracle"} | flags)
    frame, _ = report.load_runs(tmp_path)
    assert sorted(frame["variant"]) == ["gex", "oracle"]
    table = report.build_table(_stats(tmp_path), "relabel")
    assert "oracle" in table.rows and not table.cells["oracle", "test_acc"].best
    assert table.cells["gex", "test_acc"].best
    # the loss flags the oracle run computed on the way never reach the table: its retrain ignores them
    assert table.cells["gex", "flag_precision"].mean == 0.9 and ("oracle", "flag_precision") not in table.cells


def test_a_config_field_added_later_does_not_split_older_runs(tmp_path: Path):
    """Runs made before a field existed (no key) pool with newer runs that have it; differing values still split."""
    write_run(tmp_path, "old", task="detect", method="gex", seed=0, metrics={"auroc": 0.9, "ap": 0.5})
    write_run(tmp_path, "new", task="detect", method="gex", seed=1, metrics={"auroc": 0.8, "ap": 0.5},
              method_opts={"batch_members": 1}, config={"train": {"epochs": 30, "compile": False}})
    frame, _ = report.load_runs(tmp_path)
    assert set(frame["setting"]) == {"digits symmetric 0.1"} and set(frame["variant"]) == {"gex"}
    write_run(tmp_path, "newer", task="detect", method="gex", seed=2, metrics={"auroc": 0.7, "ap": 0.5},
              method_opts={"batch_members": 4}, config={"train": {"epochs": 30, "compile": True}})
    frame, _ = report.load_runs(tmp_path)
    assert sorted(set(frame["setting"])) == ["digits symmetric 0.1 train.compile=False",
                                             "digits symmetric 0.1 train.compile=None",
                                             "digits symmetric 0.1 train.compile=True"]


def test_a_model_option_left_at_its_default_is_a_setting_of_its_own(tmp_path: Path):
    """``model.options`` is free-form: a run without ``hidden`` used the default head, not an older config, so the
    full-data runs with and without a wider head are two settings (not pooled into one mean)."""
    write_run(tmp_path, "default_head", task="detect", method="el2n", seed=0, metrics={"auroc": 0.9951, "ap": 0.96},
              config={"model": {"name": "mlp", "options": {}}})
    write_run(tmp_path, "wide_head", task="detect", method="el2n", seed=0, metrics={"auroc": 0.9954, "ap": 0.96},
              config={"model": {"name": "mlp", "options": {"hidden": 512}}})
    frame, _ = report.load_runs(tmp_path)
    assert sorted(set(frame["setting"])) == ["digits symmetric 0.1 model.options.hidden=512",
                                             "digits symmetric 0.1 model.options.hidden=None"]


def test_write_report_every_format(tree: Path, tmp_path: Path):
    frame, problems = report.load_runs(tree)
    out = tmp_path / "out"
    result = report.write_report(frame, problems, out, resamples=200)
    for task in ("detect", "relabel", "prune", "toy", "groundtruth", "bench", "custom"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{task}.{ext}").stat().st_size > 0, (task, ext)
    figs = {p.name for p in result["figures"]}
    for stem in ("fig1_digits_symmetric_0.1", "fig2_two_circles", "prune_digits", "relabel_digits_symmetric_0.1",
                 "cost_quality_digits_symmetric_0.1", "groundtruth_digits_symmetric_0.1_gex"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= figs, stem
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result["figures"] if p.suffix == ".png")
    assert all(p.read_bytes()[:5] == b"%PDF-" for p in result["figures"] if p.suffix == ".pdf")
    csv = (out / "tables" / "detect.csv").read_text().splitlines()
    assert csv[0] == "method,setting,metric,column,n,mean,std,ci_low,ci_high,best" and len(csv) == 1 + 4
    summary = (out / "summary.md").read_text()
    assert "no metrics.json" in summary and "duplicate:" in summary and "[tex](tables/detect.tex)" in summary
    assert "![fig1_digits_symmetric_0.1](figures/fig1_digits_symmetric_0.1.png)" in summary
    assert (out / "runs.csv").read_text().count("\n") == len(frame) + 1


def test_missing_or_malformed_figure_inputs_are_noted(tmp_path: Path):
    """Toy scores under bare estimator names (as experiments.toy writes them) still give Fig. 2 (histograms)."""
    write_run(tmp_path / "a", "toy", task="toy", method="gex", seed=0, metrics={"gex.auroc": 1.0, "gex.ap": 1.0},
              scores={"self_influence": torch.ones(3)})
    write_run(tmp_path / "c", "toy", task="toy", method="gex", seed=0, metrics={"gex.auroc": 1.0, "gex.ap": 1.0,
              "loo.auroc": 1.0, "loo.ap": 1.0}, scores={"self_influence": torch.ones(4), "gex": torch.ones(4),
                                                        "loo": torch.arange(4.0), "is_influential": torch.ones(4) > 0})
    result = report.write_report(*report.load_runs(tmp_path / "c"), tmp_path / "out_c", resamples=10)
    assert [p.name for p in result["figures"]] == ["fig2_digits_symmetric_0.1.png", "fig2_digits_symmetric_0.1.pdf"]
    write_run(tmp_path / "a", "det", task="detect", method="gex", seed=0, metrics={"auroc": 1.0, "ap": 1.0},
              scores={"self_influence": torch.ones(5), "is_noisy": torch.zeros(4, dtype=torch.bool)})
    notes = report.write_report(*report.load_runs(tmp_path / "a"), tmp_path / "out_a", resamples=10)["notes"]
    assert any(n.startswith("Fig. 2 skipped") for n in notes), notes
    assert any(n.startswith("Fig. 1 failed:") and "mask the same shape" in n for n in notes), notes
    write_run(tmp_path / "b", "det", task="detect", method="gex", seed=0, metrics={"auroc": 1.0, "ap": 1.0})
    notes = report.write_report(*report.load_runs(tmp_path / "b"), tmp_path / "out_b", resamples=10)["notes"]
    assert "Fig. 1 skipped: no detect run has a scores.pt" in notes
    assert "Fig. 1 skipped" in (tmp_path / "out_b" / "summary.md").read_text()


def test_default_output_folder(tmp_path: Path):
    assert report._report_dir(str(tmp_path), "elsewhere", "outputs") == "elsewhere"
    assert report._report_dir(str(tmp_path), None, "outputs") == str(tmp_path / "report")
    assert report._report_dir(f"{tmp_path}/*", None, "outputs") == f"outputs/report/{report._STARTED}"
    assert report._report_dir(None, None, "outputs") == f"outputs/report/{report._STARTED}"


def test_run_without_records_is_a_usage_error(tmp_path: Path):
    cfg = OmegaConf.create({"runs": str(tmp_path), "out": None, "bootstrap": 10, "ci": 0.95, "seed": 0})
    with pytest.raises(UsageError, match="holds no finished run record"):
        report.run(cfg, tmp_path / "out", None)
    cfg.runs = "???"
    with pytest.raises(UsageError, match="runs is required"):
        report.run(cfg, tmp_path / "out", None)
    with pytest.raises(ValueError, match=r"ci=1\.5 is invalid"):
        report.summarize(report.pool_seeds(report.long_metrics(pd.DataFrame())), 10, 1.5)


@pytest.fixture()
def small_tree(tmp_path: Path) -> Path:
    """Detect only: 2 methods x 2 seeds and an unfinished run (one figure: cost vs quality)."""
    root = tmp_path / "small"
    for seed, method in itertools.product(range(2), ["gex", "tracin"]):
        write_run(root, f"{method}_{seed}", task="detect", method=method, seed=seed,
                  metrics={"auroc": 0.9 - 0.1 * seed, "ap": 0.5, "wall_s_fit": 3.0, "wall_s_score": 1.0})
    write_run(root, "crashed", task="detect", method="gex", seed=5, metrics={}, finished=False)
    return root


def test_entry_point_logger_none(small_tree: Path, tmp_path: Path, monkeypatch):
    """The Hydra entry, composed in-process with the real config and hydra.run.dir=<tmp>, logger=none."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    run_dir = tmp_path / "hydra"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("report", overrides=[f"runs={small_tree}", "logger=none", "bootstrap=50",
                                           f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir      # what Hydra's run_job sets
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir()
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        report.main.__wrapped__(cfg)
    finally:
        HydraConfig.instance().cfg = None   # leave no global Hydra state to other tests
    summary = (run_dir / "summary.md").read_text()
    assert f"python -m experiments.report runs={small_tree} logger=none bootstrap=50" in summary
    assert f"incomplete: {small_tree / 'crashed'}: no metrics.json" in summary
    assert (run_dir / "figures" / "cost_quality_digits_symmetric_0.1.pdf").is_file()
    assert "| gex | **0.8500 ± 0.0707** [" in (run_dir / "tables" / "detect.md").read_text()
    assert not (run_dir / "wandb").exists()


def test_entry_point_offline_wandb(small_tree: Path):
    """``python -m experiments.report`` with the defaults: out = <runs>/report (the Hydra run dir), W&B offline."""
    env = os.environ | {"WANDB_SILENT": "true", "GEX_QUIET": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "experiments.report", f"runs={small_tree}", "logger.mode=offline",
                           "bootstrap=50"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=ENTRY_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    out = small_tree / "report"
    assert (out / "summary.md").is_file() and (out / "tables" / "detect.tex").is_file()
    assert f"incomplete: {small_tree / 'crashed'}" in proc.stdout
    offline = list((out / "wandb").glob("offline-run-*"))
    assert offline, sorted(map(str, out.rglob("*")))
    media = offline[0] / "files" / "media"
    assert list(media.glob("table/report/detect_*.table.json")) and list(media.glob("images/report/cost_quality_*"))
    # a second report over the same folder does not read its own output as runs
    again, _ = report.load_runs(small_tree, exclude=[])
    assert len(again) == 4
