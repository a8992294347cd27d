"""Comparison figures: accuracy against sparsity per model, accuracy against training FLOPs.

Drawn on an explicit Agg canvas (no ``pyplot``), like :mod:`sparsetrain.report.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sparsetrain.compare.aggregate import Row

__all__ = ["plot_accuracy_vs_sparsity", "plot_accuracy_vs_train_flops"]

_MARKERS = "osD^v<>pPX*hH"


def _style(names: Sequence[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """A colour (20 distinct ones) and a marker per method, the same in every figure."""
    colors = colormaps["tab20"].colors
    return {n: (colors[i % len(colors)], _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(names)}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _draw_accuracy(ax, rows: Sequence[Row], names: Sequence[str], style: dict) -> None:  # noqa: ANN001
    for name in names:
        mine = sorted((r for r in rows if r.name == name), key=lambda r: r.sparsity)
        if not mine:
            continue
        color, marker = style[name]
        if all(r.sparsity == 0.0 for r in mine):
            r = mine[0]
            ax.axhline(100 * r.acc_mean, color=color, linestyle="--", label=name)
            if r.acc_std:
                lo, hi = 100 * (r.acc_mean - r.acc_std), 100 * (r.acc_mean + r.acc_std)
                ax.axhspan(lo, hi, color=color, alpha=0.12)
            continue
        ax.errorbar(
            [100 * r.sparsity for r in mine],
            [100 * r.acc_mean for r in mine],
            yerr=[100 * r.acc_std for r in mine],
            color=color,
            marker=marker,
            capsize=3,
            label=name,
        )
    ax.set_xlabel("sparsity (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")


def plot_accuracy_vs_sparsity(
    rows: Sequence[Row], model: str, path: str | Path, panels: Sequence[Sequence[str]] = ()
) -> Path:
    """Test accuracy (mean, error bar = std over seeds) against sparsity, one line per method.

    ``panels`` splits the methods over side-by-side axes (names in none go to the last one), so
    a dozen lines stay readable; each panel scales its own accuracy axis (one collapsed method
    must not flatten the others). Methods with no sparsity (the dense baseline) are drawn in every
    panel as a horizontal line with a band of one std.
    """
    rows = [r for r in rows if r.model == model]
    names = list(dict.fromkeys(r.name for r in rows))
    style = _style(names)
    flat = [r.name for r in rows if all(x.sparsity == 0.0 for x in rows if x.name == r.name)]
    baselines = list(dict.fromkeys(flat))
    groups = [[n for n in panel if n in names] for panel in panels] or [[]]
    placed = {n for panel in groups for n in panel}
    groups[-1] += [n for n in names if n not in placed and n not in baselines]
    groups = [g for g in groups if g] or [[]]
    fig = Figure(figsize=(6.0 * len(groups), 4.8))
    axes = [fig.add_subplot(1, len(groups), i + 1) for i in range(len(groups))]
    for ax, group in zip(axes, groups, strict=True):
        _draw_accuracy(ax, rows, [*baselines, *group], style)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle(f"{model}: test accuracy vs sparsity")
    return _save(fig, path)


def plot_accuracy_vs_train_flops(rows: Sequence[Row], path: str | Path) -> Path:
    """Test accuracy against training FLOPs relative to dense, one panel per model."""
    models = list(dict.fromkeys(r.model for r in rows))
    style = _style(list(dict.fromkeys(r.name for r in rows)))
    fig = Figure(figsize=(5.5 * len(models) + 1.5, 4.8))
    for i, model in enumerate(models, 1):
        ax = fig.add_subplot(1, len(models), i)
        mine = [r for r in rows if r.model == model]
        for name in dict.fromkeys(r.name for r in mine):
            group = [r for r in mine if r.name == name]
            color, marker = style[name]
            ax.scatter(
                [r.train_flops_rel for r in group],
                [100 * r.acc_mean for r in group],
                color=color,
                marker=marker,
                label=name,
            )
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs / dense run")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}: accuracy vs training FLOPs")
        ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
