"""Sparse training that is faster than dense on CPU, not only sparser.

``st.sparsify(..., kernels="sparse")`` trains the sparse ``nn.Linear`` layers on CSR kernels:
forward and grad_x by CSR matrix products, grad_W only at the mask's positions. Gradients equal
the masked dense ones (within float rounding), so every method and optimizer runs unchanged;
``kernels="auto"`` times each layer once and keeps the faster of sparse and dense. The optimizer
step (SGD, Adam, AdamW) then touches only the kept weights of every sparse layer, with exactly
the masked dense optimizer's state (:mod:`sparsetrain.kernels.kept_step`). Conv1d and Conv2d
layers train on a direct sparse convolution compiled on first use
(:mod:`sparsetrain.kernels.sparse_conv`, :mod:`sparsetrain.kernels.extension`); without a
compiler they stay masked dense, after one warning.
"""

from sparsetrain.kernels.autotune import (
    Autotuner,
    ConvTuneKey,
    TuneKey,
    default_tuner,
    density_bucket,
)
from sparsetrain.kernels.extension import DISABLE_ENV, ConvKernels, conv_kernels
from sparsetrain.kernels.kept_step import KeptStep, StepKey
from sparsetrain.kernels.layers import KernelConv1d, KernelConv2d, KernelLinear
from sparsetrain.kernels.mode import KERNEL_MODES, KernelMode, KernelStats, use_kernels
from sparsetrain.kernels.sparse_conv import (
    ConvGeometry,
    ConvStructure,
    Workspace,
    sparse_conv,
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
    "DISABLE_ENV",
    "KERNEL_MODES",
    "GradBuffer",
    "Autotuner",
    "ConvGeometry",
    "ConvKernels",
    "ConvStructure",
    "ConvTuneKey",
    "KeptStep",
    "KernelConv1d",
    "KernelConv2d",
    "KernelLinear",
    "KernelMode",
    "KernelStats",
    "LinearStructure",
    "StepKey",
    "TuneKey",
    "default_tuner",
    "Workspace",
    "density_bucket",
    "conv_kernels",
    "sparse_conv",
    "sparse_grad_input",
    "sparse_grad_weight",
    "sparse_linear",
    "sparse_linear_forward",
    "use_kernels",
]
