"""Multi-process training under ``torchrun``: the process group, DDP, and checks that ranks agree.

``torchrun --nproc-per-node N -m sparsetrain train CONFIG`` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; :func:`init_distributed` joins them (gloo on
CPU, NCCL on CUDA with GPU LOCAL_RANK per process). The model is wrapped in
DistributedDataParallel, so every rank holds the same weights after every step; the masks then
agree without communication, because every method decides them from those weights, from the
all-reduced gradients (DDP averages them during ``backward()``, before the optimizer's step
pre-hook runs the method), or from generators seeded by (seed, tensor name, step).
:func:`check_same_masks` verifies that claim on demand (``train.check_masks_every``).

The helpers below are no-ops in a single process, so the training loop calls them unconditionally.
See docs/distributed.md for multi-node runs and what sharded training (FSDP) would need.
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparsetrain.errors import ConfigError, SparsetrainError

__all__ = [
    "CHECK_MASKS_ENV",
    "World",
    "all_gather_object",
    "all_gather_tensors",
    "all_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "check_same_masks",
    "init_distributed",
    "is_distributed",
    "launched",
    "mask_check_interval",
    "rank",
    "sync_buffers",
    "tensor_digest",
    "wrap_model",
]

log = logging.getLogger(__name__)

CHECK_MASKS_ENV = "SPARSETRAIN_CHECK_MASKS"  # steps between mask checks; overrides the config
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


def wrap_model(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel while a process group is up, else ``model`` itself.

    DDP keeps the same Parameter objects, so the Sparsifier's masks and optimizer hooks (set up on
    ``model``) apply unchanged; it broadcasts rank 0's weights and buffers at construction and
    BatchNorm buffers before every forward. Models with switchable BatchNorm (AST) leave the
    inactive copies unused in a step, which DDP must be told about.
    """
    if not is_distributed():
        return model
    from sparsetrain.switchable_bn import SwitchableBatchNorm

    device = next(model.parameters()).device
    unused = any(isinstance(m, SwitchableBatchNorm) for m in model.modules())
    return DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=unused,
    )


def sync_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each forward, so each rank's last forward leaves its own
    statistics behind; syncing at epoch ends makes every rank evaluate and hold the same model.
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


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


def check_same_masks(masks: Mapping[str, torch.Tensor], step: int) -> str:
    """Raise unless every rank holds bit-identical ``masks``; returns their digest.

    One all-gather of a 64-character digest per call: cheap enough for a debug check every few
    hundred steps, and always run once at the end of distributed training.
    """
    digest = tensor_digest(masks)
    if not is_distributed():
        return digest
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest, group=_control_group())
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise SparsetrainError(
            f"masks differ across ranks after step {step}: ranks {differing} disagree with rank "
            "0; a method's mask decision is not a function of the shared state (weights, "
            "all-reduced gradients, seeded generators)"
        )
    return digest


def mask_check_interval(configured: int) -> int:
    """Steps between cross-rank mask checks: ``$SPARSETRAIN_CHECK_MASKS`` if set, else the config."""
    text = os.environ.get(CHECK_MASKS_ENV)
    if text is None or not text.strip():
        return configured
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{CHECK_MASKS_ENV} must be a number of steps, got {text!r}") from None
    if value < 0:
        raise ConfigError(f"{CHECK_MASKS_ENV} must be >= 0, got {value}")
    return value
