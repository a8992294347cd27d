"""Comparison figures: the headline score against sparsity per model, and against training FLOPs.

The score is the task's (:func:`sparsetrain.tasks.headline`): test accuracy for a classifier,
validation bits per byte for a language model. Drawn on an explicit Agg canvas (no ``pyplot``),
like :mod:`sparsetrain.report.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from sparsetrain.compare.aggregate import Row

__all__ = ["plot_score_vs_sparsity", "plot_score_vs_train_flops"]

_MARKERS = "osD^vP<X>hp*H"
_PLAIN = FuncFormatter(lambda value, _: f"{value:g}")  # 0.7, not 7x10^-1, on a log axis


def _sparse_minor(value: float, _: int) -> str:
    """Label only the 2x and 5x minor ticks of a decade: all eight overlap."""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if mantissa in (2, 5) else ""


_MINOR = FuncFormatter(_sparse_minor)


def _style(names: Sequence[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """A colour and a marker per method, the same in every figure: ten clearly different colours
    (then eight more), and a different marker for every method, so no two methods look alike."""
    colors = [*colormaps["tab10"].colors, *colormaps["Dark2"].colors]
    return {n: (colors[i % len(colors)], _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(names)}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for the whole figure, right of the panels, each method once."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside right center")


def _draw_scores(ax: Axes, rows: Sequence[Row], names: Sequence[str], style: dict) -> None:
    for name in names:
        mine = sorted((r for r in rows if r.name == name), key=lambda r: r.sparsity)
        if not mine:
            continue
        color, marker = style[name]
        scale = mine[0].headline.scale
        if all(r.sparsity == 0.0 for r in mine):
            r = mine[0]
            ax.axhline(scale * r.score_mean, color=color, linestyle="--", label=name)
            if r.score_std:
                lo, hi = scale * (r.score_mean - r.score_std), scale * (r.score_mean + r.score_std)
                ax.axhspan(lo, hi, color=color, alpha=0.12)
            continue
        ax.errorbar(
            [100 * r.sparsity for r in mine],
            [scale * r.score_mean for r in mine],
            yerr=[scale * r.score_std for r in mine],
            color=color,
            marker=marker,
            capsize=3,
            label=name,
        )
    ax.set_xlabel("sparsity (%)")
    ax.grid(alpha=0.3)


def plot_score_vs_sparsity(
    rows: Sequence[Row],
    model: str,
    path: str | Path,
    panels: Sequence[tuple[str, Sequence[str]]] = (),
) -> Path:
    """The score (mean, error bar = std over seeds) against sparsity, one line per method.

    ``panels`` (title, names) splits the methods over side-by-side axes that share one score
    axis (names in no panel go to the last one), so a dozen lines stay readable and panels
    compare at a glance. Methods with no sparsity (the dense baseline) are drawn in every panel as
    a horizontal line with a band of one std.
    """
    rows = [r for r in rows if r.model == model]
    names = list(dict.fromkeys(r.name for r in rows))
    style = _style(names)
    flat = [r.name for r in rows if all(x.sparsity == 0.0 for x in rows if x.name == r.name)]
    baselines = list(dict.fromkeys(flat))
    groups = [(title, [n for n in panel if n in names]) for title, panel in panels] or [("", [])]
    placed = {n for _, panel in groups for n in panel}
    groups[-1][1].extend(n for n in names if n not in placed and n not in baselines)
    groups = [g for g in groups if g[1]] or [("", [])]
    fig = Figure(figsize=(5.5 * len(groups) + 1.5, 4.8), layout="constrained")
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for ax, (title, group) in zip(axes, groups, strict=True):
        _draw_scores(ax, rows, [*baselines, *group], style)
        ax.set_title(title, fontsize=10)
    label = rows[0].headline if rows else None
    if label is not None:
        better = "higher" if label.higher_is_better else "lower"
        axes[0].set_ylabel(f"{label.label} ({better} is better)")
    _legend(fig, axes)
    fig.suptitle(f"{model}: {label.label if label else 'score'} vs sparsity")
    return _save(fig, path)


def plot_score_vs_train_flops(rows: Sequence[Row], path: str | Path) -> Path:
    """The score against training FLOPs relative to dense, one panel per model; each point is
    labelled with its sparsity."""
    models = list(dict.fromkeys(r.model for r in rows))
    style = _style(list(dict.fromkeys(r.name for r in rows)))
    fig = Figure(figsize=(5.5 * len(models) + 1.5, 4.8), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in rows if r.model == model]
        score = mine[0].headline
        for name in dict.fromkeys(r.name for r in mine):
            group = [r for r in mine if r.name == name]
            color, marker = style[name]
            xs = [r.train_flops_rel for r in group]
            ys = [score.scale * r.score_mean for r in group]
            ax.scatter(xs, ys, color=color, marker=marker, label=name)
            for x, y, r in zip(xs, ys, group, strict=True):
                if r.sparsity:
                    ax.annotate(
                        f"{100 * r.sparsity:g}%",
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 3),
                        fontsize=6,
                        color=color,
                    )
        better = "higher" if score.higher_is_better else "lower"
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(_PLAIN)
        ax.xaxis.set_minor_formatter(_MINOR)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("training FLOPs / dense run")
        ax.set_ylabel(f"{score.label} ({better} is better)")
        ax.set_title(f"{model}: {score.label} vs training FLOPs", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    _legend(fig, axes)
    return _save(fig, path)
