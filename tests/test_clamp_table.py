"""The clamp table names each GEX run by its reference rule and compares it seed by seed with the setting's
reference (random pruning here)."""
import json

import yaml

from experiments.clamp_table import load_records, rule_of, tables


def test_rules_are_named_from_the_config():
    assert rule_of({"method": {"name": "gex", "reference": "fit_aware"}}) == "fit_aware"
    assert rule_of({"method": {"name": "gex", "eps": 0.05}}) == "tau=0.05"       # a record from before the rule
    assert rule_of({"method": {"name": "gex", "reference": "clamped", "eps": 0}}) == "tau=0"
    assert rule_of({"method": {"name": "gex", "reference": "clamped", "eps_quantile": 0.05}}) == "adaptive q=0.05"
    assert rule_of({"method": {"name": "gex_clamped", "reference": "clamped", "eps": 0.05}}) == "tau=0.05"
    assert rule_of({"method": {"name": "el2n"}}) is None


def test_the_worst_seed_margin_over_random_pruning(tmp_path):
    for seed, (ours, rand) in enumerate([(0.90, 0.89), (0.88, 0.895)]):
        run = tmp_path / f"gex_s{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "gex", "reference": "fit_aware"},
                                                         "model": {"name": "cnn_small"}}))
        (run / "metrics.json").write_text(json.dumps({
            "task": "prune", "data": "fashion_mnist", "model": "cnn_small", "seed": seed, "test_acc_at_20": ours,
            "test_acc_at_40": ours, "random.test_acc_at_20": rand, "random.test_acc_at_40": rand,
            "frac_below_eps": 0.5, "frac_clamp_inverted": 0.0}))
    text = tables(load_records([tmp_path]))
    row = next(line for line in text.splitlines() if line.startswith("| fit_aware"))
    assert "| 2 | 0.8900 ± 0.0141 |" in row and "| -0.0150 |" in row and row.endswith("| 50% | 0% |")


def test_runs_that_average_several_retrains_are_a_row_of_their_own(tmp_path):
    for name, retrains, ours in (("single", 1, 0.88), ("averaged", 3, 0.91)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "gex", "reference": "fit_aware"},
                                                         "model": {"name": "cnn_small"}}))
        (run / "metrics.json").write_text(json.dumps({
            "task": "prune", "data": "fashion_mnist", "model": "cnn_small", "seed": 1, "test_acc_at_20": ours,
            "test_acc_at_40": ours, "random.test_acc_at_20": 0.89, "random.test_acc_at_40": 0.89,
            "retrains": retrains}))
    rows = [line for line in tables(load_records([tmp_path])).splitlines() if line.startswith("| fit_aware")]
    assert len(rows) == 2
    assert rows[0].startswith("| fit_aware | 1 | 0.8800 |") and "| -0.0100 |" in rows[0]
    assert rows[1].startswith("| fit_aware, mean of 3 retrains | 1 | 0.9100 |") and "| +0.0200 |" in rows[1]
