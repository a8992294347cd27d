"""Sharded parameters (FSDP2's ``fully_shard``, DTensor weights): the few operations the engine
needs on them, in one place.

Under FSDP2 each rank holds one shard of every parameter, its gradient and its optimizer state, as
DTensors with a device mesh and placements. The sparsifier keeps each mask as the plain local
shard of the same placement (so enforcement multiplies local tensors: no communication, memory per
rank proportional to the shard) and shows it as a DTensor placed like its parameter.

Mask decisions (top-k within a tensor or over all of them, drop and grow, thresholds) are taken on
whole tensors: at a mask update, and only then, a method reads whole weights, masks and gradients
(:func:`full`, an all-gather), decides exactly as one unsharded process would, identically on every
rank, and hands back a whole mask, of which each rank keeps its own shard (:func:`shard_of`, no
communication). Plain tensors pass through every helper unchanged, so the engine needs no branches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from sparsetrain.errors import ConfigError

__all__ = [
    "any_sharded",
    "check_supported",
    "count",
    "full",
    "is_sharded",
    "local",
    "placed",
    "placed_stack",
    "shard_of",
]


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (an FSDP2 parameter, its gradient or optimizer state)."""
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard as a plain tensor sharing storage (the tensor itself when not sharded).

    Without autograd ``to_local`` returns the DTensor's own local tensor, the same object on every
    call, so in-place changes and version counters act on the real shard.
    """
    if not isinstance(tensor, DTensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather: every rank must call it); plain tensors are
    returned as they are."""
    if not isinstance(tensor, DTensor):
        return tensor
    with torch.no_grad():
        return tensor.detach().full_tensor()


def shard_of(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``whole`` (the same on every rank), cut as ``like`` is; no collective.

    A DTensor ``whole`` is redistributed to ``like``'s placement instead.
    """
    if not isinstance(like, DTensor):
        return full(whole)
    if isinstance(whole, DTensor):
        return whole.redistribute(like.device_mesh, like.placements).to_local()
    with torch.no_grad():
        cut = distribute_tensor(
            whole.detach().to(like.device), like.device_mesh, like.placements, src_data_rank=None
        )
    return cut.to_local()


def placed(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``shard`` shown as a DTensor placed like ``like`` (no collective), or as it is."""
    if not isinstance(like, DTensor):
        return shard
    return DTensor.from_local(
        shard,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def placed_stack(shards: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``shards``, K of this rank's shards each cut as ``like`` and stacked on a new first dim,
    shown as a DTensor of the whole ``(K, *like.shape)`` stack (no collective; a copy), or as it is.

    DTensor's own rule for ``torch.stack`` places the stack (``Shard(d)`` of each row becomes
    ``Shard(d + 1)``), so :func:`full` and :func:`shard_of` work on it as on any placed tensor.
    """
    if not isinstance(like, DTensor):
        return shards
    return torch.stack([placed(row, like) for row in shards.unbind(0)])


def count(mask: torch.Tensor) -> int:
    """Nonzeros of the whole tensor (a DTensor's: a sum over its mesh, every rank must call it)."""
    if isinstance(mask, DTensor):
        return int(mask.to(torch.int64).sum().full_tensor())
    return int(torch.count_nonzero(mask))


def check_supported(
    params: Mapping[str, torch.Tensor], method: str, options: Mapping[str, Any], kernels: str
) -> None:
    """Refuse, naming the reason, what does not run on sharded weights."""
    sharded = [name for name, p in params.items() if is_sharded(p)]
    if not sharded:
        return
    if kernels != "dense":
        raise ConfigError(
            f"kernels={kernels!r} needs whole weights on each rank, but {sharded[0]} is sharded "
            "(FSDP): use kernels='dense' with fully_shard, or DDP for sparse kernels"
        )
    if method == "gap" and options.get("parallel"):
        raise ConfigError(
            "P-GaP (gap with parallel=True) trains one whole model copy per process and merges "
            "them, which sharded weights (FSDP) cannot do: use C-GaP (parallel=False) or DDP"
        )


def any_sharded(tensors: Iterable[Any]) -> bool:
    """Whether any of ``tensors`` is sharded."""
    return any(isinstance(t, DTensor) for t in tensors)
