"""Forward FLOPs of a masked model, dense and sparse-effective, counted by ``FlopCounterMode``.

``torch.utils.flop_counter.FlopCounterMode`` counts a masked model as dense: zeros are multiplied
all the same. The sparse-effective count of an op that multiplies a masked weight is its dense
count times the density of the part of the weight it reads. To know which op reads which weight,
every op the counter counts is tagged as it runs with the masked weights whose memory its operands
view (the transposed weight a Linear hands to ``addmm``, one slice of MultiheadAttention's packed
``in_proj_weight``, a custom module's ``F.linear(x, self.weight)``, a tied weight used by another
module) and with the innermost module running it. Only operands of two or more dimensions count as
multiplied weights; a bias is added, not multiplied, and the counter does not count additions.

A weight that is transformed before use (weight norm, a forward-time ``weight * mask`` copy) is read
by no op. Its density then applies to the ops of the module that owns it which read no other masked
weight: the module-level rule, right for a module whose forward holds one weight product.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from sparsetrain import sharding
from sparsetrain.errors import ConfigError
from sparsetrain.inputs import ExampleInput

__all__ = ["FlopsReport", "inference_flops", "training_flops_per_step"]

log = logging.getLogger(__name__)


@dataclass
class FlopsReport:
    """Forward FLOPs of one example (batch 1), dense and sparse-effective.

    ``per_module`` maps a module's fully-qualified name (``""`` for the root's own functional
    calls) to ``(dense, sparse)`` FLOPs of the ops that module runs itself, not through a
    submodule; modules that run no counted op (activations, norms) are absent. Its values sum to
    ``dense`` and ``sparse``.
    """

    dense: int
    sparse: int
    per_module: dict[str, tuple[int, int]]

    @property
    def ratio(self) -> float:
        """Sparse over dense FLOPs (1.0 for a model with no counted op)."""
        return self.sparse / self.dense if self.dense else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "dense": self.dense,
            "sparse": self.sparse,
            "ratio": self.ratio,
            "per_module": {name: list(pair) for name, pair in self.per_module.items()},
        }


def training_flops_per_step(
    fwd_flops_dense: int, fwd_flops_sparse: int, batch_size: int, *, dense_backward: bool = False
) -> int:
    """FLOPs of one training step on ``batch_size`` examples, by the usual 3x-forward convention.

    The backward pass costs twice the forward: one product for the gradient with respect to the
    inputs, one for the gradient with respect to the weights. A sparse step runs all three sparse:
    3 x sparse forward. A step that needs the dense gradient of the masked weights (RigL's grow
    steps) computes the weight gradient densely: sparse forward + sparse input gradient + dense
    weight gradient. A dense step is the case ``fwd_flops_sparse == fwd_flops_dense``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    weight_grad = fwd_flops_dense if dense_backward else fwd_flops_sparse
    return (2 * fwd_flops_sparse + weight_grad) * batch_size


# The counter's registry lacks the CPU flash-attention kernel that scaled_dot_product_attention
# runs on CPU; it does the arithmetic of the flash kernel, so it gets that kernel's formula.
_FORMULAS = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[
        torch.ops.aten._scaled_dot_product_flash_attention
    ],
}


def inference_flops(
    model: nn.Module,
    example_input: torch.Tensor | ExampleInput,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> FlopsReport:
    """Count one forward of ``example_input`` (a batch of one) through ``model``, dense and sparse.

    ``example_input`` is a tensor (the model's one positional input) or an
    :class:`~sparsetrain.inputs.ExampleInput` (positional and keyword inputs, as a Hugging
    Face-style model is called). ``masks`` maps fully-qualified parameter names to masks (bool or
    0/1) of the parameters' shapes. The forward runs in eval mode under ``torch.no_grad``; every
    module's training flag is restored afterwards.
    """
    if isinstance(example_input, torch.Tensor):
        if example_input.dim() == 0 or example_input.shape[0] != 1:
            raise ConfigError(
                "example_input must be a batch of one example (shape[0] == 1), "
                f"got shape {tuple(example_input.shape)}"
            )
        example_input = ExampleInput((example_input,), {}, 1)
    masks = dict(masks or {})
    weights = _WeightLookup(model, masks)
    tally = _Tally(type(model).__name__)
    counter = FlopCounterMode(
        display=False,
        custom_mapping={
            op: _tagged(formula, lambda: counter.mod_tracker.parents, weights, tally)
            for op, formula in _FORMULAS.items()
        },
    )
    param = next(model.parameters(), None)
    if param is not None:
        example_input = example_input.to(param.device)
    flags = [(module, module.training) for module in model.modules()]
    # In eval mode without grad, MultiheadAttention and TransformerEncoder take fused kernels
    # that the counter does not count; the regular path does the same arithmetic.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    model.eval()
    try:
        with torch.no_grad(), counter:
            example_input(model)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, flag in flags:
            module.training = flag

    per_module = tally.settle(weights)
    return FlopsReport(
        dense=counter.get_total_flops(),
        sparse=sum(sparse for _, sparse in per_module.values()),
        per_module=per_module,
    )


def _tagged(
    formula: Callable[..., int],
    parents: Callable[[], set[str]],
    weights: _WeightLookup,
    tally: _Tally,
) -> Callable[..., int]:
    """Wrap one of the counter's own formulas so that each count is also tallied by module."""

    def count(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        flops = formula(*args, out_val=out_val, **kwargs)
        tally.add(parents(), flops, weights.reads(args, kwargs))
        return flops

    count._get_raw = True  # type: ignore[attr-defined]  # the counter passes tensors, not shapes
    return count


class _WeightLookup:
    """Finds the masked weight an operand views, and the density of the part of it read."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.owner: dict[str, str] = {}
        self.count: dict[str, tuple[int, int]] = {}  # name -> (active, numel)
        # storage address -> (name, tensor, first and last offset, mask laid out like the tensor)
        self._by_storage: dict[int, list[tuple[str, torch.Tensor, int, int, torch.Tensor]]] = {}
        self._cache: dict[tuple, Fraction] = {}
        for name, mask in masks.items():
            owner, _, attr = name.rpartition(".")
            try:
                module = model.get_submodule(owner)
            except AttributeError:
                raise ConfigError(f"mask {name!r} names no module of the model") from None
            tensor = getattr(module, attr, None)
            if not isinstance(tensor, torch.Tensor):
                raise ConfigError(f"mask {name!r} names no tensor of the model")
            if mask.shape != tensor.shape:
                raise ConfigError(
                    f"mask of {name!r} has shape {tuple(mask.shape)}, "
                    f"tensor has {tuple(tensor.shape)}"
                )
            self.owner[name] = owner
            self.count[name] = (int(torch.count_nonzero(mask)), mask.numel())
            # Only tensors the module holds keep their memory: a computed attribute (a
            # parametrization) is a temporary whose address a later tensor may reuse, and a
            # sharded (FSDP) weight is gathered into new memory for each forward.
            own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
            held = any(t is tensor for t in own) and not sharding.is_sharded(tensor)
            if held and tensor.numel() > 0:
                first, last = _span(tensor)
                layout = torch.zeros(last - first + 1, device=tensor.device)
                layout.as_strided(tensor.shape, tensor.stride()).copy_(mask)
                entry = (name, tensor, first, last, layout)
                self._by_storage.setdefault(_address(tensor), []).append(entry)

    def reads(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Fraction]:
        """Density of each masked weight that the operands of one op read."""
        found: dict[str, Fraction] = {}
        for operand in _operands(args, kwargs):
            lo, hi = _span(operand)
            for name, weight, first, last, layout in self._by_storage.get(_address(operand), ()):
                if first <= lo and hi <= last and weight.device == operand.device:
                    found[name] = self._density(name, layout, operand, lo - first)
        return found

    def _density(
        self, name: str, layout: torch.Tensor, operand: torch.Tensor, offset: int
    ) -> Fraction:
        key = (name, tuple(operand.shape), operand.stride(), offset)
        if key not in self._cache:
            part = layout.as_strided(operand.shape, operand.stride(), offset)
            self._cache[key] = Fraction(int(torch.count_nonzero(part)), part.numel())
        return self._cache[key]


def _operands(args: tuple, kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, torch.Tensor) and item.dim() >= 2 and item.numel() > 0:
                yield item


def _address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """First and last storage offsets (in elements) a non-empty tensor covers."""
    first = tensor.storage_offset()
    return first, first + sum(
        (n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True)
    )


class _Tally:
    """Dense and exact sparse FLOPs per innermost module, as the counter reports each op."""

    def __init__(self, root_name: str) -> None:
        self._root = root_name
        self.dense: dict[str, int] = defaultdict(int)
        self.sparse: dict[str, Fraction] = defaultdict(Fraction)
        self.unclaimed: dict[str, int] = defaultdict(int)  # ops that read no masked weight
        self.read: set[str] = set()

    def add(self, parents: set[str], flops: int, reads: dict[str, Fraction]) -> None:
        module = self._fqn(max(parents - {"Global"}, key=lambda n: n.count("."), default=""))
        self.dense[module] += flops
        if reads:
            self.read.update(reads)
            # An op multiplying two masked tensors keeps the products where both are kept.
            self.sparse[module] += flops * math.prod(reads.values())
        else:
            self.unclaimed[module] += flops

    def _fqn(self, tracker_name: str) -> str:
        """The counter names the root module by its class and the rest ``Root.child.name``."""
        if tracker_name == self._root:
            return ""
        prefix = self._root + "."
        return tracker_name[len(prefix) :] if tracker_name.startswith(prefix) else tracker_name

    def settle(self, weights: _WeightLookup) -> dict[str, tuple[int, int]]:
        """Apply weights no op read to their owner's unclaimed ops; the rest count dense."""
        unread: dict[str, list[str]] = defaultdict(list)
        for name, owner in weights.owner.items():
            if name not in self.read:
                unread[owner].append(name)
        for owner, names in unread.items():
            if not self.unclaimed.get(owner):
                log.warning(
                    "masked %s read by no counted op of the forward; its density scales no FLOPs",
                    ", ".join(names),
                )
                continue
            active = sum(weights.count[name][0] for name in names)
            numel = sum(weights.count[name][1] for name in names)
            self.sparse[owner] += self.unclaimed.pop(owner) * Fraction(active, numel)
        for module, flops in self.unclaimed.items():
            self.sparse[module] += flops
        return {module: (flops, round(self.sparse[module])) for module, flops in self.dense.items()}
