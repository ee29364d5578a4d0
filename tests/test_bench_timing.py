"""Alternating timing of the speed table and the peer comparison, on fake clocks: the call order (A, B, A, B, ...
after an untimed warm-up), medians instead of single runs, ratios of the medians and the per-round ratio range.
No assertion here depends on real timings."""
import pytest
import torch

import baselines  # noqa: F401  (registers the methods)
from bench import methods, peers, timing
from bench.config import BenchConfig

# scripted seconds per timed round (dyadic: fake-clock differences are exact); a load spike hits A's second
# round and B's third
A_SECONDS = [1.0, 9.0, 1.25]
B_SECONDS = [2.0, 2.5, 8.0]


class FakeClock:
    """A clock that only moves when a fake workload says so: ``work(name)`` advances it by that name's next
    scripted duration and logs the call."""

    def __init__(self, script: dict[str, list[float]]):
        self.now, self.script, self.calls = 0.0, {k: list(v) for k, v in script.items()}, []

    def __call__(self) -> float:
        return self.now

    def work(self, name: str, seconds: float | None = None):
        def run():
            self.calls.append(name)
            self.now += self.script[name].pop(0) if seconds is None else seconds
            return name
        return run


def test_alternate_calls_in_turn_after_a_warm_up_and_keeps_round_order():
    clock = FakeClock({"A": A_SECONDS, "B": B_SECONDS})
    warm = {"A": clock.work("warm A", 50.0), "B": clock.work("warm B", 50.0)}

    def timer(fn):
        start = clock()
        out = fn()
        return clock() - start, out

    runs = timing.alternate({"A": clock.work("A"), "B": clock.work("B")}, 3, timer, warm)
    assert clock.calls == ["warm A", "warm B", "A", "B", "A", "B", "A", "B"]
    assert [r[0] for r in runs["A"]] == A_SECONDS and [r[0] for r in runs["B"]] == B_SECONDS
    assert all(r[1] == "A" for r in runs["A"])
    calls = []
    timing.alternate({"A": lambda: calls.append("A"), "B": lambda: calls.append("B")}, 2, lambda fn: (fn(),))
    assert calls == ["A", "B"] * 3                      # default warm-up: each function once, untimed
    calls.clear()
    timing.alternate({"A": lambda: calls.append("A")}, 2, lambda fn: (fn(),), warmups={})
    assert calls == ["A", "A"]


def test_median_ratios_use_medians_and_report_the_per_round_range():
    out = timing.median_ratios({"A": A_SECONDS, "B": B_SECONDS}, "A")
    assert out["A"] == {"median": 1.25, "ratio": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}
    assert out["B"]["median"] == 2.5 and out["B"]["ratio"] == 0.5
    rounds = [a / b for a, b in zip(A_SECONDS, B_SECONDS)]          # 0.5, 3.6, 0.15625
    assert (out["B"]["ratio_min"], out["B"]["ratio_max"]) == (min(rounds), max(rounds))


def test_alternate_and_configs_reject_bad_repeats():
    with pytest.raises(ValueError, match="alternate needs repeats >= 1 .* repeats=0"):
        timing.alternate({"A": lambda: None}, 0, lambda fn: (fn(),))
    for key in ("speed_repeats", "peer_repeats"):
        with pytest.raises(ValueError, match=f"bench.{key}=0 must be a positive integer"):
            BenchConfig(**{key: 0})
    with pytest.raises(ValueError, match="peer_table: repeats=0 must be a positive integer"):
        peers.peer_table(20, repeats=0)


def test_speed_rows_are_medians_of_alternating_rounds(monkeypatch):
    clock = FakeClock({"A": A_SECONDS, "B": B_SECONDS})
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    monkeypatch.setattr(timing.time, "process_time", clock)
    opts = BenchConfig(speed_repeats=3)
    rows, first = methods.speed_rows("sgd steps", {"A": clock.work("A"), "B": clock.work("B")}, opts,
                                    torch.device("cpu"), {}, steps=7)
    assert clock.calls == ["A", "B"] * 3 and first == "A"
    assert [r["setting"] for r in rows] == ["A", "B"] and all(r["what"] == "sgd steps" for r in rows)
    a, b = rows
    assert (a["wall_s"], b["wall_s"], a["speedup"], b["speedup"], b["cpu_speedup"]) == (1.25, 2.5, 1.0, 0.5, 0.5)
    assert (b["speedup_min"], b["speedup_max"]) == (1.25 / 8.0, 9.0 / 2.5)
    assert b["speedup_min"] <= b["speedup"] <= b["speedup_max"]  # always: a_r >= m b_r for all r => med a >= m med b
    assert a["repeats"] == b["repeats"] == 3 and a["steps"] == 7


def test_peer_pair_alternates_and_reports_medians(monkeypatch):
    scores = torch.linspace(0.0, 1.0, 5)
    clock = FakeClock({"ours": [0.0] + [1.0, 1.125, 5.0], "peer": [0.0] + [3.0, 9.0, 2.0]})  # warm-up first, 0 s
    ours, peer = clock.work("ours"), clock.work("peer")
    monkeypatch.setattr(peers.time, "perf_counter", clock)
    monkeypatch.setattr(peers, "_ours", lambda task, name, options: (ours(), scores)[1])
    monkeypatch.setitem(peers.PAIRS, "grad_dot", ("fake.Peer", "math", lambda o: lambda task: (peer(), -scores)[1]))

    class Train:
        is_noisy = torch.tensor([False, False, False, True, True])

        def __len__(self):
            return 5

    class Task:
        train = Train()
    row = peers._pair(Task(), "grad_dot", {}, repeats=3)
    assert clock.calls == ["ours", "peer"] * 4                      # the warm-up round, then 3 timed rounds
    assert row["status"] == "ok" and row["repeats"] == 3 and row["n"] == 5
    assert (row["ours_s"], row["peer_s"]) == (1.125, 3.0)          # medians, not the last round (5.0, 2.0)
    assert row["peer_time_ratio"] == 3.0 / 1.125
    assert (row["peer_time_ratio_min"], row["peer_time_ratio_max"]) == (2.0 / 5.0, 9.0 / 1.125)
    assert row["peer_spearman"] == pytest.approx(-1.0)
    assert (row["ours_auroc"], row["peer_auroc"]) == (1.0, 0.0)     # each side scored against the same noise


def test_peer_table_runs_every_pair_with_its_options(monkeypatch):
    seen = {}

    def adapter(options):
        seen.update(options)
        return lambda task: -torch.arange(len(task.train), dtype=torch.float64)
    monkeypatch.setattr(peers, "PAIRS", {"grad_dot": ("fake.Peer", "math", adapter)})
    frame = peers.peer_table(40, repeats=1, overrides={"grad_dot": {"chunk_size": 7}})
    assert list(frame["status"]) == ["ok"] and seen["chunk_size"] == 7
