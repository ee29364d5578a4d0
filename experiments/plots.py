"""Figure helpers shared by the task entry points and ``experiments.report``.

Every ``plot_*`` function draws one figure with matplotlib's object API (no pyplot state, so it is safe in any
backend and any thread), writes it as PNG and PDF next to each other, and returns both paths. ``path`` may name
either file or neither (``figs/fig1``, ``figs/fig1.png``): the suffix is replaced. Files are written to a
temporary name in the same folder and renamed, so a reader never sees a half-written image.

Inputs are array-likes (NumPy arrays, lists or torch tensors on any device). Over-seed summaries use the mean
and the sample standard deviation (``ddof=1``; 0 for a single seed).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

__all__ = ["FORMATS", "as_numpy", "save_figure", "plot_self_influence_hist", "plot_self_influence_panel", "plot_accuracy_cost",
           "plot_frontier",
           "found_curve", "plot_detection_curve", "plot_pruning_curves", "plot_relabel_bars", "plot_cost_quality",
           "plot_toy_panel", "plot_groundtruth_scatter"]

FORMATS = ("png", "pdf")
DPI = 150                 # PNG resolution; PDF is vector
PANEL_SIZE = (4.0, 3.0)   # inches per subplot
HIST_BINS = 50
BAND_ALPHA = 0.2          # opacity of the over-seed bands
HIST_ALPHA = 0.6
HIST_YMIN = 0.8          # log-count axis floor: a bin holding 1 sample stays visible
BAR_MIN_SPAN = 1e-3     # smallest y-span of the relabel bar zoom
CLASS_COLORS = ("tab:blue", "tab:red")   # clean / flagged (noisy, minority, influential)


def as_numpy(values: Any) -> np.ndarray:
    """Any array-like (torch tensors included, on any device) as a NumPy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix.lower().lstrip(".") in FORMATS else path


def save_figure(fig: Figure, path: str | Path) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` atomically (temporary file, then rename).

    Args:
        fig: the figure to write.
        path: the stem, with or without a ``.png``/``.pdf`` suffix; parent folders are created.

    Returns:
        The written paths, PNG first.
    """
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in FORMATS:
        final = stem.parent / f"{stem.name}.{ext}"
        fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{final.name}.", suffix=f".tmp.{ext}")
        os.close(fd)
        try:
            fig.savefig(tmp, format=ext, dpi=DPI)   # constrained layout already fits the labels
            os.replace(tmp, final)
            # the layout is in figure coordinates, so the first format's serves the rest (it costs a full draw)
            fig.set_layout_engine("none")
        finally:
            Path(tmp).unlink(missing_ok=True)
        written.append(final)
    return written


def _grid(n: int, ncols: int) -> tuple[Figure, list]:
    """A figure with ``n`` subplots in rows of ``ncols``; unused axes are hidden."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _check_mask(scores: np.ndarray, mask: np.ndarray, what: str) -> None:
    if scores.ndim != 1 or mask.shape != scores.shape:
        raise ValueError(f"{what}: scores must be (n,) and the mask the same shape; got {scores.shape} "
                         f"and {mask.shape}")


def _plain_log_ticks(axis) -> None:
    """Log-axis labels as plain numbers (1, 10, 200, not 10^0), minor ticks labelled when the span is short."""
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def _hist(ax, scores: Any, mask: Any, title: str, labels: Sequence[str], bins: int,
          xlabel: str = "self-influence") -> None:
    """Clean vs flagged histograms on shared bins with log-scaled counts (the paper's Fig. 1 style).

    Non-finite scores (samples a method did not score) are left out of the bins and the legend counts.
    """
    scores, mask = as_numpy(scores).astype(float), as_numpy(mask).astype(bool)
    _check_mask(scores, mask, title)
    ok = np.isfinite(scores)
    edges = np.histogram_bin_edges(scores[ok], bins=bins) if ok.any() else bins
    for part, label, color in ((~mask & ok, labels[0], CLASS_COLORS[0]), (mask & ok, labels[1], CLASS_COLORS[1])):
        if part.any():
            ax.hist(scores[part], bins=edges, alpha=HIST_ALPHA, color=color, label=f"{label} ({part.sum()})")
    ax.set_yscale("log")
    ax.set_ylim(bottom=HIST_YMIN)
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count (log)")
    ax.set_title(title, fontsize=9)
    if ok.any():
        ax.legend(fontsize=8)


def plot_self_influence_hist(scores: Any, is_noisy: Any, title: str, path: str | Path, *,
                             labels: Sequence[str] = ("clean", "noisy"), bins: int = HIST_BINS) -> list[Path]:
    """One Fig.-1-style histogram of self-influence, clean vs noisy, log counts.

    Args:
        scores: ``(n,)`` self-influence (higher = more influential).
        is_noisy: ``(n,)`` bool mask of the flagged class (noisy, minority, influential).
        title: axes title, e.g. ``"GEX  AUROC 0.9999 / AP 0.9991"``.
        path: output stem (see ``save_figure``).
        labels: legend names of the unflagged and flagged samples.
        bins: number of shared histogram bins.

    Returns:
        ``[png, pdf]``.

    Raises:
        ValueError: when the scores are not ``(n,)`` or the mask has another shape.
    """
    return plot_self_influence_panel([(scores, is_noisy, title)], path, labels=labels, bins=bins)


def plot_self_influence_panel(panels: Sequence[tuple[Any, Any, str]], path: str | Path, *,
                              labels: Sequence[str] = ("clean", "noisy"), bins: int = HIST_BINS,
                              ncols: int = 3, suptitle: str | None = None,
                              xlabel: str = "self-influence") -> list[Path]:
    """Fig. 1 panel: one self-influence histogram per method.

    Args:
        panels: ``(scores (n,), mask (n,), title)`` per subplot.
        path: output stem.
        labels: legend names of the unflagged and flagged samples.
        bins: histogram bins per subplot.
        ncols: subplots per row.
        suptitle: optional figure title.
        xlabel: score axis label (e.g. ``"log10 self-influence"`` for scores passed in log scale).

    Returns:
        ``[png, pdf]``.

    Raises:
        ValueError: when ``panels`` is empty or a panel's shapes disagree.
    """
    if not panels:
        raise ValueError("panels is empty; give at least one (scores, mask, title)")
    fig, axes = _grid(len(panels), ncols)
    for ax, (scores, mask, title) in zip(axes, panels):
        _hist(ax, scores, mask, title, labels, bins, xlabel)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)


def found_curve(scores: Any, is_noisy: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of flagged samples found vs fraction of the set inspected, highest scores first.

    Returns:
        ``(inspected (n + 1,), found (n + 1,))``, both starting at 0 and ending at 1.
    """
    scores, mask = as_numpy(scores).astype(float), as_numpy(is_noisy).astype(bool)
    _check_mask(scores, mask, "detection curve")
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(mask[order]) / max(int(mask.sum()), 1)])
    return np.arange(len(scores) + 1) / max(len(scores), 1), found


def plot_detection_curve(scores: Mapping[str, Any], is_noisy: Any, title: str, path: str | Path) -> list[Path]:
    """Fraction of noisy labels found vs fraction of the training set inspected, one line per method.

    Args:
        scores: method name -> ``(n,)`` self-influence (inspected highest first).
        is_noisy: ``(n,)`` bool mask.
        title: axes title.
        path: output stem.

    Returns:
        ``[png, pdf]``.
    """
    fig, (ax,) = _grid(1, 1)
    for name, values in scores.items():
        ax.plot(*found_curve(values, is_noisy), label=name)
    rate = float(as_numpy(is_noisy).mean())
    ax.plot([0, rate, 1], [0, 1, 1], "k:", label="oracle")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", label="random")
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of noisy labels found")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _mean_std(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1, 0 where a single seed) over ``axis``, ignoring NaN."""
    values = np.asarray(values, dtype=float)
    count = np.sum(np.isfinite(values), axis=axis)
    mean = np.nanmean(values, axis=axis)
    var = np.nansum((values - np.expand_dims(mean, axis)) ** 2, axis=axis) / np.maximum(count - 1, 1)
    return mean, np.sqrt(var)


def plot_pruning_curves(curves: Mapping[str, tuple[Sequence[float], Any]], title: str,
                        path: str | Path) -> list[Path]:
    """Test accuracy vs percentage of the training set removed, mean line and a +/- std band over seeds.

    Args:
        curves: method -> ``(pcts (k,), accuracies (n_seeds, k))``; NaN marks a missing seed/percentage.
        title: axes title.
        path: output stem.

    Returns:
        ``[png, pdf]``.

    Raises:
        ValueError: when a method's accuracies do not have ``k`` columns.
    """
    fig, (ax,) = _grid(1, 1)
    for name, (pcts, acc) in curves.items():
        pcts, acc = np.asarray(pcts, dtype=float), np.atleast_2d(as_numpy(acc).astype(float))
        if acc.shape[1] != len(pcts):
            raise ValueError(f"pruning curve {name!r}: accuracies {acc.shape} do not match {len(pcts)} pcts")
        mean, std = _mean_std(acc)
        line, = ax.plot(pcts, mean, marker="o", label=f"{name} (n={acc.shape[0]})")
        ax.fill_between(pcts, mean - std, mean + std, color=line.get_color(), alpha=BAND_ALPHA)
    ax.set_xlabel("% of training set removed")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_relabel_bars(bars: Mapping[str, Sequence[float]], title: str, path: str | Path) -> list[Path]:
    """Test accuracy after relabeling, one bar per method/reference (mean, +/- std error bar over seeds).

    Args:
        bars: label (a method, ``no relabel``, ``oracle``) -> test accuracies over seeds.
        title: axes title.
        path: output stem.

    Returns:
        ``[png, pdf]``.
    """
    names = list(bars)
    stats = [_mean_std(np.asarray(bars[k], dtype=float)) for k in names]
    means, stds = np.array([m for m, _ in stats]), np.array([s for _, s in stats])
    fig = Figure(figsize=(max(PANEL_SIZE[0], 0.8 * len(names) + 1), PANEL_SIZE[1]), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ok = np.isfinite(means)
    if ok.any():  # zoom in: the interesting differences are a few points of accuracy
        low, high = float((means - stds)[ok].min()), float((means + stds)[ok].max())
        pad = max(high - low, BAR_MIN_SPAN) * 0.5
        ax.set_ylim(max(low - pad, 0.0), high + pad)
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_cost_quality(points: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str,
                      path: str | Path, *, xlabel: str = "wall time (s)", ylabel: str = "AUROC") -> list[Path]:
    """Quality vs cost, one point per method (mean over seeds, std error bars), log-scaled time axis.

    Args:
        points: method -> ``(costs over seeds, qualities over seeds)``.
        title: axes title.
        path: output stem.
        xlabel: cost axis label.
        ylabel: quality axis label.

    Returns:
        ``[png, pdf]``.
    """
    fig, (ax,) = _grid(1, 1)
    for name, (cost, quality) in points.items():
        (cx, sx), (qy, sy) = _mean_std(np.asarray(cost, dtype=float)), _mean_std(np.asarray(quality, dtype=float))
        ax.errorbar([cx], [qy], xerr=[sx], yerr=[sy], fmt="o", capsize=3, label=name)
        ax.annotate(name, (cx, qy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_accuracy_cost(lines: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[str]]],
                       refs: Mapping[str, tuple[float, float, float]], title: str, path: str | Path,
                       clip: bool = True) -> list[Path]:
    """AUROC and AP against wall seconds (log axis): one line per setting, reference methods as stars.

    Args:
        lines: label -> ``(seconds, aurocs, aps, point labels)`` along the line (e.g. over ensemble sizes).
        refs: method -> ``(seconds, auroc, ap)``.
        title: figure title.
        path: output stem.
        clip: zoom on the lines; references far below them are marked on the bottom edge with their value.

    Returns:
        ``[png, pdf]``.
    """
    fig, axes = _grid(2, 2)
    for ax, which, name in ((axes[0], 1, "AUROC"), (axes[1], 2, "AP")):
        values = [v for line in lines.values() for v in line[which]]
        if not clip:
            values += [point[which] for point in refs.values()]
        low = min(values) - 0.1 * (max(values) - min(values) + 1e-3)
        for label, line in lines.items():
            ax.plot(line[0], line[which], marker="o", markersize=3, label=label)
            for x, y, text in zip(line[0], line[which], line[3]):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(2, 2), fontsize=5)
        for method, point in refs.items():
            if point[which] >= low:
                ax.plot([point[0]], [point[which]], marker="*", markersize=9, linestyle="none", label=method)
                if not clip:
                    ax.annotate(method, (point[0], point[which]), textcoords="offset points", xytext=(3, -8),
                                fontsize=6)
            else:  # far below GEX (e.g. the plain loss): marked on the bottom edge with its value
                ax.plot([point[0]], [low], marker="v", markersize=7, linestyle="none", label=f"{method} (below)")
                ax.annotate(f"{method}: {point[which]:.3f}", (point[0], low), textcoords="offset points",
                            xytext=(4, 4), fontsize=6)
        ax.set_ylim(bottom=low)
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.set_xlabel("wall seconds (fit + score)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


FRONTIER_FLOORS = (0.85, 0.45)  # AUROC / AP axis floors: methods below are marked on the bottom edge with their value
FRONTIER_MIN_S = 0.01           # methods that cost less (read from the pretraining log) are drawn at this wall


def plot_frontier(lines: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[str]]],
                  points: Mapping[str, tuple[float, float, float, str | None]], title: str,
                  path: str | Path) -> list[Path]:
    """Every method's AUROC and AP against wall seconds (log axis), one legend entry per method: our methods as
    circles, peer libraries as diamonds in the colour of our method they pair with, GEX's ensemble sizes as a line.

    Args:
        lines: label -> ``(seconds, aurocs, aps, point labels)`` (GEX over its ensemble sizes).
        points: method -> ``(seconds, auroc, ap, paired)``: ``paired`` is None for our methods and, for a peer
            library, the name of our method it pairs with.
        title: figure title.
        path: output stem.

    Returns:
        ``[png, pdf]``.
    """
    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    palette = [f"C{i}" for i in range(1, 10)] + ["black", "lime", "navy", "maroon", "teal", "magenta",
                                                 "darkgoldenrod", "dimgray", "cyan", "olive"]  # C0 is GEX's line
    ours = [m for m, point in points.items() if point[3] is None]
    color = {m: palette[i % len(palette)] for i, m in enumerate(ours)}
    for ax, which, name, floor in ((axes[0], 1, "AUROC", FRONTIER_FLOORS[0]), (axes[1], 2, "AP", FRONTIER_FLOORS[1])):
        for label, line in lines.items():
            ax.plot(line[0], line[which], marker="o", markersize=4, color="C0", linewidth=2, label=label)
            for x, y, text in zip(line[0], line[which], line[3]):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(-4, 5), fontsize=6)
        below = 0
        ordered = [m for m in points if m in color] + [m for m in points if m not in color]  # ours, then peers
        for method in ordered:
            wall, auroc, ap, paired = points[method]
            value, x = (auroc, ap)[which - 1], max(wall, FRONTIER_MIN_S)
            peer = paired is not None
            style = dict(color=color.get(paired if peer else method, "gray"), linestyle="none", label=method,
                         marker="D" if peer else "o", markersize=7 if peer else 6,
                         markerfacecolor="none" if peer else None, markeredgewidth=1.5)
            if value >= floor:
                ax.plot([x], [value], **style)
            else:  # on the bottom edge, the values stacked upwards
                ax.plot([x], [floor], **(style | {"marker": "v"}))
                ax.annotate(f"{method}: {value:.3f}", (x, floor), textcoords="offset points",
                            xytext=(6, 2 + 8 * below), fontsize=6)
                below += 1
        ax.set_ylim(bottom=floor, top=1.0 if which == 1 else None)
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.set_xlabel(f"wall seconds, fit + score (below {FRONTIER_MIN_S:g} s drawn at {FRONTIER_MIN_S:g})")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7,
               title="circles: ours, diamonds: peer libraries", title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_toy_panel(x: Any, scores: Mapping[str, Any], is_influential: Any, title: str, path: str | Path,
                   *, subtitles: Mapping[str, str] | None = None, ncols: int = 4) -> list[Path]:
    """Fig. 2 panel: the 2-D toy set coloured by each estimator's self-influence (influential points circled).

    Args:
        x: ``(n, 2)`` inputs.
        scores: estimator -> ``(n,)`` self-influence.
        is_influential: ``(n,)`` bool mask of the rare inner-circle points.
        title: figure title.
        path: output stem.
        subtitles: estimator -> extra subplot title text (e.g. ``"AUROC 1.000 / AP 1.000"``).
        ncols: subplots per row.

    Returns:
        ``[png, pdf]``.

    Raises:
        ValueError: when ``x`` is not ``(n, 2)``, ``scores`` is empty, or shapes disagree.
    """
    x, mask = as_numpy(x).astype(float), as_numpy(is_influential).astype(bool)
    if x.ndim != 2 or x.shape[1] != 2 or not scores:
        raise ValueError(f"toy panel: x must be (n, 2) and scores non-empty; got x {x.shape}, {len(scores)} scores")
    fig, axes = _grid(len(scores), ncols)
    for ax, (name, values) in zip(axes, scores.items()):
        values = as_numpy(values).astype(float)
        _check_mask(values, mask, name)
        dots = ax.scatter(x[:, 0], x[:, 1], c=values, s=12, cmap="viridis")
        ax.scatter(x[mask, 0], x[mask, 1], s=60, facecolors="none", edgecolors=CLASS_COLORS[1], linewidths=1)
        fig.colorbar(dots, ax=ax)
        ax.set_title(f"{name}  {(subtitles or {}).get(name, '')}".strip(), fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")   # keep the circles round without shrinking the axes
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_groundtruth_scatter(predicted: Any, measured: Any, title: str, path: str | Path, *,
                             xlabel: str = "predicted (attribution)",
                             ylabel: str = "measured (retrained loss change)") -> list[Path]:
    """Predicted influence vs measured ground truth (LOO or LDS), with the Spearman correlation in the title.

    Args:
        predicted: ``(k,)`` attributions.
        measured: ``(k,)`` ground-truth effects.
        title: axes title (the Spearman rank correlation is appended).
        path: output stem.
        xlabel: predicted axis label.
        ylabel: measured axis label.

    Returns:
        ``[png, pdf]``.

    Raises:
        ValueError: when the two are not 1-D of the same length.
    """
    from scipy.stats import spearmanr

    pred, meas = as_numpy(predicted).astype(float).ravel(), as_numpy(measured).astype(float).ravel()
    if pred.shape != meas.shape:
        raise ValueError(f"groundtruth scatter: predicted {pred.shape} and measured {meas.shape} differ")
    fig, (ax,) = _grid(1, 1)
    ax.scatter(pred, meas, s=10, alpha=0.7)
    rho = spearmanr(pred, meas).statistic if len(pred) > 1 else float("nan")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}  (Spearman {rho:.3f})", fontsize=9)
    return save_figure(fig, path)
