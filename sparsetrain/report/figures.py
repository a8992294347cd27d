"""What the figure modules share: reading JSON-lines records and saving a figure.

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

from sparsetrain.errors import DataError

__all__ = ["is_number", "new_figure", "read_records", "save_figure"]

Records = Iterable[Mapping[str, Any]] | str | Path


def read_records(records: Records) -> list[Mapping[str, Any]]:
    """``records`` as a list: itself, or the JSON objects of a JSON-lines file (blank lines
    skipped; a line that is not a JSON object is an error naming it)."""
    if not isinstance(records, str | Path):
        return list(records)
    path = Path(records)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read metrics file {path}: {err.strerror or err}") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not a JSON record ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        out.append(record)
    return out


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return out_path
