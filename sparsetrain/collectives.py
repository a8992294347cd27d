"""The process group and the collectives the engine, the methods and the loop share.

Every helper is a no-op (or the identity) in a single process, so callers need no branches. They
sit below the methods and the training loop: a method agrees with the other ranks (P-GaP's merge,
the dense gradient RigL ranks) without knowing how the loop launched them. ``torchrun --nproc-per-
node N`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init_distributed`
joins them (gloo on CPU, NCCL on CUDA with GPU LOCAL_RANK per process, plus a gloo group for
small CPU-side decisions).
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sparsetrain.errors import ConfigError

__all__ = [
    "World",
    "all_gather_object",
    "all_gather_tensors",
    "all_reduce_mean_",
    "all_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "init_distributed",
    "is_distributed",
    "launched",
    "rank",
    "tensor_digest",
    "world_size",
]

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_control: list[Any] = []  # [default group, gloo group for CPU-side decisions] when NCCL-only


@dataclass(frozen=True)
class World:
    """This process's rank, the number of processes, and the device this process computes on."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0


def is_distributed() -> bool:
    """True while a process group is up."""
    return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """True when started by ``torchrun`` with more than one process (or a group is already up)."""
    return is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def init_distributed(device: str | torch.device) -> World | None:
    """Join the ``torchrun`` process group; None when this is a single process.

    The group is created once per process and reused by later calls (a group the caller set up
    is used as it is): re-creating one under torchrun would reuse the rendezvous store's keys.
    It is destroyed when the process exits. On CUDA each process uses GPU LOCAL_RANK.
    """
    if not launched():
        return None
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not is_distributed():
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE is set but {', '.join(missing)} is not: start multi-process "
                "training with torchrun, or call torch.distributed.init_process_group first"
            )
        # gloo beside NCCL: small decisions (stop? finite?) travel as CPU tensors, no GPU sync
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        atexit.register(_shutdown)
    world = World(dist.get_rank(), dist.get_world_size(), device)
    log.debug("rank %d of %d on %s (%s)", world.rank, world.size, device, dist.get_backend())
    return world


def _shutdown() -> None:
    """At exit: DDP wrappers still alive (e.g. in the traceback of an interrupted run) must go
    before their process group, or their destructor aborts the process."""
    gc.collect()
    _control.clear()
    if is_distributed():
        dist.destroy_process_group()


def _control_group() -> Any:
    """A process group that takes CPU tensors: the default one unless it is NCCL only."""
    if "cpu:gloo" in dist.get_backend_config():
        return None
    default = dist.group.WORLD
    if not _control or _control[0] is not default:  # first use, or a new default group
        _control[:] = [default, dist.new_group(backend="gloo")]  # collective: every rank is here
    return _control[1]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (unchanged in a single process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: decisions that must be collective.

    Travels as a CPU tensor (through gloo), so it does not wait for queued GPU work.
    """
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([int(bool(flag))])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control_group())
    return bool(value.item())


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (picklable values)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=_control_group())
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in a single process."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_control_group())
    return values


def _by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by dtype: one flat buffer, so one collective, per dtype."""
    groups: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(index)
    return list(groups.values())


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts = flat.split([t.numel() for t in like])
    return [part.view_as(t) for part, t in zip(parts, like, strict=True)]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place on every rank with rank ``src``'s values (e.g. a whole
    ``state_dict``); one collective per dtype. No-op in a single process."""
    if not is_distributed():
        return
    for indices in _by_dtype(tensors):
        group = [tensors[i] for i in indices]
        flat = _flatten(group)
        dist.broadcast(flat, src)
        with torch.no_grad():
            for tensor, value in zip(group, _unflatten(flat, group), strict=True):
                tensor.copy_(value)


def all_gather_tensors(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every rank's copy of ``tensors``: ``result[r][i]`` is rank r's ``tensors[i]``; one
    collective per dtype. ``[tensors]`` in a single process."""
    if not is_distributed():
        return [list(tensors)]
    size = dist.get_world_size()
    out: list[list[torch.Tensor]] = [list(tensors) for _ in range(size)]
    for indices in _by_dtype(tensors):
        group = [tensors[i] for i in indices]
        flat = _flatten(group)
        copies = [torch.empty_like(flat) for _ in range(size)]
        dist.all_gather(copies, flat)
        for r, copy in enumerate(copies):
            for i, value in zip(indices, _unflatten(copy, group), strict=True):
                out[r][i] = value
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier(group=_control_group())


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: equal only for bit-identical tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def world_size() -> int:
    """Processes in the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` over every rank in place, in one flat message per dtype."""
    world = world_size()
    if world == 1 or not tensors:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
