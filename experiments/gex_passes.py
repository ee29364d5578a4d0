"""Cheaper GEX passes, measured: ``python -m experiments.gex_passes [passes.rounds=3]``.

On the default setting with GEX's shipped members (built or read from the cache), times in alternating rounds
(``bench.timing.alternate``) and reports as medians with the per-round range:

- one member's evaluation pass over the training set at each ``passes.batch_sizes``;
- all members one pass each against ``passes.members_per_pass`` members stacked per pass (vmapped);
- the BN refresh of a member with each ``passes.bn_batches``, and what fewer batches do to the scores: GEX
  self-influence recomputed with every member's statistics refreshed from that many batches, its AUROC / AP and
  its Spearman correlation with the shipped scores.

Writes ``passes.md`` and ``metrics.json``; see docs/gex_cost.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig
from scipy.stats import spearmanr

from bench.tables import markdown_table
from bench.timing import alternate, median_ratios, timed
from experiments.launch import cli, entry_point
from experiments.metrics import detection_metrics
from experiments.scaffold import (RunLogger, RunRecord, UsageError, load_task, method_from_cfg, settings_from,
                                  typed_config, versions)
from gex.ensemble import bn_generator, cycle_recipe
from gex.evaluation import losses_for_states, losses_for_states_batched, per_sample_losses
from gex.runs import atomic_write_text
from gex.train import update_bn

__all__ = ["PassesConfig", "run"]


@dataclass
class PassesConfig:
    """Options of ``gex_passes`` (``passes.*``).

    Attributes:
        rounds: timed rounds of each comparison (alternating).
        batch_sizes: evaluation batch sizes compared (the first is the reference of the ratios).
        members_per_pass: members stacked per vmapped evaluation pass, compared with one member per pass.
        bn_batches: BN-refresh batch counts compared (the first is the shipped one).
    """

    rounds: int = 3
    batch_sizes: list[int] = field(default_factory=lambda: [1024, 256, 128])
    members_per_pass: int = 8
    bn_batches: list[int] = field(default_factory=lambda: [50, 20, 10])

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.members_per_pass < 1 or not self.batch_sizes or not self.bn_batches:
            raise UsageError("passes.rounds and passes.members_per_pass must be positive, passes.batch_sizes and "
                             "passes.bn_batches non-empty")


def _rows(what: str, runs: dict[str, list[tuple]], base: str) -> list[dict]:
    ratios = median_ratios({k: [r[0] for r in v] for k, v in runs.items()}, base)
    return [{"what": what, "setting": k, "wall_s": r["median"], "speedup": r["ratio"], "speedup_min": r["ratio_min"],
             "speedup_max": r["ratio_max"]} for k, r in ratios.items()]


def eval_batch_rows(task, state, opts: PassesConfig, device) -> list[dict]:
    """One member's loss pass at each batch size, alternating."""
    model = copy.deepcopy(task.model)
    model.load_state_dict(state)
    fns = {f"batch {b}": (lambda b=b: per_sample_losses(model, task.train, task.loss, b)) for b in opts.batch_sizes}
    return _rows("eval pass, one member", alternate(fns, opts.rounds, lambda fn: timed(fn, device)),
                 f"batch {opts.batch_sizes[0]}")


def stacked_rows(task, members, opts: PassesConfig, batch: int, device) -> list[dict]:
    """All members one pass each against ``members_per_pass`` stacked per pass."""
    k = min(opts.members_per_pass, len(members))
    fns = {"one member per pass": lambda: losses_for_states(task.model, members, task.train, task.loss, batch),
           f"{k} members per pass": lambda: losses_for_states_batched(task.model, members, task.train, task.loss,
                                                                      batch, k)}
    return _rows(f"eval, {len(members)} members", alternate(fns, opts.rounds, lambda fn: timed(fn, device)),
                 "one member per pass")


def refreshed(task, members, gex_cfg, bn_batches: int) -> list[dict]:
    """The members with BN statistics recomputed from ``bn_batches`` batches (the member's own generator)."""
    recipe = replace(cycle_recipe(gex_cfg, task.loss), bn_batches=bn_batches)
    out = []
    for index, state in enumerate(members):
        model = copy.deepcopy(task.model)
        model.load_state_dict(state)
        update_bn(model, task.train, recipe, bn_generator(task, index), task.device)
        out.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return out


def bn_rows(task, gex, members, opts: PassesConfig, device) -> list[dict]:
    """Refresh time per member at each batch count, and the scores that result."""
    model = copy.deepcopy(task.model)
    fns = {}
    for b in opts.bn_batches:
        recipe = replace(cycle_recipe(gex.config, task.loss), bn_batches=b)
        fns[f"bn_batches {b}"] = lambda recipe=recipe: update_bn(model, task.train, recipe, task.generator(1),
                                                                task.device)
    rows = _rows("BN refresh, one member", alternate(fns, opts.rounds, lambda fn: timed(fn, device)),
                 f"bn_batches {opts.bn_batches[0]}")
    reference = gex.references(task.train)
    shipped = gex.self_influence(task.train)
    noisy = task.train.is_noisy.cpu()
    for row, b in zip(rows, opts.bn_batches):
        states = refreshed(task, members, gex.config, b)
        losses = losses_for_states(task.model, states, task.train, task.loss, gex.batch_size)
        scores = (losses - reference[:, None]).pow(2).mean(1)
        metrics = detection_metrics(scores, noisy, task.seed)
        row |= {"auroc": metrics["auroc"], "ap": metrics["ap"],
                "spearman_vs_shipped": float(spearmanr(scores.numpy(), shipped.numpy()).statistic)}
    return rows


def run(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict:
    """Measure the passes on the default setting and write the table."""
    opts = typed_config(PassesConfig, cfg.passes, "passes")
    settings = settings_from(cfg)
    record = RunRecord(run_dir, cfg)
    _, task = load_task(settings, logger)
    gex = method_from_cfg(cfg.method).fit(task)
    members = list(gex.ensemble)
    device = settings.device
    rows = eval_batch_rows(task, members[0], opts, device)
    rows += stacked_rows(task, members, opts, gex.batch_size, device)
    rows += bn_rows(task, gex, members, opts, device)
    frame = pd.DataFrame(rows)
    atomic_write_text(f"# Cheaper GEX passes (M = {len(members)}, n = {len(task.train)}, "
                      f"{torch.get_num_threads()} threads)\n\n{markdown_table(frame)}\n", run_dir / "passes.md")
    metrics = {f"{r['what']} / {r['setting']}.{k}": r[k] for r in rows for k in r if k not in ("what", "setting")}
    metrics |= {"task": "gex_passes", "method": "gex", "data": settings.data.name, "seed": settings.seed,
                "threads": torch.get_num_threads(), "rounds": opts.rounds} | versions()
    record.write(metrics)
    print(markdown_table(frame))
    return metrics


@hydra.main(config_path="../configs", config_name="gex_passes", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry_point("gex_passes")(run)(cfg)


if __name__ == "__main__":
    cli(main)
