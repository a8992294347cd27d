"""Attach an execution mode to a :class:`~sparsetrain.masks.Sparsifier`: dense, sparse or auto.

In ``sparse`` and ``auto`` mode each sparse ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``
(groups 1) of the model has its class switched to a kernel subclass
(:mod:`sparsetrain.kernels.layers`) whose training forward runs the sparse kernels: CSR products
for Linear layers, the compiled direct sparse convolution for convolutions (``auto``: where
timing says it is faster). The module keeps its parameters, their identity and its state_dict
keys; optimizers, checkpoints and methods see no difference, and copies are plain modules.
Without the compiled extension (no compiler, or ``SPARSETRAIN_NO_EXTENSION=1``) convolutions
stay the masked dense layers.

Kernels run only in training mode: in eval mode (evaluation, FLOP counting, export checks) the
layer is the plain masked dense module, whose numbers every report relies on. For fast
inference export with ``format="sparse-cpu"``.

A layer's sparse structure is rebuilt lazily, at its first forward after the sparsifier reports
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
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsetrain.errors import ConfigError
from sparsetrain.kernels.autotune import Autotuner, default_tuner
from sparsetrain.kernels.extension import DISABLE_ENV, conv_kernels
from sparsetrain.kernels.kept_step import KeptStep
from sparsetrain.kernels.layers import KERNEL_CLASSES, PLAIN, ConvRoute, LinearRoute
from sparsetrain.kernels.sparse_conv import Workspace

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["KERNEL_MODES", "KernelMode", "KernelStats", "use_kernels"]

log = logging.getLogger(__name__)

KERNEL_MODES = ("dense", "sparse", "auto")
NO_EXTENSION = (
    f"the compiled sparse convolution is not available (build failed, or {DISABLE_ENV}=1)"
)
GROUPS_REASON = "grouped convolutions (groups > 1) have no sparse kernel"


@dataclass
class KernelStats:
    """What keeping structures in step with the masks cost so far."""

    rebuilds: int = 0  # structures built (first use, then once per changed mask)
    rebuild_s: float = 0.0  # seconds spent building them


class KernelMode:
    """The ``sparse`` or ``auto`` execution mode of one sparsifier's Linear and convolution
    layers.

    ``layers`` maps each sparse weight's name to its route; weights of other modules (grouped
    or transposed convolutions, custom layers, convolutions without the extension) are listed
    in ``dense_reasons``. Use :func:`use_kernels` to create, switch or remove it.
    """

    def __init__(self, sp: Sparsifier, mode: str, tuner: Autotuner | None = None) -> None:
        self.sp = sp
        self.mode = mode
        self.tuner = tuner or default_tuner()
        self.stats = KernelStats()
        self.layers: dict[str, LinearRoute | ConvRoute] = {}
        self.dense_reasons: dict[str, str] = {}
        self.workspace = Workspace()  # packed activations, shared by every convolution
        self._modules: dict[str, nn.Module] = {}
        self._forced_dense_grad = 0
        self.kept_step = KeptStep(sp, mode, self.tuner, self.compact_grad)
        for name in sp.params:
            module_name, _, attr = name.rpartition(".")
            module = sp.model.get_submodule(module_name)
            route = self._route(name, module) if attr == "weight" else None
            if route is not None:
                self.layers[name] = route
                self._modules[name] = module
        for name, module in self._modules.items():
            module.__class__ = KERNEL_CLASSES[type(module)]
            module._kernel = self.layers[name]
        sp.mask_listeners.append(self._mask_changed)
        log.info(
            "%s kernels on %d layer(s); dense: %s",
            mode,
            len(self.layers),
            "; ".join(f"{n} ({r})" for n, r in self.dense_reasons.items()) or "none",
        )

    def _route(self, name: str, module: nn.Module) -> LinearRoute | ConvRoute | None:
        """The route of a sparse weight's module, or None with the reason in dense_reasons."""
        kind = type(module)
        if kind is nn.Linear:
            return LinearRoute(self, name)
        if kind in (nn.Conv1d, nn.Conv2d) and module.groups != 1:
            self.dense_reasons[name] = GROUPS_REASON
        elif kind in (nn.Conv1d, nn.Conv2d):
            kernels = conv_kernels()
            if kernels is not None:
                return ConvRoute(self, name, kernels)
            self.dense_reasons[name] = NO_EXTENSION
        else:
            self.dense_reasons[name] = f"no sparse kernel for {kind.__name__}"
        return None

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
        """Give every layer back its plain class and stop listening to masks."""
        for module in self._modules.values():
            del module._kernel
            module.__class__ = PLAIN[type(module)]
        self._modules.clear()
        self.layers.clear()
        if self._mask_changed in self.sp.mask_listeners:
            self.sp.mask_listeners.remove(self._mask_changed)


def use_kernels(sp: Sparsifier, mode: str, tuner: Autotuner | None = None) -> KernelMode | None:
    """Run ``sp``'s sparse Linear and convolution layers in ``mode`` from now on; returns the
    mode (also ``sp.kernels``), None for ``dense``.

    ``sparse``: every Linear whose mask is not full runs on CSR kernels, every Conv1d/Conv2d on
    the compiled sparse convolution (float32/float64, CPU).
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
