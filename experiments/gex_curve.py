"""GEX's accuracy against its cost: ``python -m experiments.gex_curve [seed=<k>] [experiment=<preset>]``.

For each ``ft_step`` in ``curve.ft_steps`` one chain of ``max(curve.members)`` members is built; a chain's first M
members are exactly the ensemble of ``GEX(num_members=M)``, so one fit gives every M. The wall of a point is
measured, not modelled: the fit of M members is the sum of the timed cycles of members 1..M (SGD steps and BN
refresh), and its scoring is the timed theta* pass plus the timed passes of members 1..M. Reference methods
(``curve.references``, default EL2N, CL and the loss) are fitted and scored in the same process, without the
artefact cache, so their walls are measured on the same machine state. ``curve.independent`` adds points whose
members all start from theta* (the ablation).

Writes ``curve.csv`` (one row per point), ``metrics.json`` and, across every record under ``curve.summary_of``,
the table and figure of ``summarize`` (mean over seeds). See ``docs/gex_cost.md``.
"""
from __future__ import annotations

import glob
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from experiments import plots
from experiments.launch import cli, entry_point
from experiments.metrics import detection_metrics
from experiments.scaffold import (
    RunLogger,
    RunRecord,
    UsageError,
    load_task,
    method_from_cfg,
    settings_from,
    typed_config,
    versions,
)
from gex.attribution import InfluenceTask
from gex.ensemble import EnsembleConfig, build_ensemble
from gex.evaluation import losses_for_states
from gex.runs import atomic_write_text
from gex.utils import peak_mem_mb

__all__ = ["CurveConfig", "chain_walls", "member_pass_losses", "curve_points", "summarize", "run"]

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class CurveConfig:
    """Options of ``gex_curve`` (``curve.*``).

    Attributes:
        members: ensemble sizes M to report; a chain of ``max(members)`` is built per ``ft_step``.
        ft_steps: SGD steps per cycle.
        independent: ``[M, ft_step]`` pairs scored with independent members (each from theta*).
        references: other methods fitted and scored in the same run, as reference points.
        peers: peer-library pairs of ``experiments.peers`` (e.g. ``trak``, ``tracin@fast``) whose peer scores the
            same training set in the same run, timed as one call (fit and score together), named by the library.
        summary_of: glob of record folders pooled into the table and figure after the run ("" = this run only).
        summary_out: folder of the pooled table and figure ("" = this run's folder).
        summary_only: measure nothing; pool the records of ``summary_of`` into ``summary_out``.
        knee_auroc, knee_ap, knee_seeds: the knee is the cheapest GEX point whose mean over at least
            ``knee_seeds`` seeds reaches AUROC >= ``knee_auroc`` and AP >= ``knee_ap``.
    """

    members: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    ft_steps: list[int] = field(default_factory=lambda: [25, 50, 100, 200, 400])
    independent: list[list[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=lambda: ["el2n", "cl", "loss"])
    peers: list[str] = field(default_factory=list)
    summary_of: str = ""
    summary_out: str = ""
    summary_only: bool = False
    knee_auroc: float = 0.99
    knee_ap: float = 0.94
    knee_seeds: int = 3

    def __post_init__(self) -> None:
        for key in ("members", "ft_steps"):
            values = getattr(self, key)
            if any(int(v) < 1 for v in values) or (not values and not (key == "ft_steps" and self.independent)):
                raise UsageError(f"curve.{key}={values!r} is invalid; give a non-empty list of positive integers "
                                 f"(ft_steps may be empty when curve.independent gives the points)")
        if any(len(p) != 2 or min(p) < 1 for p in self.independent):
            raise UsageError(f"curve.independent={self.independent!r} is invalid; give [[M, ft_step], ...]")
        from bench.peers import PAIRS
        if set(self.peers) - set(PAIRS):
            raise UsageError(f"curve.peers has unknown pairs {sorted(set(self.peers) - set(PAIRS))}; valid: "
                             f"{list(PAIRS)}")
        if self.summary_only and not (self.summary_of and self.summary_out):
            raise UsageError("curve.summary_only=true needs curve.summary_of (a glob of record folders) and "
                             "curve.summary_out")


def chain_walls(task: InfluenceTask, cfg: EnsembleConfig) -> list[float]:
    """Build the ``cfg.num_members`` members one at a time and return each member's measured cycle seconds.

    The seconds are kept in the artefact cache beside the members, so a resumed or repeated curve reports the
    walls measured when each member was trained, never the near-zero time of loading it; a member that another run
    trained (no wall recorded) gets NaN.
    """
    spec = {"pretrain": task.cache_spec, "loss": task.loss, "ensemble": cfg.member_spec()}
    walls = list(task.cache.load("member_walls", spec, "walls") or []) if task.cache is not None else []
    folder = task.cache.directory("ensemble", spec) if task.cache is not None else None
    for m in range(len(walls), cfg.num_members):
        # a member some other run trained has no measured wall: NaN, never the time of loading it
        found = folder is not None and (folder / f"member_{m}.pt").is_file()
        begin = time.perf_counter()
        build_ensemble(task, replace(cfg, num_members=m + 1))
        walls.append(float("nan") if found else time.perf_counter() - begin)
        if task.cache is not None:
            task.cache.save("member_walls", spec, "walls", walls)
    return walls[:cfg.num_members]


def member_pass_losses(task: InfluenceTask, ensemble, batch_size: int) -> tuple[torch.Tensor, list[float]]:
    """Member losses ``(n, M)`` and the measured seconds of each member's evaluation pass (the shared
    ``losses_for_states``, timed one member at a time)."""
    columns, walls = [], []
    for state in ensemble:
        begin = time.perf_counter()
        columns.append(losses_for_states(task.model, [state], task.train, task.loss, batch_size, desc="member"))
        walls.append(time.perf_counter() - begin)
    return torch.cat(columns, dim=1), walls


def curve_points(task: InfluenceTask, gex_cfg: DictConfig, members: list[int], ft_step: int, mode: str,
                 seed: int) -> list[dict]:
    """Every point ``(M, ft_step)`` for M in ``members`` from one chain (or set of independent members), scored
    with the configured GEX's reference rule."""
    options = OmegaConf.to_container(gex_cfg, resolve=True)
    gex = method_from_cfg(options | {"num_members": max(members), "ft_step": ft_step, "members": mode})
    fit_walls = chain_walls(task, replace(gex.config, batch_members=1))
    gex.fit(task)  # every member is in the cache (or memory) now: this only loads the ensemble
    begin = time.perf_counter()
    reference = gex.references(task.train)  # theta*'s eval pass
    reference_wall = time.perf_counter() - begin
    losses, pass_walls = member_pass_losses(task, gex.ensemble, gex.batch_size)
    noisy = task.train.is_noisy.cpu()
    rows = []
    for m in sorted(members):
        scores = (losses[:, :m] - reference[:, None]).pow(2).mean(dim=1)
        fit_s, score_s = sum(fit_walls[:m]), reference_wall + sum(pass_walls[:m])
        rows.append({"method": "gex", "members_mode": mode, "ft_step": ft_step, "members": m, "seed": seed,
                     "fit_s": fit_s, "score_s": score_s, "wall_s": fit_s + score_s}
                    | detection_metrics(scores, noisy, seed))
    return rows


def reference_point(task: InfluenceTask, name: str, seed: int) -> dict:
    """Fit and score ``configs/method/<name>.yaml`` without the cache (its wall is measured now)."""
    method = method_from_cfg(OmegaConf.load(CONFIGS / "method" / f"{name}.yaml"))
    uncached = replace(task, cache=None)
    begin = time.perf_counter()
    method.fit(uncached)
    fit_s = time.perf_counter() - begin
    begin = time.perf_counter()
    scores = method.self_influence(uncached.train)
    score_s = time.perf_counter() - begin
    return {"method": name, "members_mode": "", "ft_step": 0, "members": 0, "seed": seed, "fit_s": fit_s,
            "score_s": score_s, "wall_s": fit_s + score_s} | detection_metrics(scores, task.train.is_noisy.cpu(), seed)


def peer_point(task: InfluenceTask, pair: str, seed: int) -> dict:
    """The peer of ``pair`` on the training set (``bench.peers.peer_scores``): one timed call, reported as score
    seconds, with its detection metrics; the row is named by the peer library."""
    from bench.peers import peer_scores
    begin = time.perf_counter()
    scores, settings = peer_scores(task, pair)
    wall = time.perf_counter() - begin
    return {"method": settings["peer"], "members_mode": "", "ft_step": 0, "members": 0, "seed": seed, "fit_s": 0.0,
            "score_s": wall, "wall_s": wall} | detection_metrics(scores, task.train.is_noisy.cpu(), seed)


def on_frontier(stats: pd.DataFrame) -> list[str]:
    """Per row, the metrics (``auroc``, ``ap``) on which no other row is both at least as accurate and cheaper:
    the accuracy-cost frontier."""
    marks = []
    for row in stats.itertuples():
        hits = [m for m in ("auroc", "ap") if not any(
            (getattr(o, m) >= getattr(row, m) and o.wall_s < row.wall_s) or
            (getattr(o, m) > getattr(row, m) and o.wall_s <= row.wall_s) for o in stats.itertuples())]
        marks.append(" ".join(h.upper() for h in hits))
    return marks


def knee(stats: pd.DataFrame, auroc: float, ap: float, seeds: int) -> pd.Series | None:
    """The cheapest GEX point (mean wall) whose mean over at least ``seeds`` seeds reaches both thresholds."""
    ok = stats[(stats.method == "gex") & (stats.seeds >= seeds) & (stats.auroc >= auroc) & (stats.ap >= ap)]
    return None if ok.empty else ok.sort_values("wall_s").iloc[0]


def summarize(frame: pd.DataFrame, out: Path, title: str, opts: "CurveConfig | None" = None) -> pd.DataFrame:
    """Mean (and std, and seed count) over seeds per point, and the knee; writes ``curve.md`` and ``curve.png``
    into ``out``."""
    opts = opts or CurveConfig()
    frame = frame.assign(members_mode=frame.members_mode.fillna(""))
    keys = ["method", "members_mode", "ft_step", "members"]
    stats = frame.groupby(keys, dropna=False).agg(
        seeds=("seed", "nunique"), auroc=("auroc", "mean"), auroc_std=("auroc", "std"), ap=("ap", "mean"),
        ap_std=("ap", "std"), fit_s=("fit_s", "mean"), score_s=("score_s", "mean"), wall_s=("wall_s", "mean"),
    ).reset_index().sort_values(["method", "members_mode", "ft_step", "members"])
    stats["frontier"] = on_frontier(stats)
    point = knee(stats, opts.knee_auroc, opts.knee_ap, opts.knee_seeds)
    rule = (f"the cheapest GEX point whose mean over >= {opts.knee_seeds} seeds reaches AUROC >= {opts.knee_auroc} "
            f"and AP >= {opts.knee_ap}")
    verdict = (f"Knee ({rule}): M = {point.members}, ft_step = {point.ft_step} ({point.members_mode}), "
               f"{point.wall_s:.1f} s (fit {point.fit_s:.1f} s + score {point.score_s:.1f} s), AUROC {point.auroc:.4f}, "
               f"AP {point.ap:.4f}." if point is not None else f"No knee yet: no point is {rule}.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_markdown(stats, title) + f"\n{verdict}\n", out / "curve.md")
    lines = {f"gex {mode} ft_step={steps}": (grp.wall_s.tolist(), grp.auroc.tolist(), grp.ap.tolist(),
                                              [f"M={m}" for m in grp.members])
             for (mode, steps), grp in stats[stats.method == "gex"].groupby(["members_mode", "ft_step"])}
    refs = {row.method: (row.wall_s, row.auroc, row.ap) for row in stats[stats.method != "gex"].itertuples()}
    plots.plot_accuracy_cost(lines, refs, title, out / "curve.png")
    if len(refs) > 3:  # a campaign with many methods: the whole range, every method in the legend
        from bench.peers import PAIRS
        paired = {label: pair.partition("@")[0] for pair, (label, _, _) in PAIRS.items()}
        points = {method: (*point, paired.get(method)) for method, point in refs.items()}
        plots.plot_frontier(lines, points, f"{title}: every method", out / "frontier.png")
    return stats


def _markdown(stats: pd.DataFrame, title: str) -> str:
    head = ("| method | members | ft_step | M | seeds | AUROC | AP | fit s | score s | total s | on the frontier |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    def pm(mean, std):
        return f"{mean:.4f}" + (f" ± {std:.4f}" if std == std else "")  # std is NaN for one seed
    body = "".join(f"| {r.method} | {r.members_mode or '-'} | {r.ft_step or '-'} | {r.members or '-'} | {r.seeds} | "
                   f"{pm(r.auroc, r.auroc_std)} | {pm(r.ap, r.ap_std)} | {r.fit_s:.1f} | {r.score_s:.1f} | "
                   f"{r.wall_s:.1f} | {r.frontier} |\n" for r in stats.itertuples())
    return f"# {title}\n\n{head}{body}"


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Measure the curve for one seed, write the record, then pool the records of ``curve.summary_of``."""
    opts = typed_config(CurveConfig, cfg.curve, "curve")
    if opts.summary_only:
        metrics = _summary_only(opts) | {"task": "gex_curve_summary", "method": "gex"} | versions()
        RunRecord(run_dir, cfg).write(metrics)
        return metrics
    if cfg.method.name != "gex":
        raise UsageError(f"gex_curve measures GEX; got method={cfg.method.name}; drop the method override")
    settings = settings_from(cfg)
    record = RunRecord(run_dir, cfg)
    bundle, task = load_task(settings, logger)
    rows = []
    for steps in opts.ft_steps:
        rows += curve_points(task, cfg.method, list(opts.members), int(steps), "chain", settings.seed)
    for m, steps in opts.independent:
        rows += curve_points(task, cfg.method, [int(m)], int(steps), "independent", settings.seed)
    for name in opts.references:
        rows.append(reference_point(task, name, settings.seed))
    for pair in opts.peers:
        rows.append(peer_point(task, pair, settings.seed))
    frame = pd.DataFrame(rows).assign(data=settings.data.name, n_train=len(task.train))
    atomic_write_text(frame.to_csv(index=False), run_dir / "curve.csv")
    metrics = {f"{r['method']}_{r['members_mode']}_m{r['members']}_s{r['ft_step']}.{k}": r[k]
               for r in rows for k in ("auroc", "ap", "fit_s", "score_s")}
    metrics |= {"method": "gex", "task": "gex_curve", "data": settings.data.name, "seed": settings.seed,
                "reference": str(cfg.method.get("reference", "fit_aware")),
                "wall_s_pretrain": task.pretrain_wall_s, "peak_mem_mb": peak_mem_mb(settings.device),
                "threads": torch.get_num_threads()} | versions()
    record.write(metrics)
    pooled = _pooled(opts.summary_of) if opts.summary_of else frame
    out = Path(opts.summary_out) if opts.summary_out else run_dir
    stats = summarize(pooled, out, f"GEX accuracy against wall seconds ({settings.data.name})", opts)
    print(stats.to_string(index=False))
    return metrics


def _pooled(pattern: str) -> pd.DataFrame:
    paths = sorted(glob.glob(f"{pattern}/curve.csv"))
    if not paths:
        raise UsageError(f"curve.summary_of={pattern!r} matches no folder holding curve.csv")
    return pd.concat([pd.read_csv(p, keep_default_na=False, na_values=[]) for p in paths], ignore_index=True)


def _summary_only(opts: CurveConfig) -> dict:
    """Pool the records of ``summary_of`` into ``summary_out``; returns the knee (or nothing) as metrics."""
    frame = _pooled(opts.summary_of)
    data = ", ".join(sorted(set(frame["data"].astype(str))))
    stats = summarize(frame, Path(opts.summary_out), f"GEX accuracy against wall seconds ({data})", opts)
    print((Path(opts.summary_out) / "curve.md").read_text())
    point = knee(stats, opts.knee_auroc, opts.knee_ap, opts.knee_seeds)
    return {} if point is None else {"knee_members": int(point.members), "knee_ft_step": int(point.ft_step),
                                     "knee_wall_s": float(point.wall_s)}


@hydra.main(config_path="../configs", config_name="gex_curve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("gex_curve")(run)(cfg)


if __name__ == "__main__":
    cli(main)
