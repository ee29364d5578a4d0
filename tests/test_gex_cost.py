"""GEX's cost curve and its cheaper passes, on the smoke setting: the curve's points equal the ensembles they stand
for, its walls add up, and the BN-refresh comparison reproduces the shipped members exactly."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

import baselines  # noqa: F401  (registers the methods)
from experiments import gex_curve, gex_passes
from experiments.metrics import detection_metrics
from experiments.scaffold import RunLogger, load_task, settings_from
from gex import GEX

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
SMOKE = ["experiment=smoke", "threads=1", "method.ft_batch_size=32", "method.bn_batches=2"]


def _compose(name, tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(name, overrides=[*SMOKE, f"paths.cache={tmp_path / 'cache'}", *overrides])


def test_the_curve_points_are_the_ensembles_they_stand_for(tmp_path):
    cfg = _compose("gex_curve", tmp_path, "curve.members=[1,3]", "curve.ft_steps=[4]", "curve.independent=[[2,4]]",
                   "curve.references=[loss]")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gex_curve.run(cfg, run_dir, RunLogger(cfg, run_dir, "gex_curve"))
    frame = pd.read_csv(run_dir / "curve.csv")
    chain = frame[(frame.method == "gex") & (frame.members_mode == "chain")].set_index("members")
    assert list(chain.index) == [1, 3] and (chain.fit_s > 0).all() and (chain.score_s > 0).all()
    assert chain.loc[3, "fit_s"] > chain.loc[1, "fit_s"] and chain.loc[3, "wall_s"] == pytest.approx(
        chain.loc[3, "fit_s"] + chain.loc[3, "score_s"])
    _, task = load_task(settings_from(cfg))
    noisy = task.train.is_noisy.cpu()
    options = dict(ft_step=4, ft_batch_size=32, bn_batches=2)
    for m in (1, 3):  # the chain's first m members are GEX(num_members=m): same AUROC / AP
        direct = GEX(num_members=m, **options).fit(task).self_influence(task.train)
        expected = detection_metrics(direct, noisy, task.seed)
        assert chain.loc[m, "auroc"] == pytest.approx(expected["auroc"]) and chain.loc[m, "ap"] == pytest.approx(
            expected["ap"])
    assert set(frame.method) == {"gex", "loss"} and (frame.members_mode == "independent").sum() == 1
    assert (run_dir / "curve.png").stat().st_size > 0 and "| gex | chain | 4 | 3 | 1 |" in (run_dir / "curve.md").read_text()
    # a second run reads the measured member walls back instead of timing cache loads
    again = tmp_path / "again"
    again.mkdir()
    gex_curve.run(cfg, again, RunLogger(cfg, again, "gex_curve"))
    second = pd.read_csv(again / "curve.csv")
    assert second[second.method == "gex"].fit_s.tolist() == frame[frame.method == "gex"].fit_s.tolist()


def test_the_frontier_places_a_peer_library_beside_our_methods(tmp_path):
    pytest.importorskip("captum")
    from bench.peers import PAIRS, peer_scores
    cfg = _compose("gex_curve", tmp_path, "curve.members=[1]", "curve.ft_steps=[4]", "curve.references=[loss]",
                   "curve.peers=[tracin@fast]")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gex_curve.run(cfg, run_dir, RunLogger(cfg, run_dir, "gex_curve"))
    frame = pd.read_csv(run_dir / "curve.csv").set_index("method")
    peer = frame.loc[PAIRS["tracin@fast"][0]]              # named by the library, timed as one call
    assert peer.wall_s == peer.score_s > 0 and peer.fit_s == 0
    _, task = load_task(settings_from(cfg))
    scores, settings = peer_scores(task, "tracin@fast")
    assert settings["sample_wise_grads_per_batch"] is True
    assert peer.auroc == pytest.approx(detection_metrics(scores, task.train.is_noisy.cpu(), task.seed)["auroc"])
    with pytest.raises(ValueError, match=r"curve.peers has unknown pairs \['nope'\]"):
        gex_curve.CurveConfig(peers=["nope"])


def test_the_passes_compare_settings_and_reproduce_the_shipped_refresh(tmp_path):
    cfg = _compose("gex_passes", tmp_path, "method.num_members=2", "method.ft_step=3", "passes.rounds=2",
                   "passes.batch_sizes=[64,16]", "passes.bn_batches=[2,1]", "passes.members_per_pass=2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = gex_passes.run(cfg, run_dir, RunLogger(cfg, run_dir, "gex_passes"))
    assert metrics["eval pass, one member / batch 64.speedup"] == 1.0
    assert metrics["eval pass, one member / batch 16.wall_s"] > 0
    # the shipped batch count, refreshed again from the same generator, gives the very same scores
    assert metrics["BN refresh, one member / bn_batches 2.spearman_vs_shipped"] == pytest.approx(1.0)
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["task"] == "gex_passes" and "eval, 2 members / 2 members per pass.speedup" in stored


def test_the_knee_is_the_cheapest_point_meeting_both_thresholds_over_enough_seeds(tmp_path):
    points = [(50, 2, 0.995, 0.95), (50, 4, 0.996, 0.96), (25, 2, 0.985, 0.95), (100, 1, 0.999, 0.99)]
    rows = [dict(method="gex", members_mode="chain", ft_step=s, members=m, seed=k, fit_s=m * s / 10, score_s=1.0,
                 wall_s=m * s / 10 + 1.0, auroc=a, ap=p) for (s, m, a, p) in points for k in range(3)
            if not (s == 100 and k > 0)]                         # the cheapest-looking point has one seed only
    rows.append(dict(method="loss", members_mode="", ft_step=0, members=0, seed=0, fit_s=0.0, score_s=1.0,
                     wall_s=1.0, auroc=0.9, ap=0.6))
    stats = gex_curve.summarize(pd.DataFrame(rows), tmp_path, "test")
    point = gex_curve.knee(stats, 0.99, 0.94, 3)
    assert (point.ft_step, point.members) == (50, 2)   # 25 x 2 misses AUROC, 100 x 1 has one seed
    assert "Knee (the cheapest GEX point whose mean over >= 3 seeds" in (tmp_path / "curve.md").read_text()
    assert gex_curve.knee(stats, 0.999, 0.99, 3) is None


def test_a_member_trained_by_another_run_has_no_wall_rather_than_its_load_time(tmp_path):
    from experiments.gex_curve import chain_walls
    cfg = _compose("gex_curve", tmp_path)
    _, task = load_task(settings_from(cfg))
    gex = GEX(num_members=2, ft_step=3, ft_batch_size=32, bn_batches=2).fit(task)   # members cached, walls not
    walls = chain_walls(task, replace_config(gex.config, num_members=3))
    assert all(w != w for w in walls[:2]) and walls[2] > 0                    # NaN, NaN, then a measured cycle


def replace_config(config, **changes):
    from dataclasses import replace
    return replace(config, **changes)
