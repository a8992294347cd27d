"""Gradients masked where autograd produces them; the dense gradient kept for methods that rank it.

Each sparse parameter gets a ``register_post_accumulate_grad_hook``: right after a backward pass
adds its gradient into ``.grad``, the hook multiplies ``.grad`` by the mask. So everything that
runs between ``backward()`` and ``optimizer.step()`` sees the masked gradient: clipping
(``clip_grad_norm_``), ``GradScaler``'s unscale and inf checks, gradient logging, and DDP's
all-reduce (whose own hooks run after these). Masking is idempotent, so gradient accumulation over
several backward passes needs nothing special.

On the steps where the method reads the gradient outside the mask (``method.needs_dense_grad(t)``
is True: RigL's grow steps, AST's regrowth), the hook first folds the incoming gradient into a
dense copy: the gradient as backward produced it, summed over accumulation micro-batches, before
clipping or unscaling (a per-layer ranking does not depend on those scalar factors). At the step,
under ``torch.distributed``, the copies are averaged over ranks, as DDP averages ``.grad``, so
every rank ranks the same reduced gradient and grows the same weights. Other steps keep nothing.
Under FSDP2 the hook sees the sharded gradient already reduced over ranks: it masks and copies the
local shard only, and the copy is not averaged again.

A gradient that did not come through the hook (assigned by hand, written by a sharding engine) is
masked in the optimizer's step pre-hook instead, so no gradient reaches the optimizer unmasked.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any

import torch

from sparsetrain import collectives, sharding
from sparsetrain.errors import SparsetrainError

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["GradientMasks"]


class GradientMasks:
    """The per-parameter gradient hooks of one :class:`~sparsetrain.masks.Sparsifier`."""

    def __init__(self, sp: Sparsifier) -> None:
        self.sp = sp
        self._handles: list[Any] = []
        # The .grad each hook last masked (weak: a gradient set to None must be freed).
        self._masked: dict[str, weakref.ref] = {}
        # Dense gradients of the coming step, with (the .grad they were folded from, its version
        # counter right after masking) to tell a continued accumulation from a fresh one.
        self._dense: dict[str, torch.Tensor] = {}
        self._marks: dict[str, tuple[weakref.ref, int]] = {}
        self._ready: dict[str, torch.Tensor] | None = None  # reduced, during the step pre-hook
        self._wants: tuple[int, bool] | None = None  # (step, method needs the dense gradient)
        self._counter: str | None = None  # the weight whose hook counts backward passes
        self._backwards = 0  # backward passes since the last step

    def attach(self) -> None:
        """Hook every sparse parameter that takes gradients."""
        self.detach()
        trainable = [n for n, p in self.sp.params.items() if p.requires_grad]
        self._counter = trainable[0] if trainable else None
        for name, param in self.sp.params.items():
            if param.requires_grad:
                hook = functools.partial(self._on_grad, name)
                self._handles.append(param.register_post_accumulate_grad_hook(hook))

    def detach(self) -> None:
        """Remove the hooks and forget any captured gradient."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._masked.clear()
        self._release()

    # ---------------------------------------------------------------- backward
    def wants_dense(self) -> bool:
        """Whether the coming optimizer step's method update reads dense gradients."""
        sp = self.sp
        t = sp.step + 1
        if self._wants is None or self._wants[0] != t:
            method = sp.method
            self._wants = (t, method is not None and bool(method.needs_dense_grad(t)))
        return self._wants[1]

    def _on_grad(self, name: str, param: torch.nn.Parameter) -> None:
        if param.grad is None:
            return
        sp = self.sp
        if name == self._counter:
            self._backwards += 1
        sp.drift.on_backward(name, param)
        grad = sharding.local(param.grad)
        dense = self.wants_dense()
        if dense:
            self._fold(name, grad)
        if sp.is_enforced(name) and not (sp.kernels is not None and sp.kernels.premasked(name, grad)):
            grad.mul_(sp.float_mask(name))
        self._masked[name] = weakref.ref(param.grad)
        if dense:
            self._marks[name] = (weakref.ref(grad), grad._version)

    def _fold(self, name: str, grad: torch.Tensor) -> None:
        """Add this backward's gradient to the dense copy (a fresh copy on a new accumulation).

        After the previous fold ``.grad`` was ``D * mask`` for the dense sum ``D``; autograd has
        added ``g`` since, so ``D + g`` is ``.grad`` on the mask and ``D + .grad`` off it (the same
        additions autograd would have made, so the sum is bit-identical to a dense accumulation).
        Any other write to ``.grad`` in between (``zero_grad``, a new tensor) starts afresh.
        """
        mark = self._marks.get(name)
        previous = self._dense.get(name)
        continued = (
            previous is not None
            and mark is not None
            and mark[0]() is grad
            and grad._version == mark[1] + 1
        )
        if continued:
            mask = self.sp.float_mask(name).bool()
            self._dense[name] = torch.where(mask, grad, previous.add_(grad))
        else:
            self._dense[name] = grad.detach().clone()

    # -------------------------------------------------------------------- step
    def before_step(self) -> None:
        """Reduce this step's dense gradients; mask the gradients that bypassed the hooks."""
        sp = self.sp
        if self.wants_dense():
            self._ready = self._reduced()
        unhooked, masks = [], []
        for name in sp.enforced_names():
            grad = sp.params[name].grad
            seen = self._masked.get(name)
            if grad is not None and (seen is None or seen() is not grad):
                unhooked.append(sharding.local(grad))
                masks.append(sp.float_mask(name))
        if unhooked:
            torch._foreach_mul_(unhooked, masks)
        self._masked.clear()

    def _reduced(self) -> dict[str, torch.Tensor]:
        """This step's dense gradients, averaged over ranks; a tensor per weight with a gradient
        (the local shard of a sharded weight, which FSDP has reduced already).

        A copy is used while its weight has a gradient (DDP may have swapped ``.grad`` for a view
        of its bucket since); a gradient that came in without the hook is still unmasked here.
        """
        sp = self.sp
        out = {}
        for name, param in sp.params.items():
            if param.grad is None:
                continue
            dense = self._dense.get(name)
            out[name] = dense if dense is not None else sharding.local(param.grad).detach().clone()
        if collectives.world_size() > 1:
            # Every rank must send the same list: a weight without gradient here sends zeros.
            replicated = {
                n: out.get(n, torch.zeros_like(p))
                for n, p in sp.params.items()
                if p.requires_grad and not sharding.is_sharded(p)
            }
            collectives.all_reduce_mean_(list(replicated.values()))
            out.update(replicated)
        self._dense.clear()
        self._marks.clear()
        return out

    def dense_grad(self, name: str) -> torch.Tensor | None:
        """The dense gradient of ``name`` for the step in progress (None: the weight got none)."""
        if self._ready is None:
            raise SparsetrainError(
                f"the dense gradient of step {self.sp.step + 1} was not kept: it exists only "
                "inside the step of a method whose needs_dense_grad(t) is True for that step"
            )
        grad = self._ready.get(name)
        return None if grad is None else sharding.full(sharding.placed(grad, self.sp.params[name]))

    def take_backward_count(self) -> int:
        """Backward passes seen since the last call (one per micro-batch of the step)."""
        count, self._backwards = self._backwards, 0
        return count

    def after_method(self) -> None:
        """Free this step's dense gradients (the method has used them)."""
        self._release()

    def _release(self) -> None:
        self._dense.clear()
        self._marks.clear()
        self._ready = None
