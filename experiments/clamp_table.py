"""GEX's reference rule across regimes: ``python -m experiments.clamp_table [run folders ...] [--out DIR]``.

Reads detection, pruning and separation records (``metrics.json`` + ``config.yaml``), names each GEX run by its
reference rule (``fit_aware``, ``tau=<eps>`` for the clamped form, ``adaptive q=<q>``), and writes one table per
setting: the task's metric per rule as mean ± std over seeds, how it compares seed by seed with the setting's
reference (the loss for detection, random pruning for pruning, chance for separation), and the share of samples
below tau and whose ranking the clamp inverts (where the record has them). A pruning run that averaged several
retrains per point (``task.retrains``) is a row of its own. See docs/method.md#the-clamp-tau.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from gex.runs import atomic_write_text

__all__ = ["rule_of", "load_records", "tables", "main"]

DEFAULT_RUNS = ("results/clamp", "results/detect/fmnist10k", "results/prune/fmnist10k_clean",
                "results/separate/mnist5k_digits")
GEX_NAMES = ("gex", "gex_clamped")
OTHERS = ("loss", "el2n", "trak")  # the other methods shown beside the rules (the references of the settings)


def rule_of(config: dict) -> str | None:
    """The reference rule of a GEX run's config, or None for another method. Records made before the rule existed
    used the clamped form."""
    method = config.get("method") or {}
    if method.get("name") not in GEX_NAMES:
        return None
    reference = method.get("reference") or ("clamped" if method.get("name") == "gex_clamped" or
                                            "reference" not in method else "fit_aware")
    if reference == "fit_aware":
        return "fit_aware"
    if method.get("eps_quantile") is not None:
        return f"adaptive q={method['eps_quantile']:g}"
    return f"tau={float(method.get('eps', 0.05)):g}"


def _setting(metrics: dict, config: dict) -> str:
    task = metrics.get("task", "?")
    model = config.get("model", {})
    name = f"{task}: {metrics.get('data')} {metrics.get('model')}"
    if model.get("name") == "mlp":
        name += f" {model.get('options', {}).get('hidden')}x{model.get('options', {}).get('depth')}"
    if task == "detect":
        name += f", {float(metrics.get('noise_rate', 0)):.0%} noise"
    return name


def load_records(folders: list[Path]) -> list[dict]:
    """One dict per finished run under ``folders``: ``setting``, ``label`` (rule or method), ``seed``, metrics. A
    (setting, label, seed) seen again in a later folder is skipped: the first folder's run counts."""
    out, seen = [], set()
    for folder in folders:
        for path in sorted(Path(folder).rglob("metrics.json")):
            config_path = path.with_name("config.yaml")
            if not config_path.is_file():
                continue
            metrics, config = json.loads(path.read_text()), yaml.safe_load(config_path.read_text())
            if metrics.get("task") not in ("detect", "prune", "separate"):
                continue
            label = rule_of(config) or metrics.get("method")
            if rule_of(config) is None and label not in OTHERS:
                continue
            if int(metrics.get("retrains", 1)) > 1:  # a row of its own: averaged retrains are another protocol
                label += f", mean of {int(metrics['retrains'])} retrains"
            key = (_setting(metrics, config), label, int(metrics.get("seed", 0)))
            if key in seen:
                continue
            seen.add(key)
            out.append({"setting": key[0], "label": label, "seed": key[2], "path": str(path.parent), **metrics})
    return out


def _stat(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    return f"{mean:.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def _fraction(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.0%}" if values else "-"


def _columns(task: str) -> list[tuple[str, str]]:
    return {"detect": [("auroc", "AUROC"), ("ap", "AP")],
            "prune": [("test_acc_at_20", "acc, 20% removed"), ("test_acc_at_40", "acc, 40% removed")],
            "separate": [("auroc", "self AUROC"), ("auroc_cross", "cross AUROC")]}[task]


def _versus(task: str, record: dict, by_seed: dict) -> list[float]:
    """Per-record margins over the setting's reference (positive = better)."""
    if task == "prune":
        return [record[k] - record[f"random.{k}"] for k in ("test_acc_at_20", "test_acc_at_40")
                if k in record and f"random.{k}" in record]
    if task == "separate":
        return [record["auroc"] - 0.5] if "auroc" in record else []
    loss = by_seed.get(("loss", record["seed"]))
    return [record["auroc"] - loss["auroc"]] if loss is not None else []


def _reference_name(task: str) -> str:
    return {"detect": "the loss (AUROC)", "prune": "random pruning", "separate": "chance (0.5)"}[task]


def tables(records: list[dict]) -> str:
    """The Markdown tables, one per setting, rules first."""
    settings = defaultdict(list)
    for record in records:
        settings[record["setting"]].append(record)
    parts = []
    for setting in sorted(settings):
        rows = settings[setting]
        task = rows[0]["task"]
        by_seed = {(r["label"], r["seed"]): r for r in rows}
        columns = _columns(task)
        head = ["rule / method", "seeds", *[c for _, c in columns], f"vs {_reference_name(task)}, worst seed",
                "below tau", "clamp-inverted"]
        lines = [f"### {setting}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        labels = sorted({r["label"] for r in rows}, key=lambda x: (not (x.startswith("fit_aware") or "=" in x), x))
        for label in labels:
            group = [r for r in rows if r["label"] == label]
            margins = [m for r in group for m in _versus(task, r, by_seed)]
            worst = f"{min(margins):+.4f}" if margins else ""
            cells = [_stat([r[k] for r in group if k in r]) for k, _ in columns]
            lines.append("| " + " | ".join([label, str(len({r['seed'] for r in group})), *cells, worst,
                                            _fraction([r.get("frac_below_eps") for r in group]),
                                            _fraction([r.get("frac_clamp_inverted") for r in group])]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, default=[Path(p) for p in DEFAULT_RUNS])
    parser.add_argument("--out", type=Path, default=Path("results/clamp/clamp.md"))
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_dir()]
    if missing:
        print(f"error: not a folder of run records: {', '.join(missing)}", file=sys.stderr)
        return 2
    text = tables(load_records(args.runs))
    atomic_write_text("# GEX's reference rule across regimes\n\n" + text, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
