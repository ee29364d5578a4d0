"""Measuring helpers of gex-bench, below the entry points: timing in alternating rounds (``bench.timing``), a
method timed end to end and GEX against its compute floor (``bench.methods``), per-sample-gradient paths
(``bench.grad_paths``), peer-library adapters (``bench.peers``), the GPU check (``bench.gpu_check``) and tables.

Imports run one way: ``gex`` < ``baselines`` < ``bench`` < ``experiments``; ``python -m experiments.bench`` wires
configs to these helpers.
"""
