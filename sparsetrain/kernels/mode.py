"""Attach an execution mode to a :class:`~sparsetrain.masks.Sparsifier`: dense, sparse or auto.

In ``sparse`` and ``auto`` mode each sparse ``nn.Linear`` of the model has its class switched to
:class:`KernelLinear`, a subclass whose forward runs :func:`sparse_linear` (``auto``: where
timing says it is faster). The module keeps its parameters, their identity and its state_dict
keys; optimizers, checkpoints and methods see no difference. Copies are plain: ``deepcopy``,
pickling and therefore ``sp.export()`` produce ordinary ``nn.Linear`` layers, since the kernels
belong to the live sparsifier, not to the weights.

Kernels run only in training mode: in eval mode (evaluation, FLOP counting, export checks) the
layer is the plain masked dense Linear, whose numbers every report relies on. For fast
inference export with ``format="sparse-cpu"``.

A layer's CSR structure is rebuilt lazily, at its first forward after the sparsifier reports
that its mask was replaced (through ``sp.mask_listeners``; about 20 ms for a 4096x4096 mask at
98% sparsity, 70 ms at 90%, 1 thread); values are gathered from the dense weight at every call.
A method that reads gradients outside the mask (``sp.dense_grad``) answers
``needs_dense_grad(t)`` with True for that step, and the weight gradients of step ``t`` are then
computed densely (RigL's and AST's update steps); :meth:`KernelMode.dense_gradients` does the
same on request.

The weight gradient's storage is reused from step to step (see
:class:`~sparsetrain.kernels.sparse_linear.GradBuffer`): clone a ``.grad`` to keep it past the
next optimizer step.
"""

from __future__ import annotations

import contextlib
import copyreg
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.errors import ConfigError
from sparsetrain.kernels.autotune import Autotuner, default_tuner
from sparsetrain.kernels.kept_step import KeptStep
from sparsetrain.kernels.sparse_linear import (
    CSR_DTYPES,
    GradBuffer,
    LinearStructure,
    sparse_linear,
)

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["KERNEL_MODES", "KernelLinear", "KernelMode", "KernelStats", "use_kernels"]

log = logging.getLogger(__name__)

KERNEL_MODES = ("dense", "sparse", "auto")
CONV_REASON = "convolutions stay dense: im2col + CSR measured far slower than oneDNN on CPU"


@dataclass
class KernelStats:
    """What keeping structures in step with the masks cost so far."""

    rebuilds: int = 0  # structures built (first use, then once per changed mask)
    rebuild_s: float = 0.0  # seconds spent building them


class KernelLinear(nn.Linear):
    """An ``nn.Linear`` whose training forward goes through its sparsifier's kernels."""

    _kernel: _KernelLayer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        return self._kernel(self, x)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """Copy and pickle as a plain ``nn.Linear`` (the kernels stay with the live model)."""
        state = self.__dict__.copy()
        state.pop("_kernel", None)
        return copyreg._reconstructor, (nn.Linear, object, None), state


class _KernelLayer:
    """One Linear's cached structure and its route to the kernels."""

    def __init__(self, mode: KernelMode, name: str) -> None:
        self.mode = mode
        self.name = name
        self.structure: LinearStructure | None = None
        self.dirty = True
        self.choice = "dense"  # what the last training call ran
        self.grad_buffer = GradBuffer(lambda: mode.sp.step)

    def current(self) -> LinearStructure:
        """The structure of the current mask, rebuilt first if the mask was replaced."""
        if self.structure is None or self.dirty:
            start = time.perf_counter()
            self.structure = LinearStructure.from_mask(self.mode.sp.mask(self.name))
            self.mode.stats.rebuild_s += time.perf_counter() - start
            self.mode.stats.rebuilds += 1
            self.dirty = False
        return self.structure

    @torch.compiler.disable
    def __call__(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """The layer's training forward: masked dense or CSR. Eager under ``torch.compile`` (one
        graph break per layer): CSR kernels and their cached structures are not traceable, and
        tracing them would guard on each layer's name and recompile for every layer."""
        weight, bias = module.weight, module.bias
        sp = self.mode.sp
        if (
            sp.density(self.name) >= 1.0
            or weight.dtype not in CSR_DTYPES
            or weight.device.type != "cpu"
            or x.dtype != weight.dtype
            or torch.is_autocast_enabled("cpu")  # autocast's dtype rules belong to F.linear
        ):
            self.choice = "dense"
            return F.linear(x, weight, bias)
        structure = self.current()
        backward = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
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


class KernelMode:
    """The ``sparse`` or ``auto`` execution mode of one sparsifier's Linear layers.

    ``layers`` maps each sparse Linear weight's name to its route; weights of other modules
    (convolutions, custom layers) are listed in ``dense_reasons``. Use :func:`use_kernels` to
    create, switch or remove it.
    """

    def __init__(self, sp: Sparsifier, mode: str, tuner: Autotuner | None = None) -> None:
        self.sp = sp
        self.mode = mode
        self.tuner = tuner or default_tuner()
        self.stats = KernelStats()
        self.layers: dict[str, _KernelLayer] = {}
        self.dense_reasons: dict[str, str] = {}
        self._modules: dict[str, nn.Linear] = {}
        self._forced_dense_grad = 0
        self.kept_step = KeptStep(sp, mode, self.tuner, self.compact_grad)
        for name in sp.params:
            module_name, _, attr = name.rpartition(".")
            module = sp.model.get_submodule(module_name)
            if type(module) is nn.Linear and attr == "weight":
                self.layers[name] = _KernelLayer(self, name)
                self._modules[name] = module
            elif isinstance(module, nn.modules.conv._ConvNd):
                self.dense_reasons[name] = CONV_REASON
            else:
                self.dense_reasons[name] = f"no sparse kernel for {type(module).__name__}"
        for name, module in self._modules.items():
            module.__class__ = KernelLinear
            module._kernel = self.layers[name]
        sp.mask_listeners.append(self._mask_changed)
        log.info(
            "%s kernels on %d Linear layer(s); dense: %s",
            mode,
            len(self.layers),
            ", ".join(self.dense_reasons) or "none",
        )

    def _mask_changed(self, name: str) -> None:
        layer = self.layers.get(name)
        if layer is not None:
            layer.dirty = True

    def masked_grads(self) -> set[str]:
        """Names whose ``.grad`` is exactly the kernel's gradient for the current mask, so the
        sparsifier need not mask it again.

        A layer qualifies only while its weight's ``.grad`` is the gradient storage the kernel
        wrote in the last backward for the structure of the current mask, with no write since
        (see :meth:`GradBuffer.holds`): a weight also used outside the kernel, gradients
        accumulated over several backward passes, dense gradients and a mask replaced after the
        backward all fail that test and are masked as usual.
        """
        return {
            name
            for name, layer in self.layers.items()
            if not layer.dirty
            and layer.structure is not None
            and layer.grad_buffer.holds(self._modules[name].weight.grad, layer.structure)
        }

    def premasked(self, name: str, grad: torch.Tensor) -> bool:
        """Whether ``grad`` (``name``'s ``.grad`` just accumulated) is the kernel's masked
        gradient, untouched since (see :meth:`masked_grads`)."""
        layer = self.layers.get(name)
        return (
            layer is not None
            and not layer.dirty
            and layer.structure is not None
            and layer.grad_buffer.holds(grad, layer.structure)
        )

    def before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """The sparsifier's step pre-hook, after the method's update: step the kept weights of
        the sparse layers where that is faster (see :mod:`sparsetrain.kernels.kept_step`) and
        leave the optimizer only the rest."""
        self.kept_step.before_step(optimizer, args, kwargs)

    def after_step(self) -> set[str]:
        """The sparsifier's step post-hook: names of the weights :meth:`before_step` updated,
        which are still zero off their masks (their masking can be skipped)."""
        return self.kept_step.after_step()

    def compact_grad(
        self, name: str, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat kept positions, values there) of ``grad`` when it is the kernel's untouched
        gradient for the current mask (see :meth:`premasked`), else None."""
        layer = self.layers.get(name)
        if layer is None or layer.dirty or layer.structure is None:
            return None
        values = layer.grad_buffer.values(grad, layer.structure)
        return None if values is None else (layer.structure.index, values)

    def wants_dense_grad(self) -> bool:
        """Whether the coming optimizer step must see full dense weight gradients."""
        if self._forced_dense_grad:
            return True
        method = self.sp.method
        return method is not None and bool(method.needs_dense_grad(self.sp.step + 1))

    @contextlib.contextmanager
    def dense_gradients(self) -> Iterator[None]:
        """Compute full dense weight gradients for every backward of forwards run inside."""
        self._forced_dense_grad += 1
        try:
            yield
        finally:
            self._forced_dense_grad -= 1

    def choices(self) -> dict[str, str]:
        """``sparse`` or ``dense``: what each sparse weight's layer ran in its last training
        call."""
        out = dict.fromkeys(self.dense_reasons, "dense")
        out.update({name: layer.choice for name, layer in self.layers.items()})
        return out

    def detach(self) -> None:
        """Give every layer back its plain ``nn.Linear`` class and stop listening to masks."""
        for module in self._modules.values():
            del module._kernel
            module.__class__ = nn.Linear
        self._modules.clear()
        self.layers.clear()
        if self._mask_changed in self.sp.mask_listeners:
            self.sp.mask_listeners.remove(self._mask_changed)


def use_kernels(sp: Sparsifier, mode: str, tuner: Autotuner | None = None) -> KernelMode | None:
    """Run ``sp``'s sparse Linear layers in ``mode`` from now on; returns the mode (also
    ``sp.kernels``), None for ``dense``.

    ``sparse``: every Linear whose mask is not full runs on CSR kernels (float32/float64, CPU).
    ``auto``: each layer runs sparse only where ``tuner`` (default: the process-wide one) measured
    its sparse version faster, per shape, density bucket and batch size. ``dense``: the masked
    dense layers. Gradients are the masked dense gradients in every mode.
    """
    if mode not in KERNEL_MODES:
        raise ConfigError(f"unknown kernels {mode!r}; choose one of {', '.join(KERNEL_MODES)}")
    if sp.kernels is not None:
        sp.kernels.detach()
        sp.kernels = None
    if mode != "dense":
        sp.kernels = KernelMode(sp, mode, tuner)
    return sp.kernels
