"""Options of the speed benchmark (``bench.*`` in ``configs/bench.yaml``), validated when built."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.grad_paths import GRAD_PATHS

__all__ = ["BenchConfig"]


@dataclass
class BenchConfig:
    """``bench.*`` options.

    Attributes:
        methods: methods timed at ``n_train`` (unregistered names are skipped with a message).
        n_train: N of the method table (a class-balanced subset of the loaded training set).
        repeats: timed repeats per method (medians reported).
        warmup: run the generic warm-up before timing.
        isolate: one fresh process per method (honest peak memory); false = all in this process.
        timeout_s: a method's process is stopped after this many seconds (reported as a timeout).
        sweep_n: N values of the scaling sweep.
        sweep_methods: methods of the sweep (those also in ``methods`` or registered).
        sweep_repeats: timed repeats per sweep point.
        grad_paths: per-sample-gradient paths compared (``hooks``, ``vmap``, ``opacus``).
        grad_n: samples of the gradient-path comparison.
        grad_chunk: samples per per-sample-gradient chunk.
        floor: time GEX's bare-compute floor.
        floor_n: training samples at which GEX and its floor are timed (with GEX's shipped options); None =
            ``n_train``.
        peers: compare with installed peer libraries (captum, dattri, kronfluence).
        peer_n: training samples of the peer comparison (test samples: half of it).
        peer_repeats: timed rounds of each peer pair, ours and the peer alternating (medians reported).
        method_options: per-method option overrides on top of ``configs/method/<name>.yaml``.
        member_batches: ``batch_members`` values of the speed table (``speed_table``); [] skips the table.
        speed_members: M of the speed table's ensemble builds and evaluations.
        speed_steps: SGD steps of each timed build (``speed_steps // speed_members`` per member) and of each
            channels_last / compile timing.
        speed_repeats: timed rounds of each speed-table group, its settings alternating (medians reported).
    """

    methods: list[str] = field(default_factory=lambda: ["gex", "loss", "el2n", "tracin_rp", "randproj", "grad_dot",
                                                        "arnoldi", "trak", "ekfac"])
    n_train: int = 2000
    repeats: int = 3
    warmup: bool = True
    isolate: bool = True
    timeout_s: float = 3600.0
    sweep_n: list[int] = field(default_factory=lambda: [500, 1000, 2000, 4000])
    sweep_methods: list[str] = field(default_factory=lambda: ["loss", "randproj", "grad_dot"])
    sweep_repeats: int = 1
    grad_paths: list[str] = field(default_factory=lambda: list(GRAD_PATHS))
    grad_n: int = 2000
    grad_chunk: int = 256
    floor: bool = True
    floor_n: int | None = None
    peers: bool = False
    peer_n: int = 200
    peer_repeats: int = 3
    method_options: dict[str, Any] = field(default_factory=dict)
    member_batches: list[int] = field(default_factory=lambda: [1, 2, 4])
    speed_members: int = 4
    speed_steps: int = 200
    speed_repeats: int = 3

    def __post_init__(self) -> None:
        if self.floor_n is not None and self.floor_n < 1:
            raise ValueError(f"bench.floor_n={self.floor_n} must be a positive integer or null")
        for key in ("n_train", "repeats", "sweep_repeats", "grad_n", "grad_chunk", "peer_n", "peer_repeats",
                    "speed_members", "speed_steps", "speed_repeats"):
            if getattr(self, key) < 1:
                raise ValueError(f"bench.{key}={getattr(self, key)} must be a positive integer")
        if any(n < 1 for n in self.sweep_n):
            raise ValueError(f"bench.sweep_n={list(self.sweep_n)} must hold positive integers")
        if any(k < 1 for k in self.member_batches):
            raise ValueError(f"bench.member_batches={list(self.member_batches)} must hold positive integers")
        bad = sorted(set(self.grad_paths) - set(GRAD_PATHS))
        if bad:
            raise ValueError(f"bench.grad_paths has unknown {bad}; valid choices: {list(GRAD_PATHS)}")
        if self.timeout_s <= 0:
            raise ValueError(f"bench.timeout_s={self.timeout_s} must be positive")
