"""Figures of a sparse model: where its parameters and its FLOPs are, and what sparsity leaves.

Overall sparsity hides where the weights are: a layer that holds most of the parameters can be
pruned hard and still cost little, while small convolutions that run at every pixel keep most of
the FLOPs. So each sparse layer is drawn by its share of the model's parameters and of its dense
inference FLOPs, with what its density keeps of each. The training curves live in
:mod:`sparsetrain.report.curves`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from matplotlib.axes import Axes

from sparsetrain.errors import SparsetrainError
from sparsetrain.report.curves import plot_training_curves
from sparsetrain.report.figures import new_figure, save_figure
from sparsetrain.report.flops import FlopsReport
from sparsetrain.report.sparsity import SparsityReport
from sparsetrain.report.summary import Report

__all__ = ["plot_layer_sparsity", "plot_training_curves"]

OTHER = "not sparsified"


def _flops_per_row(report: SparsityReport, flops: FlopsReport) -> list[tuple[int, int]]:
    """(dense, sparse) FLOPs of each row's module, split by parameters where a module holds
    several sparse weights."""
    module_of = [row.name.rpartition(".")[0] for row in report.rows]
    numel: dict[str, int] = defaultdict(int)
    for module, row in zip(module_of, report.rows, strict=True):
        numel[module] += row.numel
    out = []
    for module, row in zip(module_of, report.rows, strict=True):
        dense, sparse = flops.per_module.get(module, (0, 0))
        share = row.numel / numel[module]
        out.append((round(dense * share), round(sparse * share)))
    return out


def _percent(share: float) -> str:
    return "<0.1%" if 0 < share < 0.001 else f"{share:.1%}"


def _bars(ax: Axes, names: list[str], whole: list[float], kept: list[float], what: str) -> None:
    positions = range(len(names))
    ax.barh(positions, whole, color="#c6dbef", label="the layer, dense")
    ax.barh(positions, kept, height=0.5, color="#2171b5", label="what its mask keeps")
    for y, (w, k) in enumerate(zip(whole, kept, strict=True)):
        ax.text(w + 0.01, y, f"{_percent(w)} -> {_percent(k)}", va="center", fontsize=8)
    ax.set_yticks(list(positions), names)
    ax.set_xlim(0.0, min(1.3, 1.3 * max(whole) + 0.05))
    ax.set_xlabel(f"fraction of the model's dense {what}")
    ax.grid(axis="x", alpha=0.3)


def plot_layer_sparsity(report: Report | SparsityReport, out_path: str | Path) -> Path:
    """Per sparse layer, in the model's order: its share of all parameters and (when ``report``
    has FLOPs) of the dense inference FLOPs, each beside the share its mask keeps; the row
    labels give the layer's density. Parameters and FLOPs outside the sparse layers form a last
    row, so each panel's bars sum to the whole model."""
    sparsity = report.sparsity if isinstance(report, Report) else report
    flops = report.flops if isinstance(report, Report) else None
    rows = sparsity.rows
    if not rows:
        raise SparsetrainError("the sparsity report has no sparse layer to plot")
    names = [f"{row.name}\ndensity {1 - row.actual:.1%}" for row in rows] + [OTHER]
    total = sparsity.total_params
    other = total - sparsity.sparse_params
    params = [row.numel / total for row in rows] + [other / total]
    kept = [row.active / total for row in rows] + [other / total]

    panels = 2 if flops is not None and flops.dense else 1
    fig = new_figure(5.6 * panels + 1.2, 1.6 + 0.55 * len(names))
    axes = fig.subplots(1, panels, sharey=True, squeeze=False)[0]
    _bars(axes[0], names, params, kept, "parameters")
    axes[0].set_title("parameters")
    title = (
        f"{sparsity.sparsity:.1%} of the sparse weights masked: "
        f"{sparsity.total_active / total:.1%} of all parameters kept"
    )
    if panels == 2:
        per_row = _flops_per_row(sparsity, flops)
        rest_dense = flops.dense - sum(d for d, _ in per_row)
        rest_sparse = flops.sparse - sum(s for _, s in per_row)
        dense = [d / flops.dense for d, _ in per_row] + [rest_dense / flops.dense]
        sparse = [s / flops.dense for _, s in per_row] + [rest_sparse / flops.dense]
        _bars(axes[1], names, dense, sparse, "FLOPs")
        axes[1].set_title("inference FLOPs per example")
        title += f", inference at {flops.ratio:.1%} of dense FLOPs"
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2)
    return save_figure(fig, out_path)
