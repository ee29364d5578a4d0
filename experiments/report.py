"""Tables and figures across run records: ``python -m experiments.report runs=<dir or glob> [out=<dir>]``.

Reads every run directory below ``runs`` (a directory holding ``config.yaml`` and/or ``metrics.json``, see
docs/run_records.md) into one frame, leaves out and reports the runs that cannot be compared (unfinished,
missing the task's required metrics, duplicated, another ``config_version``), and writes under ``out``:

- ``runs.csv``: one row per kept run (task, setting, method, seed, every metric, stage times, versions, path);
- ``tables/<task>.{md,csv,tex}``: method x setting, mean +/- std over seeds (sample std, ``ddof=1``) and a
  seeded percentile-bootstrap interval of the mean; best entry per column in bold (max, or min for costs);
  ``tables/all_metrics.csv``: the same statistics for every metric of every task;
- ``figures/*.{png,pdf}``: Fig. 1 histograms (detect ``scores.pt``), Fig. 2 panel (toy ``scores.pt``),
  pruning curves, relabel bars, AUROC vs wall time, ground-truth scatter;
- ``summary.md``: one page linking all of it, with the problems found and the command that regenerates it.

What the figures read from ``scores.pt``: ``self_influence`` (n,) with ``is_noisy`` (detect); per-estimator
scores as ``<m>.self_influence`` keys, a ``self_influence`` dict or bare ``<m>`` keys for the estimators with a
``<m>.auroc`` metric, a mask ``is_influential``/``is_minority``/``is_noisy`` and, for the scatter panel rather
than histograms, ``x`` (n, 2) (toy); ``predicted`` and ``measured`` (or ``<m>.predicted`` /
``<m>.measured``) (groundtruth). A figure whose inputs are absent is skipped with a note in the summary.

Settings are ``data`` + noise kind and rate, plus any other config key (``train.*``, ``model.*``, ...) that
differs between runs of the same data and noise, so differently configured runs are never averaged together;
likewise two configurations of one method in one setting get their differing ``method.*``/``task.*`` keys in the
row label. With the logger on, the tables (``wandb.Table``) and PNGs also go to W&B (offline by default) in the
Hydra run directory, which is ``out``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import platform
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import hydra
import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from experiments import plots
from experiments.launch import cli, entry_point
from experiments.scaffold import RunLogger, UsageError, versions
from gex.runs import ArtifactError, atomic_write_text, load_artifact

__all__ = ["REQUIRED", "TABLES", "TableSpec", "Cell", "Table", "load_runs", "long_metrics", "pool_seeds",
           "bootstrap_ci", "summarize", "build_table", "render_markdown", "render_latex", "table_frame",
           "write_report", "run", "main"]

# Minimal metrics a finished run of each task must hold (regexes; ``<method>.`` prefixes also satisfy them).
REQUIRED: dict[str, tuple[str, ...]] = {
    "pretrain": ("train_acc", "test_acc"), "detect": ("auroc", "ap"), "relabel": ("test_acc", "test_acc_no_relabel"),
    "prune": (r"test_acc_at_\d+",), "separate": ("auroc", "ap"), "toy": ("auroc", "ap"), "groundtruth": ("lds",),
    "bench": ("wall_s",)}
OPEN_DICTS = ("model.options.",)   # free-form options: a key left out is the model's default, not an older run
IGNORED_CONFIG = ("paths.", "logger.", "hydra.", "device", "threads", "data.root", "data.download")
SKIP_DIRS = {"wandb", ".hydra", "__pycache__", ".git"}
META = ("task", "setting", "method", "variant", "data", "noise_kind", "noise_rate", "model", "seed", "path",
        "config_version")
REFERENCE_ROWS = ("random", "no relabel", "oracle", "loo")   # listed last in every table
ORACLE_UNUSED = ("flag_precision", "flag_recall", "n_flagged", "otsu_threshold")  # the oracle's retrain ignores them
UNRANKED_ROWS = ("oracle", "loo")    # ground truth / upper bounds: never bold, they are not competitors
LOWER_IS_BETTER = re.compile(r"(wall_s.*|peak_mem_mb|.*time_ratio|ratio_to_floor)")
HIGHER_IS_BETTER = re.compile(r"(auroc.*|ap|ap_.*|.*acc.*|found_at_\d+|.*spearman.*|.*pearson.*|lds|"
                              r"samples_per_s|flag_precision|flag_recall)")
ROW_COLUMN = {"pretrain": "model"}   # pretraining has no method: one row per model
ROW_KEYS = ("method.", "task.")      # config keys that tell rows (how a method is applied) apart, not settings
FLOAT_DIGITS = 4                     # decimals shown in a column whose values are all below LARGE
LARGE_DIGITS = 1                     # decimals otherwise (seconds, megabytes)
LARGE = 10.0
LOG_FLOOR = 1e-12                    # toy histograms bin log10(max(score, LOG_FLOOR))
TIE_TOL = 1e-12                      # means this close to the best are bold too


@dataclass(frozen=True)
class TableSpec:
    """How one task's table mirrors the paper's layout.

    Attributes:
        title: caption.
        metrics: metric names shown as columns (in this order), per setting.
        pattern: instead of ``metrics``, a regex whose first group labels the column (prune: percentage).
        references: ``(source metric, row label, shown as metric)``: extra rows such as ``no relabel``.
    """

    title: str
    metrics: tuple[str, ...] = ()
    pattern: str | None = None
    references: tuple[tuple[str, str, str], ...] = ()


TABLES: dict[str, TableSpec] = {
    "pretrain": TableSpec("Pretraining", ("train_acc", "noisy_fit", "test_acc", "wall_s")),
    "detect": TableSpec("Mislabel detection by self-influence (AUROC / AP)", ("auroc", "ap")),
    "relabel": TableSpec("Relabeling: test accuracy, and precision / recall of the flagged set",
                         ("test_acc", "flag_precision", "flag_recall"),
                         references=(("test_acc_no_relabel", "no relabel", "test_acc"),
                                     ("test_acc_oracle", "oracle", "test_acc"))),
    "prune": TableSpec("Pruning: test accuracy by % of the training set removed", pattern=r"test_acc_at_(\d+)"),
    "separate": TableSpec("Data-source separation", ("auroc", "ap", "auroc_cross", "ap_cross",
                                                     "minority_test_acc_weighted", "minority_test_acc_uniform")),
    "toy": TableSpec("Toy (Fig. 2): influential-sample separation and agreement with leave-one-out",
                     ("auroc", "ap", "spearman_loo", "pearson_loo")),
    "groundtruth": TableSpec("Ground truth: linear datamodeling score", ("lds", "loo_spearman", "loo_pearson")),
    "bench": TableSpec("Cost", ("wall_s", "peak_mem_mb", "samples_per_s", "ratio_to_floor", "peer_time_ratio",
                                "peer_spearman")),
}


# ----------------------------------------------------------------------------------------------- loading
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}``; lists become JSON text so that values are hashable."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _run_dirs(patterns: Iterable[str | Path], exclude: Iterable[Path] = ()) -> tuple[list[Path], list[str]]:
    """Every directory at or below the patterns that holds ``config.yaml`` or ``metrics.json``."""
    excluded = {Path(p).resolve() for p in exclude}
    found, problems = set(), []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern), recursive=True))
        if not matches:
            problems.append(f"missing: runs={pattern} matches nothing")
        for match in map(Path, matches):
            top = match.parent if match.is_file() else match
            for root, dirs, files in os.walk(top):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and (Path(root) / d).resolve() not in excluded)
                if {"config.yaml", "metrics.json"} & set(files) and Path(root).resolve() not in excluded:
                    found.add(Path(root))
    return sorted(found), problems


def _missing_required(task: str, metrics: dict[str, Any]) -> list[str]:
    names = [k for k, v in metrics.items() if _number(v)]
    return [req for req in REQUIRED.get(task, ()) if not any(re.fullmatch(rf"(?:[\w-]+\.)?{req}", k) for k in names)]


def _read_run(run_dir: Path) -> tuple[dict | None, str | None]:
    """One run directory -> a record (meta + metrics + identity), or a reason to leave it out."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        if not (run_dir / "metrics.json").is_file():
            return None, f"incomplete: {run_dir}: no metrics.json (unfinished or crashed run); left out"
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        return None, f"unreadable: {run_dir}: {type(err).__name__}: {err}; left out"
    if not isinstance(metrics, dict) or not isinstance(cfg or {}, dict):
        return None, f"unreadable: {run_dir}: metrics.json or config.yaml is not a mapping; left out"
    flat = _flatten(cfg or {})
    task = str(metrics.get("task") or flat.get("task.name") or "unknown")
    missing = _missing_required(task, metrics)
    if missing:
        return None, f"incomplete: {run_dir}: task {task} misses metric(s) {', '.join(missing)}; left out"
    seed = metrics.get("seed", flat.get("seed"))
    record = {"task": task, "method": str(metrics.get("method") or flat.get("method.name") or "-"),
              "data": str(metrics.get("data") or flat.get("data.name") or "-"),
              "noise_kind": str(flat.get("noise.kind") or "none"), "noise_rate": float(flat.get("noise.rate") or 0.0),
              "model": str(metrics.get("model") or flat.get("model.name") or "-"),
              "seed": int(seed) if _number(seed) and float(seed).is_integer() else seed,
              "path": str(run_dir), "config_version": flat.get("config_version")}
    record |= {k: (float(v) if _number(v) else v) for k, v in metrics.items() if k not in record}
    ident = {k: v for k, v in flat.items() if not k.startswith(IGNORED_CONFIG)}
    record["_config"] = ident | {"task": task, "method": record["method"], "data": record["data"],
                                 "seed": record["seed"]}
    record["_mtime"] = (run_dir / "metrics.json").stat().st_mtime
    return record, None


def _drop_duplicates(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Same config and seed twice: keep the newest (by metrics.json time), report the others."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(json.dumps(rec["_config"], sort_keys=True, default=str), []).append(rec)
    kept, problems = [], []
    for group in groups.values():
        group.sort(key=lambda r: (-r["_mtime"], r["path"]))
        kept.append(group[0])
        problems += [f"duplicate: {r['path']} has the same config and seed as {group[0]['path']}; "
                     f"left out (kept the newer)" for r in group[1:]]
    return kept, problems


def _check_versions(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Leave out runs whose ``config_version`` differs from the majority; report (only) mixed git revisions."""
    counts = Counter(str(r["config_version"]) for r in records)
    problems = []
    if len(counts) > 1:
        major = counts.most_common(1)[0][0]
        problems = [f"config version: {r['path']} has config_version={r['config_version']}, the majority "
                    f"{major}; left out" for r in records if str(r["config_version"]) != major]
        records = [r for r in records if str(r["config_version"]) == major]
    revs = Counter(str(r.get("git", "unknown")) for r in records)
    if len(revs) > 1:
        problems.append("info: runs come from several git revisions (" +
                        ", ".join(f"{k}: {n} runs" for k, n in sorted(revs.items())) + "); all kept")
    return records, problems


def _varying(records: list[dict], keep: Any) -> list[str]:
    """Config keys (selected by ``keep(key)``) whose value differs between the ``records`` that have them.

    A key missing from a record is a config field added after that run: new fields default to the old behaviour,
    so a run without the key does not make it vary (otherwise every older run would form a setting of its own).
    Free-form option dicts (``OPEN_DICTS``) are the exception: there a missing key is an option left at its
    default, so ``model.options.hidden=512`` and no ``hidden`` at all are two settings.
    """
    keys = sorted({k for r in records for k in r["_config"] if keep(k)})

    def values(key: str) -> set[str]:
        open_dict = key.startswith(OPEN_DICTS)
        return {json.dumps(r["_config"].get(key), default=str) for r in records if open_dict or key in r["_config"]}
    return [k for k in keys if len(values(k)) > 1]


def _label(records: list[dict]) -> None:
    """Set ``setting`` (data, noise, other differing keys) and ``variant`` (method + its differing ``method.*``
    and ``task.*`` keys, e.g. ``gex (num_members=32)`` or ``gex (task.mode=oracle)``)."""
    def group(key):
        out: dict[Any, list[dict]] = {}
        for rec in records:
            out.setdefault(key(rec), []).append(rec)
        return out.values()
    fixed = {"seed", "task", "method", "data", "data.name", "noise.kind", "noise.rate", "method.name", "task.name"}
    for recs in group(lambda r: (r["task"], r["data"], r["noise_kind"], r["noise_rate"])):
        extra = _varying(recs, lambda k: k not in fixed and not k.startswith(ROW_KEYS))
        for rec in recs:
            noise = f" {rec['noise_kind']} {rec['noise_rate']:g}" if rec["noise_kind"] != "none" else ""
            rec["setting"] = rec["data"] + noise + "".join(f" {k}={rec['_config'].get(k)}" for k in extra)
    for recs in group(lambda r: (r["task"], r["setting"], r["method"])):
        extra = _varying(recs, lambda k: k.startswith(ROW_KEYS) and k not in fixed)
        for rec in recs:
            detail = ", ".join(f"{k.removeprefix('method.')}={rec['_config'].get(k)}" for k in extra)
            rec["variant"] = f"{rec['method']} ({detail})" if detail else rec["method"]
            if rec["task"] == "relabel" and rec.get("relabel_mode") == "oracle":
                rec["variant"] = "oracle"   # a retrain on the true labels: no method enters it, nor its flags
                for key in ORACLE_UNUSED:
                    rec.pop(key, None)


def load_runs(paths: str | Path | Sequence[str | Path], exclude: Iterable[Path] = ()
              ) -> tuple[pd.DataFrame, list[str]]:
    """Read every run record at or below ``paths`` into one frame.

    Args:
        paths: run directories (searched recursively) or glob patterns (``**`` allowed).
        exclude: directories not to read (the report's own output).

    Returns:
        ``(frame, problems)``: one row per kept run with the columns ``task, setting, method, variant, data,
        noise_kind, noise_rate, model, seed, path, config_version``, every metric (numbers and strings such as
        ``git``, ``torch``) and stage times; and one line per run left out (``incomplete:``, ``duplicate:``,
        ``config version:``, ``unreadable:``) or worth knowing (``info:``, ``missing:``).
    """
    patterns = [paths] if isinstance(paths, (str, Path)) else list(paths)
    dirs, problems = _run_dirs(patterns, exclude)
    records = []
    for run_dir in dirs:
        record, problem = _read_run(run_dir)
        if problem:
            problems.append(problem)
        else:
            records.append(record)
    records, dup = _drop_duplicates(records)
    records, ver = _check_versions(records)
    _label(records)
    frame = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in records])
    if not frame.empty:
        rest = sorted(c for c in frame.columns if c not in META)
        frame = frame[list(META) + rest].sort_values(["task", "setting", "variant", "seed", "path"],
                                                     ignore_index=True)
    return frame, problems + dup + ver


# ------------------------------------------------------------------------------------------- statistics
def long_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, numeric metric): ``task, setting, method, seed, metric, value``.

    A key ``<m>.<metric>`` is attributed to method ``m`` (the run's own row label when ``m`` is the run's
    method); pretraining rows are labelled by model.
    """
    if frame.empty:
        return pd.DataFrame(columns=["task", "setting", "method", "seed", "metric", "value"])
    metric_cols = [c for c in frame.columns if c not in META and pd.api.types.is_numeric_dtype(frame[c])]
    base = frame.assign(row=[r[ROW_COLUMN.get(r["task"], "variant")] for _, r in frame.iterrows()])
    long = base.melt(id_vars=["task", "setting", "method", "row", "seed"], value_vars=metric_cols,
                     var_name="key", value_name="value").dropna(subset=["value"])
    prefix = long["key"].str.extract(r"^([^.]+)\.(.+)$")
    own = prefix[0].isna() | (prefix[0] == long["method"])
    long["method"] = np.where(own, long["row"], prefix[0])
    long["metric"] = np.where(prefix[1].isna(), long["key"], prefix[1])
    return long[["task", "setting", "method", "seed", "metric", "value"]].reset_index(drop=True)


def pool_seeds(long: pd.DataFrame) -> pd.DataFrame:
    """One value per (task, setting, method, metric, seed): a reference measured by several runs of one seed
    (``random.*`` in every prune run, ``test_acc_no_relabel`` in every relabel run) counts once."""
    keys = ["task", "setting", "method", "metric", "seed"]
    return long.groupby(keys, dropna=False, sort=True)["value"].mean().reset_index()


def _check_options(resamples: int, level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"ci={level} is invalid; choose a level in (0, 1), e.g. ci=0.95")
    if resamples < 1:
        raise ValueError(f"bootstrap={resamples} is invalid; choose at least 1 resample, e.g. bootstrap=1000")


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean.

    Args:
        values: ``(n,)`` one value per seed.
        resamples: bootstrap resamples (each draws n values with replacement).
        level: interval level in (0, 1).
        seed: RNG seed (a fresh generator per call, so the result does not depend on call order).

    Returns:
        ``(low, high)``: the ``(1-level)/2`` and ``(1+level)/2`` quantiles of the resampled means; both equal the
        value when n = 1, NaN when n = 0. Always within ``[min(values), max(values)]``.

    Raises:
        ValueError: on ``level`` outside (0, 1) or ``resamples`` < 1.
    """
    _check_options(resamples, level)
    values = np.asarray(values, dtype=float)
    if values.size <= 1:
        value = float(values[0]) if values.size else math.nan
        return value, value
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarize(pooled: pd.DataFrame, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Statistics over seeds per (task, setting, method, metric).

    Returns:
        Columns ``task, setting, method, metric, n, mean, std, ci_low, ci_high``; ``std`` is the sample standard
        deviation (``ddof=1``, NaN for one seed), the interval is ``bootstrap_ci``.

    Raises:
        ValueError: on a bad ``resamples`` or ``level`` (checked even when no cell has two seeds).
    """
    _check_options(resamples, level)
    rows = []
    for key, part in pooled.groupby(["task", "setting", "method", "metric"], sort=True):
        vals = part["value"].to_numpy(dtype=float)
        low, high = bootstrap_ci(vals, resamples, level, seed)
        rows.append(dict(zip(["task", "setting", "method", "metric"], key), n=len(vals), mean=float(vals.mean()),
                         std=float(vals.std(ddof=1)) if len(vals) > 1 else math.nan, ci_low=low, ci_high=high))
    return pd.DataFrame(rows, columns=["task", "setting", "method", "metric", "n", "mean", "std", "ci_low",
                                       "ci_high"])


# ---------------------------------------------------------------------------------------------- tables
@dataclass
class Cell:
    """One table entry: statistics over seeds and whether it is the column's best."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    best: bool = False


@dataclass
class Table:
    """A method x (setting, metric) table, ready to render."""

    task: str
    title: str
    rows: list[str]
    columns: list[tuple[str, str, str]]           # (setting, metric, label)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)   # (row, column label) -> cell
    note: str = ""
    decimals: dict[str, int] = field(default_factory=dict)             # column label -> decimals shown


def _direction(metric: str) -> str | None:
    """``min``/``max`` when the metric has a better end, else None (no bold)."""
    if LOWER_IS_BETTER.fullmatch(metric):
        return "min"
    return "max" if HIGHER_IS_BETTER.fullmatch(metric) else None


def _mark_best(table: Table) -> None:
    """Bold the best mean per column (ties all bold); columns with fewer than two ranked entries have no best."""
    for setting, metric, label in table.columns:
        cells = [c for (r, col), c in table.cells.items()
                 if col == label and np.isfinite(c.mean) and r not in UNRANKED_ROWS]
        how = _direction(metric)
        if how is None or len(cells) < 2:
            continue
        best = min(c.mean for c in cells) if how == "min" else max(c.mean for c in cells)
        for c in cells:
            c.best = bool(np.isclose(c.mean, best, rtol=0, atol=TIE_TOL))


def _select(stats: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """The rows of ``stats`` the spec shows, with a ``shown`` column label per metric and a sort key."""
    if spec.pattern:
        got = stats["metric"].str.extract(f"^{spec.pattern}$")[0]
        part = stats[got.notna()].assign(shown=got[got.notna()] + "%", order=pd.to_numeric(got[got.notna()]))
    else:
        metrics = list(spec.metrics) or sorted(stats["metric"].unique())
        part = stats[stats["metric"].isin(metrics)]
        part = part.assign(shown=part["metric"], order=part["metric"].map(metrics.index))
    return part


def _references_last(names: Iterable[str]) -> list[str]:
    names = sorted(set(names))
    return [n for n in names if n not in REFERENCE_ROWS] + [n for n in REFERENCE_ROWS if n in names]


def _order_rows(table: Table) -> None:
    """Best row first by the first column that tells the ranked rows apart (ties and blanks: by name); the
    reference rows last."""
    names = _references_last({r for r, _ in table.cells} | set(table.rows))
    ranked = [n for n in names if n not in REFERENCE_ROWS]
    for setting, metric, label in table.columns:
        values = {n: table.cells[n, label].mean for n in ranked
                  if (n, label) in table.cells and np.isfinite(table.cells[n, label].mean)}
        how = _direction(metric)
        if how is None or len(set(np.round(list(values.values()), 12))) < 2:
            continue
        sign = 1.0 if how == "min" else -1.0
        ranked = sorted(values, key=lambda n: (sign * values[n], n)) + [n for n in ranked if n not in values]
        break
    table.rows = ranked + [n for n in REFERENCE_ROWS if n in names]


def build_table(stats: pd.DataFrame, task: str, spec: TableSpec | None = None, level: float = 0.95,
                resamples: int = 1000) -> Table:
    """The task's table, method x (setting, metric), from ``summarize`` output.

    A one-seed cell whose run stored its own interval (``<metric>_ci_low`` / ``<metric>_ci_high``, as the
    groundtruth LDS does over test samples) shows that interval.

    Args:
        stats: ``summarize`` output (reference rows such as ``no relabel`` already mapped, see ``write_report``).
        task: the task to tabulate.
        spec: layout; default ``TABLES[task]``, or every metric for a task not listed there.
        level: interval level, for the note.
        resamples: bootstrap resamples, for the note.

    Returns:
        The table, best entries marked.

    Raises:
        ValueError: when the task has no statistics to show.
    """
    spec = spec or TABLES.get(task) or TableSpec(f"{task} (generic)")
    part = _select(stats[stats["task"] == task], spec)
    if part.empty:
        raise ValueError(f"task={task!r} has no metrics to tabulate; expected {spec.metrics or spec.pattern}")
    cols = part[["setting", "order", "metric", "shown"]].drop_duplicates().sort_values(["setting", "order"])
    multi_set, multi_met = cols["setting"].nunique() > 1, cols["shown"].nunique() > 1
    label = {(s, m): (f"{s}: {sh}" if multi_set and multi_met else s if multi_set else sh)
             for s, _, m, sh in cols.itertuples(index=False)}
    table = Table(task, spec.title, sorted(set(part["method"])), [(s, m, label[s, m]) for s, m in
                                                                  zip(cols["setting"], cols["metric"])])
    own = stats.set_index(["task", "setting", "method", "metric"])["mean"]
    for r in part.itertuples(index=False):
        low, high = r.ci_low, r.ci_high
        if r.n == 1 and (task, r.setting, r.method, f"{r.metric}_ci_low") in own.index:
            low = own[task, r.setting, r.method, f"{r.metric}_ci_low"]
            high = own.get((task, r.setting, r.method, f"{r.metric}_ci_high"), high)
        table.cells[r.method, label[r.setting, r.metric]] = Cell(int(r.n), r.mean, r.std, float(low), float(high))
    _mark_best(table)
    _order_rows(table)
    for *_, col in table.columns:  # one number format per column, so that its entries line up
        means = [abs(c.mean) for (_, lab), c in table.cells.items() if lab == col and np.isfinite(c.mean)]
        table.decimals[col] = FLOAT_DIGITS if max(means, default=0.0) < LARGE else LARGE_DIGITS
    n_min, n_max = int(part["n"].min()), int(part["n"].max())
    table.note = (f"mean ± std over seeds (sample std, ddof=1) [{level:.0%} percentile-bootstrap interval of the "
                  f"mean, {resamples} resamples]; seeds per cell: {n_min if n_min == n_max else f'{n_min}-{n_max}'}."
                  f" Bold: best per column (lowest for time/memory).")
    return table


def _cell_text(cell: Cell | None, decimals: int) -> tuple[str, str]:
    """(main text, interval text) of a cell: ``mean ± std`` (std only with 2+ seeds) and ``[low, high]``."""
    if cell is None:
        return "", ""
    num = lambda x: f"{x:.{decimals}f}" if np.isfinite(x) else "–"  # noqa: E731
    main = num(cell.mean) + (f" ± {num(cell.std)}" if cell.n > 1 else "")
    interval = f"[{num(cell.low)}, {num(cell.high)}]" if cell.n > 1 or cell.low != cell.high else ""
    return main, interval


def render_markdown(table: Table) -> str:
    """GitHub Markdown: a caption line, the table (best in ``**bold**``) and the note."""
    esc = lambda s: str(s).replace("|", r"\|")  # noqa: E731
    head = ["method"] + [esc(label) for _, _, label in table.columns]
    lines = [f"**{table.title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        out = [esc(row)]
        for _, _, label in table.columns:
            cell = table.cells.get((row, label))
            main, interval = _cell_text(cell, table.decimals.get(label, FLOAT_DIGITS))
            text = f"**{main}**" if cell is not None and cell.best else main
            out.append(f"{text} {interval}".strip())
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines + ["", f"_{table.note}_", ""])


def _tex(text: str) -> str:
    for char, sub in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                      ("–", "--"), ("±", r"$\pm$")):
        text = text.replace(char, sub)
    return text


def render_latex(table: Table) -> str:
    """A booktabs ``table`` environment; best entries in ``\\textbf``, intervals in ``\\scriptsize``."""
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(table.title)}}}",
             rf"\label{{tab:{_tex(table.task)}}}", r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
             r"\toprule", " & ".join(["method"] + [_tex(label) for *_, label in table.columns]) + r" \\",
             r"\midrule"]
    for row in table.rows:
        out = [_tex(row)]
        for *_, label in table.columns:
            cell = table.cells.get((row, label))
            main, interval = _cell_text(cell, table.decimals.get(label, FLOAT_DIGITS))
            main = rf"\textbf{{{_tex(main)}}}" if cell is not None and cell.best else _tex(main)
            out.append(main + (rf" {{\scriptsize {_tex(interval)}}}" if interval else ""))
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\par\footnotesize {_tex(table.note)}", r"\end{table}", ""]
    return "\n".join(lines)


def table_frame(table: Table) -> pd.DataFrame:
    """The table's numbers in long form: ``method, setting, metric, column, n, mean, std, ci_low, ci_high, best``."""
    rows = [dict(method=row, setting=s, metric=m, column=label, n=c.n, mean=c.mean, std=c.std, ci_low=c.low,
                 ci_high=c.high, best=c.best)
            for row in table.rows for s, m, label in table.columns if (c := table.cells.get((row, label)))]
    return pd.DataFrame(rows)


def _map_references(pooled: pd.DataFrame) -> pd.DataFrame:
    """Turn reference metrics into rows (``test_acc_no_relabel`` -> row ``no relabel``, metric ``test_acc``),
    then pool again so a reference that every method's run measured counts once per seed."""
    parts = [pooled]
    for task, spec in TABLES.items():
        for source, row, target in spec.references:
            hit = pooled[(pooled["task"] == task) & (pooled["metric"] == source)]
            parts.append(hit.assign(method=row, metric=target))
    return pool_seeds(pd.concat(parts, ignore_index=True))


# --------------------------------------------------------------------------------------------- figures
def _scores(path: str, notes: list[str]) -> dict | None:
    try:
        return load_artifact(Path(path) / "scores.pt", "scores")
    except ArtifactError as err:
        notes.append(f"figure input skipped: {err}")
        return None


def _per_method(scores: dict, name: str, own: str) -> dict[str, Any]:
    """``{method: tensor}`` from ``scores[name]`` (the run's own method), a ``scores[name]`` dict, or
    ``<m>.<name>`` keys."""
    found = dict(scores[name]) if isinstance(scores.get(name), dict) else (
        {own: scores[name]} if name in scores else {})
    found |= {k[: -len(name) - 1]: v for k, v in scores.items() if k.endswith(f".{name}")}
    return found


def _metric(row: pd.Series, method: str, name: str) -> float:
    """``<method>.<name>`` of a run, or the bare ``<name>`` when ``method`` is the run's own (NaN if absent)."""
    for key in (f"{method}.{name}", name if method == row["method"] else None):
        value = row.get(key) if key else None
        if _number(value) and np.isfinite(value):
            return float(value)
    return math.nan


def _prefixes(row: pd.Series, name: str) -> list[str]:
    """Methods ``m`` for which the run holds a number ``<m>.<name>``."""
    return [k[: -len(name) - 1] for k, v in row.items() if k.endswith(f".{name}") and _number(v) and np.isfinite(v)]


def _first_seeds(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, variant) the run with the lowest seed and a ``scores.pt``."""
    has = runs[np.array([(Path(p) / "scores.pt").is_file() for p in runs["path"]], dtype=bool)]
    return has.sort_values(["setting", "variant", "seed"]).groupby(["setting", "variant"]).head(1)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _fig1(frame: pd.DataFrame, fig_dir: Path, notes: list[str]) -> list[Path]:
    runs = _first_seeds(frame[frame["task"] == "detect"])
    if runs.empty:
        notes.append("Fig. 1 skipped: no detect run has a scores.pt")
        return []
    written = []
    for setting, part in runs.groupby("setting"):
        panels = []
        for _, row in part.iterrows():
            scores = _scores(row["path"], notes)
            if scores is not None and "is_noisy" not in scores:
                notes.append(f"Fig. 1: {row['path']}/scores.pt has no is_noisy mask; skipped")
            if scores is None or "is_noisy" not in scores:
                continue
            for method, values in _per_method(scores, "self_influence", row["variant"]).items():
                key = row["method"] if method == row["variant"] else method
                panels.append((values, scores["is_noisy"], f"{method}  AUROC {_metric(row, key, 'auroc'):.4f} / "
                               f"AP {_metric(row, key, 'ap'):.4f} (seed {row['seed']})"))
        if panels:
            written += plots.plot_self_influence_panel(panels, fig_dir / f"fig1_{_slug(setting)}",
                                                       suptitle=f"Self-influence, {setting}")
    return written


def _fig2(frame: pd.DataFrame, fig_dir: Path, notes: list[str]) -> list[Path]:
    runs = _first_seeds(frame[frame["task"] == "toy"])
    written = []
    for _, row in runs.iterrows():
        scores = _scores(row["path"], notes) or {}
        est = {m: v for m, v in _per_method(scores, "self_influence", "").items() if m}
        # estimators also stored under their bare names (``loo``, ``gex``): those with ``<m>.auroc`` in the run
        est |= {m: scores[m] for m in _prefixes(row, "auroc") if m not in est and hasattr(scores.get(m), "shape")}
        mask = next((scores[k] for k in ("is_influential", "is_minority", "is_noisy") if k in scores), None)
        if not est or mask is None:
            notes.append(f"Fig. 2 skipped for {row['path']}: scores.pt holds no per-estimator scores "
                         f"(<m>.self_influence) with an is_influential mask")
            continue
        subs = {m: f"AUROC {_metric(row, m, 'auroc'):.3f} / AP {_metric(row, m, 'ap'):.3f}" for m in est}
        stem, title = fig_dir / f"fig2_{_slug(row['setting'])}", f"Toy, {row['setting']} (seed {row['seed']})"
        if "x" in scores:
            written += plots.plot_toy_panel(scores["x"], est, mask, title, stem, subtitles=subs)
        else:
            # toy scores span decades (a few influential points dominate): bin their log10, floored
            panels = [(np.log10(np.maximum(plots.as_numpy(v).astype(float), LOG_FLOOR)), mask, f"{m}  {subs[m]}")
                      for m, v in est.items()]
            written += plots.plot_self_influence_panel(panels, stem, labels=("typical", "influential"),
                                                       suptitle=title, xlabel="log10 self-influence")
    if runs.empty:
        notes.append("Fig. 2 skipped: no toy run has a scores.pt")
    return written


def _fig_prune(pooled: pd.DataFrame, fig_dir: Path) -> list[Path]:
    part = pooled[pooled["task"] == "prune"]
    pct = part["metric"].str.extract(r"^test_acc_at_(\d+)$")[0]
    part, written = part[pct.notna()].assign(pct=pd.to_numeric(pct[pct.notna()])), []
    for setting, sp in part.groupby("setting"):
        curves = {}
        for method, mp in sp.groupby("method"):
            grid = mp.pivot_table(index="seed", columns="pct", values="value", dropna=False)
            curves[method] = (grid.columns.to_numpy(), grid.to_numpy())
        written += plots.plot_pruning_curves(curves, f"Pruning, {setting}", fig_dir / f"prune_{_slug(setting)}")
    return written


def _fig_relabel(pooled: pd.DataFrame, fig_dir: Path) -> list[Path]:
    part, written = pooled[(pooled["task"] == "relabel") & (pooled["metric"] == "test_acc")], []
    for setting, sp in part.groupby("setting"):
        bars = {m: sp[sp["method"] == m]["value"].to_numpy() for m in _references_last(sp["method"])}
        written += plots.plot_relabel_bars(bars, f"Relabeling, {setting}", fig_dir / f"relabel_{_slug(setting)}")
    return written


def _fig_cost(pooled: pd.DataFrame, fig_dir: Path) -> list[Path]:
    part, written = pooled[pooled["task"] == "detect"], []
    if part.empty:
        return written
    wide = part.pivot_table(index=["setting", "method", "seed"], columns="metric", values="value").reset_index()
    if "auroc" not in wide:
        return written
    col = lambda name: wide[name] if name in wide else pd.Series(np.nan, index=wide.index)  # noqa: E731
    fit_score = col("wall_s_fit") + col("wall_s_score")   # the method's cost, without pretraining
    wide["cost"] = fit_score.where(fit_score.notna(), col("wall_s"))
    for setting, sp in wide.dropna(subset=["cost", "auroc"]).groupby("setting"):
        points = {m: (mp["cost"].to_numpy(), mp["auroc"].to_numpy()) for m, mp in sp.groupby("method")}
        written += plots.plot_cost_quality(points, f"AUROC vs wall time, {setting}",
                                           fig_dir / f"cost_quality_{_slug(setting)}",
                                           xlabel="wall time of fit + score (s)")
    return written


def _fig_groundtruth(frame: pd.DataFrame, fig_dir: Path, notes: list[str]) -> list[Path]:
    runs, written = _first_seeds(frame[frame["task"] == "groundtruth"]), []
    for _, row in runs.iterrows():
        scores = _scores(row["path"], notes) or {}
        pred, meas = _per_method(scores, "predicted", row["variant"]), _per_method(scores, "measured", row["variant"])
        pairs = [m for m in pred if m in meas]
        if not pairs:
            notes.append(f"groundtruth scatter skipped for {row['path']}: scores.pt has no predicted/measured")
        for m in pairs:
            written += plots.plot_groundtruth_scatter(pred[m], meas[m], f"{m}, {row['setting']}",
                                                      fig_dir / f"groundtruth_{_slug(row['setting'])}_{_slug(m)}")
    return written


def _figures(frame: pd.DataFrame, pooled: pd.DataFrame, fig_dir: Path, notes: list[str]) -> list[Path]:
    """Every figure the runs allow; a figure whose inputs are malformed becomes a note, not a failed report."""
    makers = [("Fig. 1", lambda: _fig1(frame, fig_dir, notes)), ("Fig. 2", lambda: _fig2(frame, fig_dir, notes)),
              ("pruning curves", lambda: _fig_prune(pooled, fig_dir)),
              ("relabel bars", lambda: _fig_relabel(pooled, fig_dir)),
              ("cost vs quality", lambda: _fig_cost(pooled, fig_dir)),
              ("groundtruth scatter", lambda: _fig_groundtruth(frame, fig_dir, notes))]
    written = []
    for name, make in makers:
        try:
            written += make()
        except ValueError as err:   # plots' one-line shape errors, unreadable scores (ArtifactError)
            notes.append(f"{name} failed: {err}")
    return written


# ---------------------------------------------------------------------------------------------- writing
def _machine() -> str:
    info = versions()
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, device {info['host_device']}; python {info['python']}, "
            f"torch {info['torch']}, gex-bench git {info['git']}")


def _summary(out: Path, frame: pd.DataFrame, problems: list[str], tables: dict[str, Table],
             figures: list[Path], notes: list[str], command: str) -> str:
    tasks = frame["task"].value_counts().sort_index().items() if not frame.empty else []
    counts = ", ".join(f"{t}: {n}" for t, n in tasks) or "none"
    lines = ["# gex-bench report", "", f"Regenerate: `{command}`  ", f"Generated {datetime.now():%Y-%m-%d %H:%M} "
             f"on {_machine()}.", "", f"Runs read: {len(frame)} ({counts}); every run: [runs.csv](runs.csv); "
             f"every metric: [tables/all_metrics.csv](tables/all_metrics.csv).", "", "## Problems", ""]
    lines += [f"- {p}" for p in problems] or ["- none"]
    lines += ["", "## Tables", ""]
    for task, table in tables.items():
        links = " · ".join(f"[{ext}](tables/{task}.{ext})" for ext in ("md", "csv", "tex"))
        lines += [f"### {task}", "", links, "", render_markdown(table)]
    lines += ["## Figures", ""]
    for png in (p for p in figures if p.suffix == ".png"):
        rel = png.relative_to(out).as_posix()
        lines += [f"![{png.stem}]({rel}) ([pdf]({rel[:-4]}.pdf))", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_report(frame: pd.DataFrame, problems: list[str], out: str | Path, *, resamples: int = 1000,
                 level: float = 0.95, seed: int = 0, command: str = "python -m experiments.report",
                 logger: RunLogger | None = None) -> dict[str, Any]:
    """Write runs.csv, the tables, the figures and summary.md under ``out``; mirror tables and images to W&B.

    Returns:
        ``{"tables": {task: Table}, "figures": [paths], "notes": [skipped figures], "summary": path}``.
    """
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    atomic_write_text(frame.to_csv(index=False), out / "runs.csv")
    pooled = _map_references(pool_seeds(long_metrics(frame)))
    stats = summarize(pooled, resamples, level, seed)
    atomic_write_text(stats.to_csv(index=False), out / "tables" / "all_metrics.csv")
    tables = {task: build_table(stats, task, level=level, resamples=resamples)
              for task in sorted(stats["task"].unique())}
    for task, table in tables.items():
        atomic_write_text(render_markdown(table), out / "tables" / f"{task}.md")
        atomic_write_text(table_frame(table).to_csv(index=False), out / "tables" / f"{task}.csv")
        atomic_write_text(render_latex(table), out / "tables" / f"{task}.tex")
    notes: list[str] = []
    figures = _figures(frame, pooled, out / "figures", notes) if not frame.empty else []
    summary = out / "summary.md"
    atomic_write_text(_summary(out, frame, problems, tables, figures, notes, command), summary)
    if logger is not None:
        for task, table in tables.items():
            logger.table(f"report/{task}", table_frame(table))
        for png in (p for p in figures if p.suffix == ".png"):
            logger.image(f"report/{png.stem}", png)
    return {"tables": tables, "figures": figures, "notes": notes, "summary": summary}


# ------------------------------------------------------------------------------------------ entry point
def _patterns(runs: Any) -> list[str]:
    items = list(runs) if isinstance(runs, (list, tuple, ListConfig)) else [runs]
    return [str(p) for p in items]


def _report_dir(runs: Any, out: Any, runs_root: str) -> str:
    """The Hydra run directory: ``out`` when given, else ``<runs>/report`` for one folder, else a timestamped one."""
    if out is not None:
        return str(out)
    items = _patterns(runs) if runs is not None else []
    if len(items) == 1 and Path(items[0]).is_dir():
        return str(Path(items[0]) / "report")
    return str(Path(runs_root) / "report" / _STARTED)


_STARTED = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")   # once per process, so every resolution agrees
if not OmegaConf.has_resolver("gex_report_dir"):
    OmegaConf.register_new_resolver("gex_report_dir", _report_dir)


def _command() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        args = list(HydraConfig.get().overrides.task)
    except ValueError:
        args = sys.argv[1:]
    return " ".join(["python -m experiments.report", *map(shlex.quote, args)])


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Read the runs below ``cfg.runs``, write the report to ``cfg.out`` (default: the run directory)."""
    if OmegaConf.is_missing(cfg, "runs"):
        raise UsageError("runs is required: python -m experiments.report runs=<run folder or glob> [out=<dir>]")
    out = Path(cfg.out) if cfg.get("out") else Path(run_dir)
    frame, problems = load_runs(_patterns(cfg.runs), exclude=[out])
    for line in problems:
        print(line)
    if frame.empty:
        raise UsageError(f"runs={cfg.runs} holds no finished run record (a folder with metrics.json); "
                         f"point runs= at a Hydra output folder or glob")
    result = write_report(frame, problems, out, resamples=int(cfg.bootstrap), level=float(cfg.ci),
                          seed=int(cfg.seed), command=_command(), logger=logger)
    print(f"report: {len(frame)} runs, {len(problems)} problem(s), {len(result['tables'])} tables, "
          f"{len(result['figures'])} figure files -> {result['summary']}")
    left_out = sum(1 for p in problems if not p.startswith(("info:", "missing:")))
    return {"n_runs": len(frame), "n_left_out": left_out, "n_tables": len(result["tables"]),
            "n_figures": len(result["figures"]) // len(plots.FORMATS)}


@hydra.main(config_path="../configs", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("report")(run)(cfg)


if __name__ == "__main__":
    cli(main)
