"""Does a fresh ``make demo`` agree with the committed seed-0 records?
``python -m experiments.demo_check <demo runs> [--reference results]``.

Values are compared within the cross-machine tolerance of ``bench.tolerance`` (reruns are bit-identical on one CPU,
not across CPUs). Prints one row per value and exits 1 when any is outside.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.tolerance import TOLERANCE

__all__ = ["compare_records", "main"]

DETECT_KEYS, PRETRAIN_KEYS = ("auroc", "ap"), ("train_acc", "noisy_fit", "test_acc")


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"_path": str(p.parent)} for p in sorted(folder.rglob("metrics.json"))]


def _key(record: dict) -> tuple:
    return (record.get("task", "pretrain"), record.get("method", ""), record.get("data"), record.get("model"),
            int(record.get("seed", 0)), int(record.get("n_train", 0)))


def compare_records(new: list[dict], committed: list[dict]) -> list[dict]:
    """One row per value of ``new`` that has a committed twin (same task, method, data, model, seed and n_train).

    Returns:
        Rows with ``what``, ``metric``, ``new``, ``committed``, ``diff`` and ``ok`` (``|diff| <= TOLERANCE``).
    """
    reference = {_key(r): r for r in committed}
    rows = []
    for record in new:
        twin = reference.get(_key(record))
        if twin is None:
            continue
        keys = DETECT_KEYS if record.get("task") == "detect" else PRETRAIN_KEYS
        for metric in keys:
            if metric in record and metric in twin:
                diff = float(record[metric]) - float(twin[metric])
                rows.append({"what": record.get("method") or "pretrain", "metric": metric, "new": record[metric],
                             "committed": twin[metric], "diff": diff, "ok": abs(diff) <= TOLERANCE[metric]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the demo's run folder (e.g. outputs/demo)")
    parser.add_argument("--reference", type=Path, default=Path("results"), help="committed records")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        print(f"error: {args.runs} is not a folder of run records", file=sys.stderr)
        return 2
    rows = compare_records(_records(args.runs), _records(args.reference))
    if not rows:
        print(f"error: no record under {args.runs} has a committed twin under {args.reference}", file=sys.stderr)
        return 2
    print("| what | metric | this run | committed | diff | within |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['metric']} | {r['new']:.4f} | {r['committed']:.4f} | {r['diff']:+.4f} | "
              f"{'yes' if r['ok'] else 'NO'} (±{TOLERANCE[r['metric']]}) |")
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} values within the cross-CPU tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
