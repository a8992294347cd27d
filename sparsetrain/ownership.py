"""Which sparsifier guards which optimizer and weights, and the optimizer under a wrapper.

Two sparsifiers on one optimizer (or one weight) would stack their masks and schedules silently;
a second one is refused until the first is detached. Entries hold weak references only, so a
sparsifier, optimizer or weight that is gone frees its claims.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

from sparsetrain.errors import ConfigError

__all__ = ["claim", "release", "unwrap_optimizer"]

# id(object) -> (the object, the sparsifier guarding it), both weak.
_CLAIMS: dict[int, tuple[weakref.ref, weakref.ref]] = {}

_WRAPPED = ("optimizer", "_optimizer")  # Accelerate, Lightning and most wrappers use these


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that really steps, under any wrappers around it."""
    current = optimizer
    for _ in range(8):
        inner = next(
            (getattr(current, a) for a in _WRAPPED if getattr(current, a, None) is not None), None
        )
        if inner is None or inner is current:
            break
        current = inner
    if not isinstance(current, torch.optim.Optimizer) or not hasattr(
        current, "_optimizer_step_pre_hooks"
    ):
        raise ConfigError(
            f"{type(optimizer).__name__} is not a torch.optim.Optimizer and wraps none "
            "(no .optimizer attribute): pass the optimizer whose step() updates the weights"
        )
    return current


def _owner(obj: object) -> Any:
    entry = _CLAIMS.get(id(obj))
    if entry is None or entry[0]() is not obj:
        return None
    return entry[1]()


def claim(sp: object, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Record ``sp`` as the guard of ``optimizer`` and ``params``; refuse if another holds one."""
    for key in [k for k, (obj, owner) in _CLAIMS.items() if obj() is None or owner() is None]:
        del _CLAIMS[key]
    params = list(params)
    for obj, what in [(optimizer, "this optimizer"), *((p, "a weight") for p in params)]:
        owner = _owner(obj)
        if owner is not None and owner is not sp:
            raise ConfigError(
                f"{what} is already guarded by another Sparsifier (its masks and schedule would "
                "stack with this one's); call .detach() on the old one first"
            )
    for obj in [optimizer, *params]:
        _CLAIMS[id(obj)] = (weakref.ref(obj), weakref.ref(sp))


def release(sp: object) -> None:
    """Drop every claim of ``sp``."""
    for key in [k for k, (_, owner) in _CLAIMS.items() if owner() is sp]:
        del _CLAIMS[key]
