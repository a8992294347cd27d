"""The optimizer step over kept weights only, for SGD, Adam and AdamW.

With sparse kernels a layer's three products shrink with its density, but the optimizer still
streams every dense weight, gradient and state tensor (and the default SGD allocates a
weight-sized temporary for weight decay): at 98% sparsity that pass is most of a step. Between
mask changes nothing moves off the mask: the gradient there is zero (masked where autograd
produced it) and so are the weight and every state tensor, so weight decay, momentum and both
Adam moments stay zero there. The dense update is the identity off the mask. Running the
optimizer's own functional update (``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``, with the
group's hyperparameters and foreach/fused flags) on the gathered kept values and scattering them
back into the same tensors therefore gives the dense optimizer's weights and state: the same
tensors in ``optimizer.state[p]``, the same ``state_dict()``, so checkpoints, resumption and the
sparsifier's state resets on mask changes work unchanged.

It plugs into the sparsifier's step hooks: :meth:`KeptStep.before_step` (from the step pre-hook)
updates the kept values of the weights it takes and hides their ``.grad`` so that the optimizer's
own step skips them; :meth:`KeptStep.after_step` (from the post-hook) gives the gradients back
and names those weights, which are still zero off their masks, so the sparsifier's weight masking
(another dense pass) skips them.

The premise (weight and state zero off the mask) is checked, not assumed: every tensor is
recorded with its version counter after this class wrote it, and a tensor replaced or written
since (a mask change, a loaded checkpoint, the dense optimizer) is checked once by one dense
pass. A weight takes the dense optimizer instead when that check fails, on its first step (the
optimizer creates its state), for a closure or a step that GradScaler unscales inside a fused
kernel, in kept-values mode (AST: state under a masked-off weight keeps decaying in the dense
optimizer), for non-CPU or non-float tensors, layouts that differ between weight, gradient and
state, ``differentiable``/``capturable`` groups and optimizers other than exactly ``SGD``,
``Adam`` and ``AdamW``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import adam as _adam
from torch.optim import sgd as _sgd

from sparsetrain.kernels.autotune import Autotuner, density_bucket

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["KeptStep", "StepKey"]

_SGD = torch.optim.SGD
_SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


# (name, .grad) -> (flat kept positions, gradient values there), when the kernel has them.
CompactGrad = Callable[[str, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


@dataclass(frozen=True)
class StepKey:
    """What a timing of the kept-weights step against the dense one is valid for."""

    optimizer: str
    numel: int
    dtype: torch.dtype
    density: float  # bucket, see density_bucket
    options: tuple  # the hyperparameters that change the work (momentum on, fused, ...)
    threads: int


def _state_keys(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[str, ...]:
    """The weight-shaped state tensors the update reads and writes, in the order
    :func:`functional_update` takes them."""
    if isinstance(optimizer, _SGD):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()
    keys = ("exp_avg", "exp_avg_sq")
    return (*keys, "max_exp_avg_sq") if group["amsgrad"] else keys


def _options(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple:
    if isinstance(optimizer, _SGD):
        return (
            group["momentum"] != 0,
            group["nesterov"],
            group["weight_decay"] != 0,
            bool(group["fused"]),
            bool(group["foreach"]),
        )
    return (
        group["amsgrad"],
        group["weight_decay"] != 0,
        bool(group["fused"]),
        bool(group["foreach"]),
    )


def functional_update(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    steps: list[torch.Tensor],
) -> None:
    """One step of ``optimizer``'s own update for ``group`` on the given tensors, in place.

    ``states[i]`` holds the tensors of :func:`_state_keys` for ``params[i]``; ``steps`` the Adam
    step counters (incremented here, as the optimizer does).
    """
    if isinstance(optimizer, _SGD):
        _sgd.sgd(
            params,
            grads,
            [s[0] for s in states] if group["momentum"] != 0 else [None] * len(params),
            foreach=group["foreach"],
            fused=group["fused"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        return
    beta1, beta2 = group["betas"]
    _adam.adam(
        params,
        grads,
        [s[0] for s in states],
        [s[1] for s in states],
        [s[2] for s in states] if group["amsgrad"] else [],
        steps,
        foreach=group["foreach"],
        fused=group["fused"],
        decoupled_weight_decay=group["decoupled_weight_decay"],
        amsgrad=group["amsgrad"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in memory order, as a 1-D view (``t`` must be dense, see _dense)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its memory without gaps or overlaps (in any dimension order)."""
    expected = 1
    for stride, size in sorted(
        (st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides, ignoring dimensions of size 1 (whose strides say nothing)."""
    return tuple(st if n != 1 else 0 for n, st in zip(t.shape, t.stride(), strict=True))


class _Clean:
    """Tensors known to be zero off one mask, each at the version it had when that was known."""

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None
        self._seen: dict[str, tuple[weakref.ref, int]] = {}

    def ensure(self, mask: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
        """True when every tensor is zero off ``mask`` (checked by a dense pass for those not
        recorded as such since their last write)."""
        if mask is not self._mask:
            self._mask, self._seen = mask, {}
        off: torch.Tensor | None = None
        for key, t in tensors.items():
            seen = self._seen.get(key)
            if seen is not None and seen[0]() is t and seen[1] == t._version:
                continue
            if off is None:
                off = 1 - mask
            if bool(t.mul(off).any()):
                return False
            self._seen[key] = (weakref.ref(t), t._version)
        return True

    def record(self, tensors: dict[str, torch.Tensor]) -> None:
        """The tensors were written at kept positions only: still zero off the mask."""
        for key, t in tensors.items():
            self._seen[key] = (weakref.ref(t), t._version)


class KeptStep:
    """The kept-weights optimizer step of one sparsifier.

    ``mode`` ``sparse`` takes every eligible sparse weight; ``auto`` only those whose case
    ``tuner`` measured faster than the dense update (per optimizer, size, density bucket,
    options and threads).
    """

    def __init__(
        self,
        sp: Sparsifier,
        mode: str,
        tuner: Autotuner,
        compact_grad: CompactGrad | None = None,
    ) -> None:
        self.sp = sp
        self.mode = mode
        self.tuner = tuner
        self.compact_grad = compact_grad
        # Compact copies left by the last update, valid while their tensor keeps its version:
        # (name, slot) -> (tensor, version, index, values). Each saves a gather from a large,
        # cache-missing weight (the gathers and scatters are most of a 98%-sparse step).
        self._compact: dict[tuple[str, int], tuple[weakref.ref, int, torch.Tensor, Any]] = {}
        self._same_index: dict[str, tuple[weakref.ref, weakref.ref]] = {}
        self.steps = 0  # parameter updates done over kept weights only (for tests and reports)
        self._index: dict[str, tuple[torch.Tensor, tuple[int, ...], torch.Tensor]] = {}
        self._clean: dict[str, _Clean] = {}
        self._hidden: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}

    def before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """Update the kept values of the weights this step takes; hide their gradients."""
        self._hidden = {}
        sp = self.sp
        if args and args[0] is optimizer:  # the hook sees step's arguments, self included
            args = args[1:]
        if (
            type(optimizer) not in _SUPPORTED
            or args  # a closure: the gradients do not exist yet
            or kwargs
            or getattr(optimizer, "grad_scale", None) is not None
            or sp.keeps_values
        ):
            return
        names = {id(sp.params[n]): n for n in sp.enforced_names()}
        for group in optimizer.param_groups:
            if group.get("differentiable") or group.get("capturable"):
                continue
            keys = _state_keys(optimizer, group)
            taken = []
            for p in group["params"]:
                name = names.get(id(p))
                if name is not None and self._eligible(optimizer, group, keys, name, p):
                    taken.append((name, p))
            if taken:
                self._update(optimizer, group, keys, taken)

    def after_step(self) -> set[str]:
        """Give the hidden gradients back; the names of the weights updated (still masked)."""
        for param, grad in self._hidden.values():
            param.grad = grad
        names, self._hidden = set(self._hidden), {}
        return names

    # ------------------------------------------------------------------ internals
    def _eligible(
        self,
        optimizer: torch.optim.Optimizer,
        group: dict[str, Any],
        keys: tuple[str, ...],
        name: str,
        p: nn.Parameter,
    ) -> bool:
        grad, state = p.grad, optimizer.state.get(p) or {}
        needed = keys if isinstance(optimizer, _SGD) else (*keys, "step")  # Adam: not 1st step
        if (
            grad is None
            or type(grad) is not torch.Tensor
            or grad.is_sparse
            or p.device.type != "cpu"
            or not p.is_floating_point()
            or any(not isinstance(state.get(k), torch.Tensor) for k in needed)
        ):
            return False
        tensors = {"param": p, **{k: state[k] for k in keys}}
        layout = _layout(p)
        if not _dense(p) or any(_layout(t) != layout for t in (grad, *tensors.values())):
            return False
        index = self._kept_index(name, p)
        if not self._clean.setdefault(name, _Clean()).ensure(self.sp.float_mask(name), tensors):
            return False
        return self.mode == "sparse" or self._measured_faster(optimizer, group, keys, p, index)

    def _kept_index(self, name: str, p: nn.Parameter) -> torch.Tensor:
        """The kept positions of ``name``'s mask in ``p``'s memory order (cached per mask)."""
        mask = self.sp.float_mask(name)
        cached = self._index.get(name)
        if cached is not None and cached[0] is mask and cached[1] == _layout(p):
            return cached[2]
        laid_out = torch.empty_like(p, dtype=torch.bool).copy_(mask)  # p's strides
        index = _flat(laid_out).nonzero().squeeze(1)
        self._index[name] = (mask, _layout(p), index)
        return index

    def _update(
        self,
        optimizer: torch.optim.Optimizer,
        group: dict[str, Any],
        keys: tuple[str, ...],
        taken: list[tuple[str, nn.Parameter]],
    ) -> None:
        params, grads, states, steps, targets = [], [], [], [], []
        with torch.no_grad():
            for name, p in taken:
                index = self._index[name][2]
                state = optimizer.state.get(p, {})  # a defaultdict: no new entries
                full = [p, *(state[k] for k in keys)]
                compact = [self._gather(name, slot, t, index) for slot, t in enumerate(full)]
                params.append(compact[0])
                grads.append(self._grad_values(name, p.grad, index))
                states.append(compact[1:])
                if "step" in state:
                    steps.append(state["step"])
                targets.append((name, p, full, compact, index))
            functional_update(optimizer, group, params, grads, states, steps)
            for name, p, full, compact, index in targets:
                for slot, (t, c) in enumerate(zip(full, compact, strict=True)):
                    _flat(t).put_(index, c)
                    self._compact[name, slot] = (weakref.ref(t), t._version, index, c)
                self._clean[name].record(
                    {"param": p, **{k: t for k, t in zip(keys, full[1:], strict=True)}}
                )
                self._hidden[name] = (p, p.grad)
                p.grad = None
                self.steps += 1

    def _gather(self, name: str, slot: int, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``t`` at ``index``: the copy the last update left when ``t`` is unchanged since."""
        cached = self._compact.get((name, slot))
        if (
            cached is not None
            and cached[0]() is t
            and cached[1] == t._version
            and cached[2] is index
        ):
            return cached[3]
        return _flat(t).index_select(0, index)

    def _grad_values(self, name: str, grad: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The gradient at ``index``: the kernel's own values when it wrote ``grad`` for the
        same positions, else a gather."""
        hit = self.compact_grad(name, grad) if self.compact_grad is not None else None
        if hit is not None and grad.is_contiguous():
            positions, values = hit
            known = self._same_index.get(name)
            if known is not None and known[0]() is positions and known[1]() is index:
                return values
            if positions.shape == index.shape and torch.equal(positions, index):
                self._same_index[name] = (weakref.ref(positions), weakref.ref(index))
                return values
        return _flat(grad).index_select(0, index)

    def _measured_faster(
        self,
        optimizer: torch.optim.Optimizer,
        group: dict[str, Any],
        keys: tuple[str, ...],
        p: nn.Parameter,
        index: torch.Tensor,
    ) -> bool:
        key = StepKey(
            type(optimizer).__name__,
            p.numel(),
            p.dtype,
            density_bucket(index.numel() / max(1, p.numel())),
            _options(optimizer, group),
            torch.get_num_threads(),
        )
        what = f"{key.optimizer} step of {p.numel()} weights at density {key.density:.3f}"
        return self.tuner.decide(key, lambda: _step_calls(optimizer, group, keys, p, index), what)


def _step_calls(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    keys: tuple[str, ...],
    p: nn.Parameter,
    index: torch.Tensor,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The dense update of one weight and its kept-weights update, on copies (for timing)."""
    state = optimizer.state.get(p, {})  # a defaultdict: no new entries
    weight, grad = p.detach().clone(), p.grad.detach().clone()
    tensors = [state[k].clone() for k in keys]
    step = [state["step"].clone()] if "step" in state else []
    group = {**group, "lr": 0.0}  # the copies stay as they are from call to call

    def dense() -> None:
        functional_update(optimizer, group, [weight], [grad], [tensors], step)

    def kept() -> None:
        full = [weight, *tensors]
        compact = [_flat(t).index_select(0, index) for t in full]
        g = _flat(grad).index_select(0, index)
        functional_update(optimizer, group, compact[:1], [g], [compact[1:]], step)
        for t, c in zip(full, compact, strict=True):
            _flat(t).put_(index, c)

    return dense, kept
