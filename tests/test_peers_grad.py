"""Peer libraries as oracles on the same tiny float64 model: captum's TracInCP against ``tracin``, and dattri's
influence-function attributors (explicit, CG, LiSSA, Arnoldi) against ``if_exact``, ``if_cg``, ``lissa`` and
``arnoldi``. Skipped with a message when a peer is not installed (``pip install captum dattri``).

Each comparison prints its Spearman correlations and the wall time of our method and of the peer (``-s``)."""
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import baselines  # noqa: F401  (registers the methods)
from gex.attribution import build_method
from gex.losses import per_sample_loss
from gex.params import num_params

torch.set_flush_denormal(True)
ALPHA = 1.0          # damping / regularization shared with the peers
N_SUB, N_TEST = 30, 8
MIN_SPEARMAN = 0.99  # same algorithm: rankings must agree
TOL_SAME = 1e-6      # relative error where the computation is the same up to round-off


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _spearman(a, b):
    return float(spearmanr(a.detach().double().flatten().numpy(), b.detach().double().flatten().numpy()).statistic)


@pytest.fixture(scope="module")
def tiny(tiny_task64):
    task = tiny_task64
    return task, task.train.subset(torch.arange(N_SUB)), task.test.subset(torch.arange(N_TEST))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _report(name, ours, peer, t_ours, t_peer):
    rho_self, rho_pair = _spearman(ours[0], peer[0]), _spearman(ours[1], peer[1])
    print(f"\n{name}: spearman self={rho_self:.6f} pairwise={rho_pair:.6f} rel_err self={_rel(ours[0], peer[0]):.2e} "
          f"pairwise={_rel(ours[1], peer[1]):.2e}; wall ours={t_ours:.2f}s peer={t_peer:.2f}s")
    return rho_self, rho_pair


def _ours(name, task, sub, test, **kw):
    method = build_method(name, **kw).fit(task)
    return method.self_influence(sub), method.influence(sub, test)


def test_tracin_matches_captum_tracincp(tiny, tmp_path):
    captum_tracincp = pytest.importorskip("captum.influence", reason="captum is not installed").TracInCP
    task, sub, test = tiny
    paths = []
    for c, ckpt in enumerate(task.trajectory):
        paths.append(str(tmp_path / f"ckpt{c}.pt"))
        torch.save({"state": ckpt.state, "lr": ckpt.lr}, paths[-1])

    def load(model, path):  # captum weights each checkpoint by the learning rate this returns
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state"])
        model.eval()
        return saved["lr"]

    def peer():
        model = task.make_model().double()
        tracin = captum_tracincp(model, TensorDataset(sub.x, sub.y), paths, load,
                                 loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=N_SUB)
        return tracin.self_influence(), tracin.influence((test.x, test.y)).T  # captum: (n_test, n_train)
    ours, t_ours = _timed(lambda: _ours("tracin", task, sub, test, weighting="lr"))
    theirs, t_peer = _timed(peer)
    rho = _report("tracin vs captum TracInCP", ours, theirs, t_ours, t_peer)
    assert min(rho) >= MIN_SPEARMAN
    assert _rel(ours[0], theirs[0]) < TOL_SAME and _rel(ours[1], theirs[1]) < TOL_SAME


def _dattri_task(task):
    dattri_task = pytest.importorskip("dattri.task", reason="dattri is not installed")
    model = task.make_model().double()
    model.load_state_dict(task.model.state_dict())
    model.eval()
    dtype = next(model.parameters()).dtype

    def loss_func(params, data):
        x, y = data
        # dattri's LiSSA casts every batch to float32: restore the model dtype and integer labels.
        logits = functional_call(model, params, (x.to(dtype),))
        return per_sample_loss(logits, y.long(), task.loss).mean()
    return dattri_task.AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())


def _dattri_scores(attributor, task, sub, test):
    full = DataLoader(TensorDataset(task.train.x, task.train.y), batch_size=len(task.train))
    sub_loader = DataLoader(TensorDataset(sub.x, sub.y), batch_size=N_SUB)
    test_loader = DataLoader(TensorDataset(test.x, test.y), batch_size=N_TEST)
    # dattri's Arnoldi draws its start vector and Hessenberg matrix in the default dtype: make it the model's.
    torch.set_default_dtype(task.train.x.dtype)
    try:
        attributor.cache(full)
        return attributor.self_attribute(sub_loader).cpu(), attributor.attribute(sub_loader, test_loader).cpu()
    finally:
        torch.set_default_dtype(torch.float32)


def _dattri_case(name, task):
    """(our method name, our options, dattri attributor factory) for one algorithm, the same settings."""
    algorithm = pytest.importorskip("dattri.algorithm", reason="dattri is not installed")
    p = num_params(task.model)
    scale = 10.0  # > half the largest Hessian eigenvalue (~12.4 on this task); batch = all: the same series
    cases = {
        "if_exact": ({"damping": ALPHA}, lambda t: algorithm.IFAttributorExplicit(t, regularization=ALPHA)),
        "if_cg": ({"damping": ALPHA, "tol": 1e-10, "max_iter": 100},
                  lambda t: algorithm.IFAttributorCG(t, max_iter=100, tol=1e-10, regularization=ALPHA)),
        "lissa": ({"depth": 40, "scale": scale, "damping": ALPHA / scale, "batch_size": None},
                  lambda t: algorithm.IFAttributorLiSSA(t, batch_size=len(task.train), recursion_depth=40,
                                                        scaling=scale, damping=ALPHA / scale)),
        "arnoldi": ({"n_iter": 100, "top_k": 30, "damping": ALPHA},
                    lambda t: algorithm.IFAttributorArnoldi(t, proj_dim=30, max_iter=100, regularization=ALPHA)),
    }
    assert p > 100  # the Arnoldi case is a genuine truncation, not full rank
    return cases[name]


@pytest.mark.parametrize("name", ["if_exact", "if_cg", "lissa", "arnoldi"])
def test_influence_functions_match_dattri(tiny, name):
    task, sub, test = tiny
    options, make_peer = _dattri_case(name, task)
    ours, t_ours = _timed(lambda: _ours(name, task, sub, test, **options))
    theirs, t_peer = _timed(lambda: _dattri_scores(make_peer(_dattri_task(task)), task, sub, test))
    rho = _report(f"{name} vs dattri", ours, theirs, t_ours, t_peer)
    assert min(rho) >= MIN_SPEARMAN


def test_captums_fast_path_pairs_with_ours_on_the_same_parameters_and_both_settings_are_recorded():
    pytest.importorskip("captum")
    import json

    from bench import peers
    task = peers.tiny_task(60)
    options = {"weighting": "lr", "chunk_size": 256}
    row = peers._pair(task, "tracin@fast", options, repeats=1)
    assert row["status"] == "ok", row["status"]
    assert row["peer_spearman"] > 0.999                       # BN frozen on both sides: the same quantity
    settings = json.loads(row["peer_settings"])
    assert settings["sample_wise_grads_per_batch"] is True and "BN frozen" in settings["parameters"]
    assert json.loads(row["ours_settings"]) == options
    assert peers.PAIRS["tracin"][2](options).settings["sample_wise_grads_per_batch"] is False  # the exact path


def test_the_kronfluence_pair_uses_our_damping_or_refuses():
    from bench import peers
    run = peers._kronfluence({"batch_size": 64, "damping": 0.1, "damping_mode": "relative"})
    assert run.settings["damping_factor"].startswith("None = 0.1 x mean eigenvalue")
    with pytest.raises(ValueError, match="has no kronfluence equivalent"):
        peers._kronfluence({"batch_size": 64, "damping": 1e-8, "damping_mode": "absolute"})


def test_cleanlabs_own_cross_validation_agrees_with_our_cl():
    pytest.importorskip("cleanlab")
    from bench import peers
    task = peers.tiny_task(150)
    options = {"folds": 5, "epochs": 5, "quality_method": "self_confidence"}
    row = peers._pair(task, "cl", options, repeats=1)
    assert row["status"] == "ok", row["status"]
    # the same recipe and quality score with different fold draws and inits: the rankings agree only loosely on
    # 150 samples, but both find the mislabeled ones
    assert row["peer_spearman"] > 0.3
    assert '"cv_n_folds": "5 (default)"' in row["peer_settings"]
    assert row["ours_auroc"] > 0.8 and row["peer_auroc"] > 0.8


def test_a_peer_campaign_runs_every_size_and_splits_fixed_from_per_sample_cost():
    pytest.importorskip("captum")
    from bench import peers
    task = peers.tiny_task(120)
    table = peers.peer_campaign(task, [120, 60], ["tracin@fast"], repeats=1)
    assert table["n"].tolist() == [60, 120] and (table["status"] == "ok").all()
    assert table["peer_spearman"].min() > 0.999
    for side in ("ours", "peer"):  # both sides' detection quality on the subset's own noise
        assert table[f"{side}_auroc"].between(0.5, 1.0).all() and table[f"{side}_ap"].notna().all()
    costs = peers.cost_split(table)
    assert sorted(costs["side"]) == ["ours", "peer"] and costs[["fixed_s", "per_1k_s"]].notna().all().all()
    with pytest.raises(ValueError, match="unknown peer pairs"):
        peers.peer_campaign(task, [60], ["tracin@nope"])
    with pytest.raises(ValueError, match="must lie in"):
        peers.peer_campaign(task, [500], ["tracin@fast"])


def test_a_peer_campaign_warms_up_on_a_small_subset_and_times_every_size_cold(monkeypatch):
    from bench import peers
    calls = []
    monkeypatch.setattr(peers, "WARMUP_N", 30)
    monkeypatch.setattr(peers, "_pair", lambda task, name, options, repeats, warmup, scored: calls.append(
        (len(task.train), repeats, warmup)) or {"method": name, "n": len(task.train)})
    peers.peer_campaign(peers.tiny_task(120), [120, 60], ["tracin@fast", "trak"], repeats=3)
    # one single untimed call per pair at 30 samples, then every size without a warm-up call of its own
    assert calls == [(30, 1, False)] * 2 + [(60, 3, False)] * 2 + [(120, 3, False)] * 2


def test_the_scored_subset_is_fixed_stratified_and_holds_both_kinds_of_sample():
    from bench import peers
    task = peers.tiny_task(120)
    noisy = task.train.is_noisy
    rows = peers.scored_rows(task, 10)
    assert len(rows) == 10 and rows.unique().numel() == 10 and torch.equal(rows, rows.sort().values)
    assert torch.equal(rows, peers.scored_rows(task, 10))                   # fixed: the same rows every call
    assert int(noisy[rows].sum()) == max(1, round(10 * float(noisy.double().mean())))
    assert 0 < int(noisy[peers.scored_rows(task, 2)].sum()) < 2               # both kinds even when tiny
    assert torch.equal(peers.scored_rows(task, 500), torch.arange(len(task.train)))


def test_a_curvature_pair_scores_a_subset_with_the_whole_sizes_curvature_on_both_sides():
    """``scored``: both sides score the same fixed subset with the curvature of every training sample, so CG
    with matched iterations gives the same ranking, and the metrics are on the subset's own noise."""
    pytest.importorskip("dattri")
    from bench import peers
    task = peers.tiny_task(120)
    options = peers._options("if_cg", {}, True)
    row = peers._pair(task, "if_cg", options, repeats=1, scored=16)
    assert row["status"] == "ok", row["status"]
    assert row["scored"] == 16 and row["n"] == 120
    assert row["peer_spearman"] > 0.99
    assert "self_attribute: the scored samples" in row["peer_settings"]
    full = build_method("if_cg", **options).fit(task).self_influence(task.train)
    rows = peers.scored_rows(task, 16)
    ours_sub = build_method("if_cg", **options).fit(task).self_influence(task.train.subset(rows))
    assert _rel(ours_sub, full[rows]) < 1e-4          # a subset's scores are the whole set's, not a refit on it
    # dattri runs under no_grad: its scores would otherwise hold the parameters' graph through every iteration
    assert peers.PAIRS["if_cg"][2](options)(task, rows).grad_fn is None
    assert peers._pair(task, "tracin@fast", {"weighting": "lr", "chunk_size": 256}, repeats=1,
                       scored=16)["scored"] == 120  # only the inverse-HVP pairs score a subset


def test_dattris_arnoldi_scores_every_sample_in_batches_as_in_one(monkeypatch):
    """Arnoldi is not a per-sample inverse-HVP method: both sides score every sample. dattri's side goes in
    ``PEER_BATCH`` rows per ``self_attribute`` call (its memory at 10k); the batches must not change its scores."""
    pytest.importorskip("dattri")
    from bench import peers
    task = peers.tiny_task(120)
    options = {"n_iter": 20, "top_k": 5, "damping": 0.1}
    whole = peers.PAIRS["arnoldi"][2](options)(task)
    monkeypatch.setattr(peers, "PEER_BATCH", 50)   # 50 + 50 + 20 rows
    batched = peers.PAIRS["arnoldi"][2](options)(task)
    assert whole.shape == (120,) and torch.allclose(batched, whole, rtol=1e-4, atol=1e-7)
    assert "arnoldi" not in peers.SUBSET_PAIRS


def test_the_peer_campaign_command_writes_its_tables_and_record(tmp_path):
    pytest.importorskip("captum")
    import json
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "experiments.peers", "experiment=smoke", "peers.pairs=[tracin@fast]",
           "peers.sizes=[100,200]", "peers.repeats=1", f"paths.cache={tmp_path / 'cache'}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    assert {"peers.csv", "peers_cost.csv", "peers.md", "metrics.json", "config.yaml"} <= {p.name for p in run.iterdir()}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tracin@fast.n200.status"] == "ok" and metrics["tracin@fast.n200.peer_spearman"] > 0.999
    assert "Fixed and per-sample cost" in (run / "peers.md").read_text()


@pytest.mark.parametrize("tiny", [True, False], ids=["micro-benchmark", "default scale"])
def test_every_peer_records_its_settings_and_they_mirror_ours(tiny):
    """The record of every pair names the peer's class or function and, where the settings are shared, the same
    values as ours (``_options`` is what ``_pair`` is given)."""
    from bench import peers
    mirrored = {"if_cg": {"max_iter": "max_iter", "regularization": "damping"},
                "lissa": {"recursion_depth": "depth", "damping": "damping", "scaling": "scale"},
                "arnoldi": {"proj_dim": "top_k", "max_iter": "n_iter", "regularization": "damping"},
                "trak": {"proj_dim": "proj_dim", "regularization": "damping"}}
    for name, (_, _, adapter) in peers.PAIRS.items():
        options = peers._options(name, {}, tiny)
        settings = adapter(options).settings
        assert settings and ("class" in settings or "function" in settings), name
        for theirs, ours in mirrored.get(name, {}).items():
            assert settings[theirs] == options[ours], (name, theirs)


def test_dattris_trak_configured_as_documented_computes_our_trak():
    """dattri's TRAK takes the model output function (the margin) as its loss function and reads Q on its own model
    (each checkpoint's BN statistics): configured so, its self-influence ranks as ours does on the tiny BN MLP."""
    pytest.importorskip("dattri")
    from bench import peers
    task = peers.tiny_task(120)
    options = peers._options("trak", {"trak": {"proj_dim": 48}}, True)   # below n: the kernel matters
    row = peers._pair(task, "trak", options, repeats=1)
    assert row["status"] == "ok", row["status"]
    assert row["peer_spearman"] > 0.996   # 0.9944 with the cross-entropy as its loss and Q on theta*'s BN statistics
    assert abs(row["ours_auroc"] - row["peer_auroc"]) < 0.01


def test_the_cost_line_never_mixes_rows_that_scored_different_numbers_of_samples():
    from bench import peers
    rows = [("if_cg", 1000, 10, 50.0), ("if_cg", 1000, 2, 10.0), ("if_cg", 2000, 2, 20.0),   # 10 per 1k, no fixed
            ("arnoldi", 1000, 1000, 8.0), ("arnoldi", 3000, 3000, 24.0)]                  # every sample: "all"
    table = pd.DataFrame([{"method": m, "peer": "p", "n": n, "scored": k, "status": "ok", "ours_s": t, "peer_s": t}
                          for m, n, k, t in rows])
    costs = peers.cost_split(table).set_index(["method", "side"])
    assert costs.loc[("if_cg", "ours"), "scored"] == "2" and costs.loc[("arnoldi", "peer"), "scored"] == "all"
    assert costs.loc[("if_cg", "ours"), "per_1k_s"] == pytest.approx(10.0)   # -10.0 with the 10-sample row in it
    assert costs.loc[("if_cg", "ours"), "fixed_s"] == pytest.approx(0.0, abs=1e-9)
    assert costs.loc[("arnoldi", "ours"), "per_1k_s"] == pytest.approx(8.0) and len(costs) == 4


def test_records_of_single_sizes_pool_into_one_cost_line(tmp_path):
    """Two records, one size each: the pooled cost split is the line through both medians, per side."""
    import json
    import subprocess
    import sys
    for n, ours, peer in ((1000, 3.0, 10.0), (4000, 9.0, 25.0)):   # ours 2 s per 1k + 1 s; the peer 5 + 5 s
        folder = tmp_path / f"rec_n{n}"
        folder.mkdir()
        pd.DataFrame([{"method": "trak", "peer": "dattri.TRAKAttributor", "n": n, "status": "ok", "ours_s": ours,
                       "peer_s": peer}]).to_csv(folder / "peers.csv", index=False)
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "pooled"
    cmd = [sys.executable, "-m", "experiments.peers", "peers.summary_only=true", f"peers.summary_of={tmp_path}/rec_*",
           f"peers.summary_out={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    costs = pd.read_csv(out / "peers_cost.csv").set_index("side")
    assert costs.loc["ours", "per_1k_s"] == pytest.approx(2.0) and costs.loc["ours", "fixed_s"] == pytest.approx(1.0)
    assert costs.loc["peer", "per_1k_s"] == pytest.approx(5.0) and costs.loc["peer", "fixed_s"] == pytest.approx(5.0)
    assert pd.read_csv(out / "peers.csv").record.tolist() == ["rec_n1000", "rec_n4000"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["task"] == "peers_summary"
    missing = subprocess.run([*cmd[:4], f"peers.summary_of={tmp_path}/nothing_*", *cmd[5:]], capture_output=True,
                             text=True, cwd=root, timeout=300)
    assert missing.returncode == 2 and "matches no folder holding peers.csv" in missing.stderr
