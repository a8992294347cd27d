"""``curves.png``: a run's training curves against the optimizer step.

The per-epoch records (``metrics.jsonl``) give the test accuracy and the epoch's mean train loss;
the per-step records (``steps.jsonl``, see :mod:`sparsetrain.train.steplog`) give the batch
loss, the learning rate and the sparsity timeline, where a method's schedule shows: AC/DC's
alternating phases, GMP's ramp, GaP's rotating dense group (in the per-layer panel), AST's
sub-networks. Records of extra training after the main run (AC/DC's dense twin, ``phase``) are
drawn beside the main run's in their own colour.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes

from sparsetrain.errors import DataError
from sparsetrain.report.figures import Records, is_number, new_figure, read_records, save_figure

__all__ = ["plot_training_curves"]

MAIN = "main"


def _by_phase(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record.get("phase") or MAIN].append(record)
    return dict(groups)


def _series(records: Sequence[Mapping[str, Any]], key: str, x: str) -> tuple[list, list]:
    """Points ``(record[x], record[key])`` with numbers at both; the last value per x."""
    points = {
        float(r[x]): float(r[key]) for r in records if is_number(r.get(x)) and is_number(r.get(key))
    }
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def _label(phase: str, sparse: bool) -> str:
    if phase != MAIN:
        return phase.replace("_", " ")
    return "sparse model" if sparse else "model"


def plot_training_curves(
    metrics: Records, out_path: str | Path, steps: Records | None = None
) -> Path:
    """Plot a run's loss, test accuracy (or a language model's bits per byte), learning rate and
    sparsity against the optimizer step, and each layer's sparsity over time.

    ``metrics`` are per-epoch records (``{"epoch": 1, "step": 468, "train_loss": 0.5,
    "test_acc": 0.88, "lr": 0.01, "sparsity": 0.9}``) or the path of ``metrics.jsonl``; ``steps``
    the per-step records of ``steps.jsonl`` (without them the per-epoch values are drawn).
    Records without a number are skipped; records without a step are placed by epoch.
    """
    epochs = read_records(metrics)
    step_records = read_records(steps) if steps is not None else []
    x = "step" if any(is_number(r.get("step")) for r in [*epochs, *step_records]) else "epoch"
    by_epoch, by_step = _by_phase(epochs), _by_phase(step_records)
    phases = list(dict.fromkeys([*by_epoch, *by_step]))
    timeline = {p: by_step.get(p) or by_epoch.get(p, []) for p in phases}
    score = "test_bpb" if any(is_number(r.get("test_bpb")) for r in epochs) else "test_acc"
    if not any(
        _series(by_epoch.get(p, []), k, x)[0] for p in phases for k in ("train_loss", score)
    ):
        raise DataError(f"no metric record has a {x} and a train loss or {score.replace('_', ' ')}")
    sparse = any(
        r.get("sparsity", 0) for r in timeline.get(MAIN, []) if is_number(r.get("sparsity"))
    )
    layers = _density_rows(by_step.get(MAIN, []))

    fig = new_figure(11.0, 9.0 if layers else 6.4)
    grid = fig.add_gridspec(3 if layers else 2, 2, height_ratios=[1, 1, 1.1][: 3 if layers else 2])
    loss_ax = fig.add_subplot(grid[0, 0])
    score_ax = fig.add_subplot(grid[0, 1], sharex=loss_ax)
    lr_ax = fig.add_subplot(grid[1, 0], sharex=loss_ax)
    sparsity_ax = fig.add_subplot(grid[1, 1], sharex=loss_ax)
    for i, phase in enumerate(phases):
        style = {"color": f"C{i}", "label": _label(phase, sparse)}
        line = by_step.get(phase)
        if line:
            loss_ax.plot(*_series(line, "loss", x), lw=0.8, alpha=0.6, **style)
            style = {**style, "label": None}
        loss_ax.plot(*_series(by_epoch.get(phase, []), "train_loss", x), "o-", ms=4, **style)
        points = _series(by_epoch.get(phase, []), score, x)
        score_ax.plot(*points, "o-", ms=4, **{**style, "label": _label(phase, sparse)})
        _annotate(score_ax, *points, f"C{i}", score)
        dashed = {"ls": "--" if i else "-", "color": f"C{i}"}
        lr_ax.plot(*_series(timeline[phase], "lr", x), **dashed)
        if phase == MAIN and any("subnets" in r for r in timeline[phase]):
            _subnets(sparsity_ax, timeline[phase], x)
        else:
            xs, ys = _series(timeline[phase], "sparsity", x)
            sparsity_ax.step(xs, ys, where="post", label=_label(phase, sparse), **dashed)
    loss_ax.set_title("train loss (line: batches, dots: epoch means)")
    score_ax.set_title("test bits per byte" if score == "test_bpb" else "test accuracy (per epoch)")
    lr_ax.set_title("learning rate")
    sparsity_ax.set_title("sparsity of the sparse weights")
    sparsity_ax.set_ylim(-0.03, 1.25)  # room for the legend above the 100% line
    sparsity_ax.set_yticks(np.linspace(0.0, 1.0, 6))
    for ax in (loss_ax, score_ax, lr_ax, sparsity_ax):
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    if len(phases) > 1:
        loss_ax.legend(fontsize=8)
        score_ax.legend(fontsize=8)
    if len(sparsity_ax.get_legend_handles_labels()[1]) > 1:
        sparsity_ax.legend(fontsize=8, loc="upper center", ncol=4, frameon=False)
    if layers:
        _layer_heatmap(fig.add_subplot(grid[2, :]), layers, fig)
    return save_figure(fig, out_path)


def _annotate(ax: Axes, xs: list, ys: list, color: str, score: str) -> None:
    """Values beside a few test points: one epoch's run has a single point per model."""
    if not 0 < len(xs) <= 12:
        return
    for x, y in zip(xs, ys, strict=True):
        text = f"{y:.3f}" if score == "test_bpb" else f"{y:.1%}"
        ax.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=(-6, 5),
            ha="right",
            fontsize=8,
            color=color,
        )
    ax.margins(y=0.15)  # room for the labels
    low, high = ax.get_ylim()
    if high - low < 0.02:  # a single point or two close ones: a readable range around them
        middle = (high + low) / 2
        ax.set_ylim(middle - 0.01, middle + 0.01)


def _subnets(ax: Axes, records: Sequence[Mapping[str, Any]], x: str) -> None:
    """AST: one line per sub-network (densest first)."""
    count = max(len(r.get("subnets") or ()) for r in records)
    for i in range(count):
        points = [(r[x], r["subnets"][i]) for r in records if len(r.get("subnets") or ()) > i]
        ax.plot(*zip(*points, strict=True), label=f"sub-network {i}", color=f"C{i + 2}")


def _density_rows(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list, Any] | None:
    """(layer names, steps, sparsity matrix layers x steps) from the step records' densities;
    None for AST, whose records hold whichever sub-network was active (its panel shows each)."""
    records = [r for r in records if isinstance(r.get("density"), Mapping) and is_number(r["step"])]
    if len(records) < 2 or any("subnets" in r for r in records):
        return None
    names = list(dict.fromkeys(name for r in records for name in r["density"]))
    matrix = np.array(
        [[1.0 - float(r["density"].get(name, np.nan)) for r in records] for name in names]
    )
    return names, [float(r["step"]) for r in records], matrix


def _layer_heatmap(ax: Axes, layers: tuple[list[str], list, Any], fig: Any) -> None:
    """Each layer's sparsity over the steps (a value holds until the next record)."""
    names, steps, matrix = layers
    edges = [*steps, steps[-1] + 1]
    mesh = ax.pcolormesh(
        edges, np.arange(len(names) + 1), matrix, vmin=0.0, vmax=1.0, cmap="viridis"
    )
    ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=8 if len(names) < 20 else 6)
    ax.invert_yaxis()
    ax.set_xlabel("step")
    ax.set_title("sparsity per layer (from the step records)")
    fig.colorbar(mesh, ax=ax, label="sparsity", pad=0.01)
