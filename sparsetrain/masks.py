"""The Sparsifier: owns one mask per sparse parameter and enforces it. Knows no paper.

Masks are enforced in three places: gradients where autograd produces them (a post-accumulate-grad
hook per sparse weight, :mod:`sparsetrain.gradients`, so clipping, GradScaler and DDP see them
masked), weights after ``optimizer.step()`` (its public step post-hook), and every optimizer-state
tensor of the weight's shape (SGD momentum, Adam moments) whenever a mask changes. Between mask changes, masked state stays
exactly zero by itself (its gradient and its weight are zero, so weight decay adds nothing), so
re-masking it every step would be wasted work. Masks are held as float tensors and applied with
``torch._foreach_mul_``, the cheapest form measured; layers whose mask is all ones are skipped.

Two storage modes share this class:

* physical (default): masked weights are really zero; a regrown weight starts at 0 with zero
  optimizer state.
* kept values (:meth:`keep_masked_values`): the values under the mask are remembered in a shadow
  copy and come back when the mask grows over them. This is the forward-time masking that nested
  sub-networks (AST) need: a sparser sub-network must not destroy weights a denser one uses.
  With ``step_all`` the optimizer steps the kept values too (only the gradient is masked), as a
  model that masks only in its forward would.

Under FSDP2 (DTensor weights) every mask, kept value and enforcement is this rank's shard; the
accessors that methods decide from (:meth:`Sparsifier.weight`, :meth:`Sparsifier.mask`,
:meth:`Sparsifier.dense_grad`) gather whole tensors (see :mod:`sparsetrain.sharding`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsetrain import sharding
from sparsetrain.drift import DriftWatch
from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.gradients import GradientMasks
from sparsetrain.inputs import ExampleInput
from sparsetrain.ownership import claim, release, unwrap_optimizer

if TYPE_CHECKING:
    from sparsetrain.kernels import KernelMode
    from sparsetrain.policy import Policy

__all__ = ["Sparsifier"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


class Sparsifier:
    """Masks for the parameters ``params`` of ``model``, enforced through ``optimizer``'s hooks."""

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.model = model
        self.params: dict[str, nn.Parameter] = dict(params)
        self.targets: dict[str, float] = dict.fromkeys(self.params, 0.0)
        self.method: Policy | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0
        self._masks = {
            n: torch.ones_like(sharding.local(p), memory_format=torch.contiguous_format)
            for n, p in self.params.items()
        }
        self._density = dict.fromkeys(self.params, 1.0)
        self._density_sum = dict.fromkeys(self.params, 0.0)
        self.backward_passes = 0  # over all completed steps (micro-batches of accumulation)
        self._shadow: dict[str, torch.Tensor] | None = None
        self._step_kept = False
        self._handles: list[Any] = []
        # Called with a parameter's name whenever its mask is replaced (sparse kernels rebuild
        # their structures then, and only then).
        self.mask_listeners: list[Callable[[str], None]] = []
        self.kernels: KernelMode | None = None  # execution mode, see sparsetrain.kernels
        self.inputs: ExampleInput | None = None  # the first forward's inputs, one example
        self.batch_size: int | None = None
        self.gradients = GradientMasks(self)
        self.drift = DriftWatch(self)
        self._capture: Any = model.register_forward_pre_hook(_InputCapture(self), with_kwargs=True)
        self._refresh()
        if optimizer is not None:
            self.attach(optimizer)

    @property
    def example_input(self) -> torch.Tensor | None:
        """The first positional input of the first forward, one example (zeros), if any."""
        return None if self.inputs is None else self.inputs.first_tensor()

    # ------------------------------------------------------------------ masks
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Bool masks by fully-qualified parameter name (copies; edit through :meth:`set_mask`).

        Placed like their parameters: under FSDP2 a DTensor with the weight's mesh and placements
        (``.full_tensor()`` or :meth:`full_masks` gives the whole mask). No communication.
        """
        return {
            name: sharding.placed(m.bool(), self.params[name]) for name, m in self._masks.items()
        }

    def mask(self, name: str) -> torch.Tensor:
        """The whole bool mask of one parameter (under FSDP an all-gather: call it on every rank)."""
        name = self._check_name(name)
        return sharding.full(sharding.placed(self._masks[name].bool(), self.params[name]))

    def full_masks(self) -> dict[str, torch.Tensor]:
        """Every whole bool mask (:meth:`mask` for each parameter)."""
        return {name: self.mask(name) for name in self.params}

    def weight(self, name: str) -> torch.Tensor:
        """The whole weight, detached: what mask decisions rank (under FSDP an all-gather: call
        it on every rank, at mask updates only)."""
        return sharding.full(self.params[self._check_name(name)].detach())

    def density(self, name: str) -> float:
        """Fraction of active weights of one parameter."""
        return self._density[self._check_name(name)]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all sparse parameters."""
        total = sum(p.numel() for p in self.params.values())
        if total == 0:
            return 0.0
        active = sum(self._density[n] * p.numel() for n, p in self.params.items())
        return 1.0 - active / total

    def set_mask(self, name: str, mask: torch.Tensor, count: int | None = None) -> None:
        """Replace one mask and make weights and optimizer state agree with it.

        Physical mode: weights outside the mask become 0, newly activated weights start at 0, and
        optimizer state is zeroed wherever the mask is off or newly on. Kept-values mode: values
        return from the shadow copy and optimizer state is left alone.

        ``mask`` is whole, or under FSDP a DTensor (redistributed to the weight's placement: no
        communication when placed like it). ``count``: its nonzeros, when the caller knows them;
        a DTensor's would otherwise be summed over the ranks (a collective).
        """
        param = self.params[self._check_name(name)]
        if mask.shape != param.shape:
            raise ConfigError(
                f"mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(param.shape)}"
            )
        new = sharding.shard_of(mask, param).to(device=param.device, dtype=torch.bool)
        old = self._masks[name].bool()
        weight = sharding.local(param)
        new_float = new.to(weight.dtype)
        with torch.no_grad():
            if self._shadow is not None:
                shadow = self._shadow[name]
                shadow.copy_(torch.where(old, weight, shadow))
                weight.copy_(shadow * new_float)
            else:
                regrown = new & ~old
                weight.mul_(new_float).masked_fill_(regrown, 0.0)
                for state in self._state_tensors(param):
                    state.mul_(new_float).masked_fill_(regrown, 0.0)
        self._masks[name] = new_float
        active = sharding.count(mask) if count is None else int(count)
        self._density[name] = active / max(1, mask.numel())
        self._refresh()
        self.drift.settle([name])
        for listener in self.mask_listeners:
            listener(name)

    def set_masks(
        self, masks: Mapping[str, torch.Tensor], counts: Mapping[str, int] | None = None
    ) -> None:
        """:meth:`set_mask` for several parameters (``counts``: their nonzeros, if known)."""
        for name, mask in masks.items():
            self.set_mask(name, mask, None if counts is None else counts[name])

    def keep_masked_values(self, step_all: bool = False) -> None:
        """Switch to kept-values mode: remember the current dense weights under every mask.

        ``step_all``: every optimizer step also updates the kept values (momentum and weight
        decay move them; their gradient is zero unless a method wrote one), instead of freezing
        them until their mask returns.
        """
        if self._shadow is None:
            self._shadow = {n: sharding.local(p).detach().clone() for n, p in self.params.items()}
        self._step_kept = bool(step_all)

    @property
    def keeps_values(self) -> bool:
        """Whether masked-off values are kept (:meth:`keep_masked_values`)."""
        return self._shadow is not None

    def dense_value(self, name: str) -> torch.Tensor:
        """The whole weight with masked-off values restored (kept-values mode), else the whole
        weight (under FSDP an all-gather: call it on every rank)."""
        param = self.params[self._check_name(name)]
        return sharding.full(sharding.placed(self._local_dense(name), param))

    def _local_dense(self, name: str) -> torch.Tensor:
        """This rank's shard of :meth:`dense_value`."""
        weight = sharding.local(self.params[name]).detach()
        if self._shadow is None:
            return weight
        return torch.where(self._masks[name].bool(), weight, self._shadow[name])

    # ------------------------------------------------------------- enforcement
    def apply_masks(self, skip: Iterable[str] = ()) -> None:
        """Multiply every sparse weight by its mask (except ``skip``: known to be masked)."""
        names = [n for n in self._enforced if n not in skip]
        if names:
            with torch.no_grad():
                torch._foreach_mul_(
                    [sharding.local(self.params[n]) for n in names],
                    [self._masks[n] for n in names],
                )

    def mask_gradients(self) -> None:
        """Multiply every existing gradient of a sparse weight by its mask.

        Gradients are already masked as backward produces them; call this after writing to a
        ``.grad`` by hand. Gradients the sparse kernels report as already masked
        (``kernels.masked_grads()``) are skipped.
        """
        premasked = self.kernels.masked_grads() if self.kernels is not None else set()
        grads, masks = [], []
        for name in self._enforced:
            grad = self.params[name].grad
            if grad is not None and name not in premasked:
                grads.append(sharding.local(grad))
                masks.append(self._masks[name])
        if grads:
            torch._foreach_mul_(grads, masks)

    def dense_grad(self, name: str) -> torch.Tensor | None:
        """The unmasked gradient of ``name`` for the optimizer step in progress.

        Kept only on steps whose method asked for it (``method.needs_dense_grad(t)``) and only
        while the method's :meth:`~sparsetrain.methods.base.Method.before_step` runs: the sum over
        the step's backward passes, averaged over ranks under torch.distributed, before clipping
        or unscaling; the whole tensor under FSDP (an all-gather: call it on every rank). None
        when the weight received no gradient.
        """
        return self.gradients.dense_grad(self._check_name(name))

    def is_enforced(self, name: str) -> bool:
        """Whether ``name``'s mask has zeros (full masks are skipped everywhere)."""
        return self._density[name] < 1.0

    def enforced_names(self) -> list[str]:
        """The parameters whose masks have zeros."""
        return self._enforced

    def float_mask(self, name: str) -> torch.Tensor:
        """The mask as the 0/1 tensor of the weight's dtype that enforcement multiplies by (do not
        modify it): this rank's shard under FSDP, like ``sharding.local`` of the weight."""
        return self._masks[name]

    def reset_optimizer_state(self, names: Iterable[str] | None = None) -> None:
        """Zero every weight-shaped optimizer state tensor (momentum, Adam moments) of ``names``.

        Works from ``optimizer.state`` directly, so parameters whose ``.grad`` is None after
        ``zero_grad()`` are reset too.
        """
        for name in self.params if names is None else names:
            for state in self._state_tensors(self.params[self._check_name(name)]):
                state.zero_()

    def _state_tensors(self, param: nn.Parameter) -> list[torch.Tensor]:
        """The weight-shaped optimizer state of ``param``, as local shards under FSDP."""
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(param, {})
        return [
            sharding.local(t)
            for t in state.values()
            if isinstance(t, torch.Tensor) and t.shape == param.shape
        ]

    # ------------------------------------------------------------------- hooks
    def attach(self, optimizer: Any) -> None:
        """Enforce masks on gradients (per-weight hooks) and around ``optimizer.step()``.

        A wrapper with an ``optimizer`` attribute (Accelerate's ``AcceleratedOptimizer``,
        Lightning's ``LightningOptimizer``) is unwrapped to the optimizer that really steps. An
        optimizer or weight that another live sparsifier already guards is refused.
        """
        optimizer = unwrap_optimizer(optimizer)
        self.detach()
        claim(self, optimizer, self.params.values())
        self.optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        self.gradients.attach()
        self.drift.settle()

    def detach(self) -> None:
        """Remove the optimizer and gradient hooks (masks stay as they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.gradients.detach()
        release(self)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.gradients.before_step()
        masks = dict(self._masks)
        skip = self.method is not None and self.method.before_step(self, self.step + 1)
        self.gradients.after_method()
        # A mask replaced by the method's update applies to this step's gradient at once.
        changed = [n for n in self._enforced if self._masks[n] is not masks[n]]
        grads = [(self.params[n].grad, self._masks[n]) for n in changed]
        grads = [(sharding.local(g), m) for g, m in grads if g is not None]
        if grads:
            torch._foreach_mul_([g for g, _ in grads], [m for _, m in grads])
        if skip:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        elif self.kernels is not None:
            self.kernels.before_step(optimizer, args, kwargs)
        if self._step_kept:  # the step sees the whole weight, kept values included
            with torch.no_grad():
                for n in self._enforced:
                    sharding.local(self.params[n]).copy_(self._local_dense(n))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.inputs is not None:
            self._release_capture()
        if self._step_kept:
            with torch.no_grad():
                for n in self._enforced:
                    self._shadow[n].copy_(sharding.local(self.params[n]))
        self.apply_masks(skip=self.kernels.after_step() if self.kernels is not None else ())
        self.step += 1
        self.backward_passes += max(1, self.gradients.take_backward_count())
        for name, density in self._density.items():
            self._density_sum[name] += density
        if self.method is not None:
            self.method.after_step(self, self.step)
        self.drift.settle()

    @torch.compiler.disable
    def _record_inputs(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Remember one example's inputs (for FLOPs) and the batch size (first forward only)."""
        self.inputs = ExampleInput.capture(args, kwargs)
        if self.inputs is not None:
            self.batch_size = self.inputs.batch_size

    def _release_capture(self) -> None:
        """Drop the input-capture hook once it has done its work (outside any forward: a hook
        removed inside a compiled forward breaks its graph for good)."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _refresh(self) -> None:
        self._enforced = [n for n, d in self._density.items() if d < 1.0]

    def _check_name(self, name: str) -> str:
        if name not in self.params:
            raise ConfigError(
                f"{name!r} is not a sparse parameter; sparse parameters: {', '.join(self.params)}"
            )
        return name

    # ------------------------------------------------------------ reporting
    @property
    def examples_per_step(self) -> int | None:
        """Examples one optimizer step took: the batch size times the backward passes per step
        (gradient accumulation), from the first forward's batch size."""
        if self.batch_size is None:
            return None
        if self.step == 0:
            return self.batch_size
        return round(self.batch_size * self.backward_passes / self.step)

    def mean_density_steps(self) -> dict[str, float]:
        """Sum over completed steps of each layer's density (for training FLOPs)."""
        return dict(self._density_sum)

    def report(self, example_input: torch.Tensor | None = None):  # noqa: ANN201 - see sparsetrain.report
        """Per-layer target vs actual sparsity (masks and weights), and FLOPs when the inputs of a
        forward are known (the first training forward's, or ``example_input``)."""
        from sparsetrain.report.summary import summarize

        inputs = self.inputs if example_input is None else ExampleInput((example_input,), {})
        return summarize(self, inputs)

    # ---------------------------------------------------------- export/state
    def use_subnet(self, index: int | float) -> None:
        """Switch the active nested sub-network (methods with sub-networks only)."""
        if self.method is None or not hasattr(self.method, "use_subnet"):
            raise ConfigError(
                f"method {getattr(self.method, 'name', None)!r} has no sub-networks to switch"
            )
        self.method.use_subnet(self, index)

    def export(self, **options: Any) -> nn.Module:
        """A plain copy of the model with masks baked in: no hooks, no extra buffers or keys."""
        if self.method is not None:
            return self.method.export(self, **options)
        if options:
            raise ConfigError(f"unknown export option(s): {', '.join(options)}")
        return self.baked_copy()

    def baked_copy(self) -> nn.Module:
        """Deep copy of the model with every sparse weight multiplied by its mask."""
        if sharding.any_sharded(self.params.values()):
            raise ConfigError(
                "the model's weights are sharded (FSDP): a copy of one rank's shards is no model; "
                "gather a plain state dict with sp.full_state_dict() (on every rank) and load it "
                "into an unsharded model"
            )
        capturing = self._capture is not None
        self._release_capture()  # a plain copy: no hook of ours
        model = copy.deepcopy(self.model)
        if capturing and self.inputs is None:
            self._capture = self.model.register_forward_pre_hook(
                _InputCapture(self), with_kwargs=True
            )
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, mask in self._masks.items():
                params[name].mul_(mask)
        return model

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict as whole plain tensors with masks baked in: loads into the
        unsharded model with ``strict=True`` (under FSDP an all-gather: call it on every rank)."""
        out = {}
        for key, value in self.model.state_dict().items():
            value = sharding.full(value).detach().clone()
            if key in self._masks:
                value.mul_(self.mask(key))
            out[key] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: masks, targets, counters, method state.

        Masks and kept values are placed like their weights (DTensors under FSDP, for
        ``torch.distributed.checkpoint``)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "method": getattr(self.method, "name", None),
            "masks": self.masks,
            "targets": dict(self.targets),
            "density_sum": dict(self._density_sum),
            "backward_passes": self.backward_passes,
            "shadow": None
            if self._shadow is None
            else {n: sharding.placed(t.clone(), self.params[n]) for n, t in self._shadow.items()},
            "method_state": self.method.state_dict() if self.method is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and counters; the weights themselves come from the model's state_dict."""
        if state.get("version", 0) > STATE_VERSION:
            raise CheckpointError(
                f"sparsifier state version {state['version']} is newer than supported {STATE_VERSION}"
            )
        method = getattr(self.method, "name", None)
        if state.get("method") != method:
            raise CheckpointError(
                f"sparsifier state is for method {state.get('method')!r}, this run uses {method!r}"
            )
        masks = state["masks"]
        if set(masks) != set(self.params):
            missing = sorted(set(self.params) - set(masks)) or sorted(set(masks) - set(self.params))
            raise CheckpointError(
                f"sparsifier state does not match the model's sparse parameters: {missing[:5]}"
            )
        for name, mask in masks.items():
            if mask.shape != self.params[name].shape:
                raise CheckpointError(
                    f"mask {name} has shape {tuple(mask.shape)}, weight has {tuple(self.params[name].shape)}"
                )
        self._shadow = (
            None
            if state.get("shadow") is None
            else {
                n: sharding.shard_of(t, self.params[n]).to(self.params[n].device).clone()
                for n, t in state["shadow"].items()
            }
        )
        with torch.no_grad():
            for name, mask in masks.items():
                weight = sharding.local(self.params[name])
                shard = sharding.shard_of(mask, self.params[name])
                self._masks[name] = shard.to(device=weight.device, dtype=weight.dtype)
                self._density[name] = sharding.count(mask) / max(1, mask.numel())
                weight.mul_(self._masks[name])
        self._refresh()
        self.drift.settle()
        for name in masks:
            for listener in self.mask_listeners:
                listener(name)
        self.step = int(state["step"])
        self.targets = dict(state["targets"])
        self._density_sum = dict(state.get("density_sum", dict.fromkeys(self.params, 0.0)))
        self.backward_passes = int(state.get("backward_passes", self.step))
        if self.method is not None:
            self.method.load_state_dict(state.get("method_state", {}))


class _InputCapture:
    """Forward pre-hook handing the first forward's inputs to its sparsifier.

    A copy or pickle of the model (an EMA copy made before the first step, ``torch.save(model)``)
    gets an inert hook instead of dragging the sparsifier along.
    """

    def __init__(self, sp: Sparsifier | None) -> None:
        self.sp = sp

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.sp is not None and self.sp.inputs is None:
            self.sp._record_inputs(args, kwargs)

    def __reduce__(self) -> tuple:
        return (_InputCapture, (None,))
