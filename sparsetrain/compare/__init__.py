"""``sparsetrain compare``: the papers' method comparisons as one resumable grid of runs.

:mod:`~sparsetrain.compare.grid` expands a grid file into cells, :mod:`~sparsetrain.compare.runner`
trains them with the training loop into ``results.jsonl``, :mod:`~sparsetrain.compare.aggregate`
and :mod:`~sparsetrain.compare.summary` turn the records into tables and figures.
"""

from sparsetrain.compare.aggregate import Row, aggregate, mean_std
from sparsetrain.compare.grid import Cell, Grid, Variant, expand, grid_from_dict, load_grid
from sparsetrain.compare.runner import GridRun, load_records, run_cell, run_grid
from sparsetrain.compare.summary import render_summary, write_summary

__all__ = [
    "Cell",
    "Grid",
    "GridRun",
    "Row",
    "Variant",
    "aggregate",
    "expand",
    "grid_from_dict",
    "load_grid",
    "load_records",
    "mean_std",
    "render_summary",
    "run_cell",
    "run_grid",
    "write_summary",
]
