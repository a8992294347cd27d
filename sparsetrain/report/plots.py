"""Training curves and per-layer sparsity as image files.

Figures are drawn on an explicit Agg canvas, never through ``pyplot``: nothing opens a window and
the caller's matplotlib backend and global figure list are left alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sparsetrain.errors import DataError, SparsetrainError
from sparsetrain.report.sparsity import SparsityReport

__all__ = ["plot_layer_sparsity", "plot_training_curves"]

_PANELS = (("train_loss", "train loss"), ("test_acc", "test accuracy"))


def plot_training_curves(
    metrics: Iterable[Mapping[str, Any]] | str | Path, out_path: str | Path
) -> Path:
    """Plot train loss and test accuracy (and a language model's test bits per byte, and
    sparsity, when logged) against the epoch.

    ``metrics`` is a list of records such as ``{"epoch": 1, "train_loss": 0.5, "test_acc": 0.88,
    "sparsity": 0.9}`` or the path of a JSON-lines file of them. Records without an epoch or a
    value are skipped; when an epoch has several records, its last value is plotted.
    """
    records = _read_records(metrics) if isinstance(metrics, str | Path) else list(metrics)
    panels = list(_PANELS)
    if any("test_bpb" in record for record in records):
        panels.insert(1, ("test_bpb", "test bits per byte"))
    if any("sparsity" in record for record in records):
        panels.append(("sparsity", "sparsity"))
    series = {key: _by_epoch(records, key) for key, _ in panels}
    if not any(series.values()):
        keys = ", ".join(key for key, _ in panels)
        raise DataError(f"no metric record has an epoch and any of {keys}")

    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, label) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        points = series[key]
        if points:
            ax.plot(list(points), list(points.values()), marker="o", markersize=3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(alpha=0.3)
    return _save(fig, out_path)


def plot_layer_sparsity(report: SparsityReport, out_path: str | Path) -> Path:
    """Horizontal bars of target and actual sparsity per layer, in the model's order."""
    if not report.rows:
        raise SparsetrainError("the sparsity report has no sparse layer to plot")
    rows = report.rows
    height = 0.4
    fig = Figure(figsize=(7.0, 1.2 + 0.4 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    positions = range(len(rows))
    ax.barh(
        [y - height / 2 for y in positions],
        [row.actual for row in rows],
        height=height,
        label="actual",
    )
    targeted = [
        (y, row.target) for y, row in zip(positions, rows, strict=True) if row.target is not None
    ]
    if targeted:
        ax.barh(
            [y + height / 2 for y, _ in targeted],
            [target for _, target in targeted],
            height=height,
            label="target",
        )
    ax.set_yticks(list(positions), [row.name for row in rows])
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("sparsity")
    ax.set_title(f"per-layer sparsity (overall {report.sparsity:.1%})")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out_path)


def _read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read metrics file {path}: {err.strerror or err}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not a JSON record ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _by_epoch(records: list[Mapping[str, Any]], key: str) -> dict[float, float]:
    """Last numeric value of ``key`` per epoch, sorted by epoch."""
    points: dict[float, float] = {}
    for record in records:
        epoch, value = record.get("epoch"), record.get(key)
        if _is_number(epoch) and _is_number(value):
            points[float(epoch)] = float(value)
    return dict(sorted(points.items()))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _save(fig: Figure, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return out_path
