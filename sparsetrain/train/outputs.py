"""The run directory's reports and figures, written once training is over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import sparsetrain as st
from sparsetrain.inputs import ExampleInput
from sparsetrain.report import plot_layer_sparsity, plot_training_curves
from sparsetrain.report.figures import read_records
from sparsetrain.report.summary import Report
from sparsetrain.train.state import Data
from sparsetrain.train.steplog import STEPS_FILE

__all__ = ["report_training_input", "write_report"]


def write_report(
    run_dir: Path,
    report: Report,
    last: dict[str, Any],
    extras: dict[str, Any],
    metrics: list[dict[str, Any]],
) -> list[Path]:
    """Write report.txt, report.json (``last`` record, ``extras``, ``report``) and the plots of
    ``metrics`` (the main run's records), the after-training records of ``metrics.jsonl`` and the
    step records of ``steps.jsonl`` into ``run_dir``; returns the plots' paths."""
    (run_dir / "report.txt").write_text(report.format() + "\n")
    summary = {"metrics": last, "extras": extras, **report.to_dict()}
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    path = run_dir / "metrics.jsonl"
    written = read_records(path) if path.exists() else []
    extra = [r for r in written if "phase" in r and r not in metrics]  # e.g. the dense twin's
    steps = run_dir / STEPS_FILE
    plots = [
        plot_training_curves(
            [*metrics, *extra], run_dir / "curves.png", steps=steps if steps.exists() else None
        )
    ]
    if report.sparsity.rows:
        plots.append(plot_layer_sparsity(report, run_dir / "layer_sparsity.png"))
    return plots


def report_training_input(sp: st.Sparsifier, data: Data, batch_size: int) -> None:
    """FLOPs count training batches: take their example and size from the training data, not
    from the first forward the sparsifier happened to see (none, or an evaluation batch, after a
    resume; this process's share of the global batch under ``torchrun``)."""
    x, _ = data.train.dataset[[0]]
    sp.batch_size = min(batch_size, len(data.train.dataset))
    sp.inputs = ExampleInput(
        (torch.zeros_like(x).to(next(sp.model.parameters()).device),), {}, sp.batch_size
    )
