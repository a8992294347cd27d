"""Reports on a masked model: per-layer sparsity, dense vs sparse FLOPs, and training plots."""

from sparsetrain.report.flops import FlopsReport, inference_flops, training_flops_per_step
from sparsetrain.report.plots import plot_layer_sparsity, plot_training_curves
from sparsetrain.report.sparsity import LayerRow, SparsityReport, sparsity_report

__all__ = [
    "FlopsReport",
    "LayerRow",
    "SparsityReport",
    "inference_flops",
    "plot_layer_sparsity",
    "plot_training_curves",
    "sparsity_report",
    "training_flops_per_step",
]
