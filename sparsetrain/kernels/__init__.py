"""Sparse training that is faster than dense on CPU, not only sparser.

``st.sparsify(..., kernels="sparse")`` trains the sparse ``nn.Linear`` layers on CSR kernels:
forward and grad_x by CSR matrix products, grad_W only at the mask's positions. Gradients equal
the masked dense ones (within float rounding), so every method and optimizer runs unchanged;
``kernels="auto"`` times each layer once and keeps the faster of sparse and dense. The optimizer
step (SGD, Adam, AdamW) then touches only the kept weights of every sparse layer, with exactly
the masked dense optimizer's state (:mod:`sparsetrain.kernels.kept_step`). Convolutions stay
dense (no sparse convolution on CPU beats oneDNN; see docs/performance.md).
"""

from sparsetrain.kernels.autotune import Autotuner, TuneKey, default_tuner, density_bucket
from sparsetrain.kernels.kept_step import KeptStep, StepKey
from sparsetrain.kernels.mode import (
    KERNEL_MODES,
    KernelLinear,
    KernelMode,
    KernelStats,
    use_kernels,
)
from sparsetrain.kernels.sparse_linear import (
    CSR_DTYPES,
    GradBuffer,
    LinearStructure,
    sparse_grad_input,
    sparse_grad_weight,
    sparse_linear,
    sparse_linear_forward,
)

__all__ = [
    "CSR_DTYPES",
    "KERNEL_MODES",
    "GradBuffer",
    "Autotuner",
    "KeptStep",
    "KernelLinear",
    "KernelMode",
    "KernelStats",
    "LinearStructure",
    "StepKey",
    "TuneKey",
    "default_tuner",
    "density_bucket",
    "sparse_grad_input",
    "sparse_grad_weight",
    "sparse_linear",
    "sparse_linear_forward",
    "use_kernels",
]
