"""The layers of the kernel modes and each one's route: which kernel a training forward runs.

In ``sparse`` and ``auto`` mode a sparse ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` has its
class switched to the subclass here, whose training forward asks its route (masked dense or
sparse kernels, ``auto``: where timing says sparse is faster). Parameters, their identity and
the state_dict keys stay those of the plain module; ``deepcopy``, pickling and therefore
``sp.export()`` give the plain class, since the kernels belong to the live sparsifier. In eval
mode the layer is the plain masked dense module, whose numbers every report relies on.
"""

from __future__ import annotations

import copyreg
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.kernels.extension import ConvKernels
from sparsetrain.kernels.sparse_conv import ConvGeometry, ConvStructure, sparse_conv
from sparsetrain.kernels.sparse_linear import (
    CSR_DTYPES,
    GradBuffer,
    LinearStructure,
    sparse_linear,
)

if TYPE_CHECKING:
    from sparsetrain.kernels.mode import KernelMode

__all__ = ["PLAIN", "ConvRoute", "KernelConv1d", "KernelConv2d", "KernelLinear", "LinearRoute"]


def _plain_copy(module: nn.Module) -> tuple:
    """Copy and pickle as the plain module (the kernels stay with the live model)."""
    state = module.__dict__.copy()
    state.pop("_kernel", None)
    return copyreg._reconstructor, (PLAIN[type(module)], object, None), state


class KernelLinear(nn.Linear):
    """An ``nn.Linear`` whose training forward goes through its sparsifier's kernels."""

    _kernel: LinearRoute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        return self._kernel(self, x)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return _plain_copy(self)


class _KernelConv:
    """The training forward of a convolution through its sparsifier's kernels (a mixin placed
    before ``nn.Conv1d`` / ``nn.Conv2d``, whose ``_conv_forward`` serves eval mode)."""

    _kernel: ConvRoute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._conv_forward(x, self.weight, self.bias)
        return self._kernel(self, x)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return _plain_copy(self)


class KernelConv1d(_KernelConv, nn.Conv1d):
    """An ``nn.Conv1d`` whose training forward goes through its sparsifier's kernels."""


class KernelConv2d(_KernelConv, nn.Conv2d):
    """An ``nn.Conv2d`` whose training forward goes through its sparsifier's kernels."""


# The kernel class of each plain class, and back.
KERNEL_CLASSES: dict[type, type] = {
    nn.Linear: KernelLinear,
    nn.Conv1d: KernelConv1d,
    nn.Conv2d: KernelConv2d,
}
PLAIN: dict[type, type] = {k: p for p, k in KERNEL_CLASSES.items()}


class _Route:
    """One layer's cached sparse structure (rebuilt after its mask changed) and last choice."""

    def __init__(self, mode: KernelMode, name: str) -> None:
        self.mode = mode
        self.name = name
        self.structure: Any = None
        self.dirty = True
        self.choice = "dense"  # what the last training call ran
        self.grad_buffer = GradBuffer(lambda: mode.sp.step)

    def build(self, mask: torch.Tensor) -> Any:
        raise NotImplementedError

    def current(self) -> Any:
        """The structure of the current mask, rebuilt first if the mask was replaced."""
        if self.structure is None or self.dirty:
            start = time.perf_counter()
            self.structure = self.build(self.mode.sp.mask(self.name))
            self.mode.stats.rebuild_s += time.perf_counter() - start
            self.mode.stats.rebuilds += 1
            self.dirty = False
        return self.structure

    def runs_dense(self, weight: torch.Tensor, x: torch.Tensor) -> bool:
        """Cases every sparse kernel leaves to the masked dense layer."""
        return (
            self.mode.sp.density(self.name) >= 1.0
            or weight.dtype not in CSR_DTYPES
            or weight.device.type != "cpu"
            or x.dtype != weight.dtype
            or torch.is_autocast_enabled("cpu")  # autocast's dtype rules belong to torch's ops
        )


def _needs_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


class LinearRoute(_Route):
    """A Linear layer: masked dense or CSR (:mod:`sparsetrain.kernels.sparse_linear`)."""

    def build(self, mask: torch.Tensor) -> LinearStructure:
        return LinearStructure.from_mask(mask)

    @torch.compiler.disable
    def __call__(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """The layer's training forward. Eager under ``torch.compile`` (one graph break per
        layer): CSR kernels and their cached structures are not traceable, and tracing them
        would guard on each layer's name and recompile for every layer."""
        weight, bias = module.weight, module.bias
        if self.runs_dense(weight, x):
            self.choice = "dense"
            return F.linear(x, weight, bias)
        structure = self.current()
        backward = _needs_backward(x, weight, bias)
        if self.mode.mode == "auto":
            batch = x.numel() // max(1, x.shape[-1])
            if not self.mode.tuner.use_sparse(
                weight, bias, structure, batch, backward, grad_input=x.requires_grad
            ):
                self.choice = "dense"
                return F.linear(x, weight, bias)
        self.choice = "sparse"
        dense_grad = backward and self.mode.wants_dense_grad()
        return sparse_linear(x, weight, bias, structure, dense_grad, self.grad_buffer)


def conv_geometry(module: nn.Conv1d | nn.Conv2d) -> ConvGeometry:
    """The module's stride, dilation and zero padding as a 2-D geometry (Conv1d: height 1).
    Other padding modes are applied to the input first, as ``nn.Conv2d`` does."""
    pads = module._reversed_padding_repeated_twice  # last dimension first, 'same' resolved
    if module.padding_mode != "zeros":
        pads = [0] * len(pads)
    if isinstance(module, nn.Conv1d):
        return ConvGeometry((1, module.stride[0]), (1, module.dilation[0]), (0, 0, *pads[:2]))
    left, right, top, bottom = pads
    return ConvGeometry(tuple(module.stride), tuple(module.dilation), (top, bottom, left, right))


class ConvRoute(_Route):
    """A Conv1d/Conv2d layer: masked dense or the compiled direct sparse convolution
    (:mod:`sparsetrain.kernels.sparse_conv`)."""

    def __init__(self, mode: KernelMode, name: str, kernels: ConvKernels) -> None:
        super().__init__(mode, name)
        self.kernels = kernels

    def build(self, mask: torch.Tensor) -> ConvStructure:
        return ConvStructure.from_mask(mask)

    @torch.compiler.disable
    def __call__(self, module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """The layer's training forward (eager under ``torch.compile``, as for Linear)."""
        weight, bias = module.weight, module.bias
        if self.runs_dense(weight, x) or x.dim() != weight.dim():  # unbatched input: dense
            self.choice = "dense"
            return module._conv_forward(x, weight, bias)
        padded = x
        if module.padding_mode != "zeros":
            padded = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        geometry = conv_geometry(module)
        structure = self.current()
        backward = _needs_backward(x, weight, bias)
        if self.mode.mode == "auto" and not self.mode.tuner.use_sparse_conv(
            self.kernels, weight, bias, structure, geometry, padded, backward, x.requires_grad
        ):
            self.choice = "dense"
            return module._conv_forward(x, weight, bias)
        self.choice = "sparse"
        dense_grad = backward and self.mode.wants_dense_grad()
        return sparse_conv(
            padded,
            weight,
            bias,
            self.kernels,
            structure,
            geometry,
            dense_grad,
            self.grad_buffer,
            self.mode.workspace,
        )
