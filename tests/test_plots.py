"""experiments.plots: exact curve/statistic helpers, what the histogram draws, atomic PNG+PDF output, misuse."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from experiments import plots

TOL = 1e-12
PNG_MAGIC, PDF_MAGIC = b"\x89PNG\r\n\x1a\n", b"%PDF-"


def _valid(paths, stem):
    """Both files exist under the stem's name, are real PNG/PDF, and no temporary file is left behind."""
    assert [p.name for p in paths] == [f"{stem.name}.png", f"{stem.name}.pdf"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC and paths[1].read_bytes()[:5] == PDF_MAGIC
    height, width, _ = imread(paths[0]).shape
    assert height > 100 and width > 100
    assert not [p for p in stem.parent.iterdir() if ".tmp" in p.name]


def test_save_figure_replaces_suffix_and_overwrites(tmp_path):
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    first = plots.save_figure(fig, tmp_path / "sub" / "curve.png")     # a .png suffix names the stem
    _valid(first, tmp_path / "sub" / "curve")
    again = plots.save_figure(fig, tmp_path / "sub" / "curve")
    assert again == first and len(list((tmp_path / "sub").iterdir())) == 2


def test_histogram_draws_the_counts_on_a_log_axis():
    scores = np.array([0.1, 0.2, 0.2, 0.3, 5.0, 6.0, np.nan])     # NaN: a sample the method did not score
    noisy = np.array([False, False, False, False, True, True, False])
    ax = Figure().subplots()
    plots._hist(ax, torch.tensor(scores), torch.tensor(noisy), "t", ("clean", "noisy"), bins=5)
    clean, flagged = ax.containers
    assert sum(p.get_height() for p in clean) == 4 and sum(p.get_height() for p in flagged) == 2
    # shared bins: both histograms use the same edges over [0.1, 6.0]
    assert clean[0].get_x() == pytest.approx(0.1) and flagged[-1].get_x() + flagged[-1].get_width() == \
        pytest.approx(6.0)
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["clean (4)", "noisy (2)"]


def test_found_curve_exact():
    """Inspect by descending score: [0.9 (noisy), 0.7 (noisy), 0.5, 0.1] -> found 0, 1/2, 1, 1, 1."""
    inspected, found = plots.found_curve([0.9, 0.1, 0.5, 0.7], [True, False, False, True])
    np.testing.assert_allclose(inspected, [0, 0.25, 0.5, 0.75, 1.0], atol=TOL)
    np.testing.assert_allclose(found, [0, 0.5, 1.0, 1.0, 1.0], atol=TOL)


def test_mean_std_over_seeds_ignores_missing_and_uses_ddof1():
    mean, std = plots._mean_std(np.array([[1.0, 2.0], [3.0, np.nan]]))
    np.testing.assert_allclose(mean, [2.0, 2.0], atol=TOL)
    np.testing.assert_allclose(std, [np.sqrt(2.0), 0.0], atol=TOL)   # one seed: no spread, not NaN


def test_every_plot_writes_png_and_pdf(tmp_path):
    gen = torch.Generator().manual_seed(0)
    scores, noisy = torch.rand(40, generator=gen), torch.arange(40) < 5
    x = torch.randn(40, 2, generator=gen)
    made = {
        "hist": plots.plot_self_influence_hist(scores + 2 * noisy, noisy, "GEX  AUROC 1.0", tmp_path / "hist"),
        "det": plots.plot_detection_curve({"gex": scores + noisy, "loss": scores}, noisy, "found", tmp_path / "det"),
        "prune": plots.plot_pruning_curves({"gex": ([10, 20], [[0.9, 0.8], [0.88, np.nan]]),
                                            "random": ([10, 20], [[0.7, 0.6]])}, "prune", tmp_path / "prune"),
        "bars": plots.plot_relabel_bars({"gex": [0.8, 0.82], "no relabel": [0.7]}, "relabel", tmp_path / "bars"),
        "cost": plots.plot_cost_quality({"gex": ([10.0, 12.0], [0.9, 0.95]), "loss": ([0.5], [0.8])}, "cost",
                                        tmp_path / "cost"),
        "toy": plots.plot_toy_panel(x, {"loo": x.norm(dim=1), "gex": -x[:, 0]}, noisy, "toy", tmp_path / "toy",
                                    subtitles={"gex": "AUROC 1.000"}),
        "gt": plots.plot_groundtruth_scatter(torch.arange(5.0), torch.arange(5.0) ** 2, "gt", tmp_path / "gt"),
        "frontier": plots.plot_frontier({"gex": ([10.0, 20.0], [0.99, 0.995], [0.9, 0.95], ["M=1", "M=2"])},
                                        {"loss": (1.0, 0.9, 0.6, None), "random": (0.001, 0.5, 0.1, None),
                                         "a peer of loss": (3.0, 0.91, 0.62, "loss")}, "frontier",
                                        tmp_path / "frontier"),
    }
    for stem, paths in made.items():
        _valid(paths, tmp_path / stem)


@pytest.mark.parametrize("call, match", [
    (lambda p: plots.plot_self_influence_hist(np.zeros(3), np.zeros(4, bool), "t", p), r"mask the same shape"),
    (lambda p: plots.plot_self_influence_panel([], p), r"panels is empty"),
    (lambda p: plots.plot_pruning_curves({"gex": ([10, 20], [[0.9]])}, "t", p), r"'gex'.*do not match 2 pcts"),
    (lambda p: plots.plot_toy_panel(np.zeros((3, 3)), {"a": np.zeros(3)}, np.zeros(3, bool), "t", p),
     r"x must be \(n, 2\)"),
    (lambda p: plots.plot_groundtruth_scatter(np.zeros(3), np.zeros(4), "t", p), r"predicted \(3,\) and measured"),
])
def test_misuse_is_a_one_line_error(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "bad")
    assert not list(tmp_path.iterdir())    # nothing half-written
