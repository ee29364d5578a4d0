"""The GPU check: ``python -m experiments.gpu_check [--dry-run] [--out DIR]`` (``make gpu-check``).

On a CUDA machine (under ~8 minutes on one H200): the default detection setting on the GPU (pretraining theta*, then
gex, el2n, loss, tracin_rp, trak) next to the committed CPU records of the same seed, SGD-step throughput of the
paper's GEX recipe on ResNet-18 (3x32x32) and VGG (1x28x28) at batch 1,024, and a two-process NCCL ``torchrun``
where two GPUs exist. Writes ``record.json`` and ``table.md`` into ``--out`` (default
``results/gpu/<UTC timestamp>/``); the measuring code is ``bench.gpu_check``.

Without CUDA it prints one line and exits with status 2, writing nothing. ``--dry-run`` runs the same code on the
CPU at tiny sizes (the smoke preset), which the test suite does so that the check cannot rot.

Exit status: 0 = everything ran; 1 = the record was written but a part failed (listed under ``failed``);
2 = bad input or no CUDA device.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class _Parser(argparse.ArgumentParser):
    """argparse with bad input as one line on stderr and exit status 2 (its default prints the usage too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see python -m experiments.gpu_check --help)", file=sys.stderr)
        raise SystemExit(2)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m experiments.gpu_check",
                     description="GPU check: detection vs the committed CPU records, training-step throughput, "
                                 "torchrun with NCCL. Writes record.json and table.md.")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same code on the CPU at tiny sizes (smoke preset, a few steps)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: results/gpu/<UTC timestamp>/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status (see the module docstring)."""
    args = _parse(argv)
    out = args.out or REPO / "results" / "gpu" / datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file; give a folder", file=sys.stderr)
        return 2
    # torch is imported only now: --help and bad arguments answer at once
    from bench import gpu_check

    if not args.dry_run:
        reason = gpu_check.cuda_missing_reason()
        if reason:
            print(f"gpu-check: {reason}", file=sys.stderr)
            return 2
    record = gpu_check.run_check(gpu_check.settings_for(args.dry_run), REPO)
    record_path, table_path = gpu_check.write_outputs(record, out)
    status = 1 if record["failed"] else 0
    failed = f"; failed: {', '.join(record['failed'])}" if record["failed"] else ""
    print(f"[gpu-check] wrote {record_path} and {table_path} in {record['wall_s']:.0f} s{failed}")
    return status


if __name__ == "__main__":
    sys.exit(main())
