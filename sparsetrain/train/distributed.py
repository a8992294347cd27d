"""Multi-process training under ``torchrun``: DDP around the model, and checks that ranks agree.

``torchrun --nproc-per-node N -m sparsetrain train CONFIG`` starts N processes;
:func:`~sparsetrain.collectives.init_distributed` joins them. The model is wrapped in
DistributedDataParallel, so every rank holds the same weights after every step; the masks then
agree without communication, because every method decides them from those weights, from the
all-reduced gradients (DDP averages the masked gradients during ``backward()``; the dense
gradient a method ranks is averaged by the sparsifier at the step), or from generators seeded by
(seed, tensor name, step). :func:`check_same_masks` verifies that claim on demand
(``train.check_masks_every``). The collectives live in :mod:`sparsetrain.collectives` and are
re-exported here for the loop. Every helper is a no-op in a single process.
With ``train.strategy: fsdp`` the model is sharded instead (:mod:`sparsetrain.train.fsdp`).
See docs/distributed.md for multi-node runs and sharded training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from sparsetrain.collectives import (
    World,
    _control_group,
    all_gather_object,
    all_gather_tensors,
    all_sum,
    any_rank,
    barrier,
    broadcast_object,
    broadcast_tensors,
    init_distributed,
    is_distributed,
    launched,
    rank,
    tensor_digest,
)
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


def wrap_model(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel while a process group is up, else ``model`` itself.

    DDP keeps the same Parameter objects, so the Sparsifier's masks and optimizer hooks (set up on
    ``model``) apply unchanged; it broadcasts rank 0's weights and buffers at construction and
    BatchNorm buffers before every forward. A module that leaves some of its parameters unused
    in a step says so with ``leaves_parameters_unused = True`` (AST's switchable BatchNorm: only
    the active copy is used), and DDP is told to look for unused parameters.
    """
    if not is_distributed() or isinstance(model, FSDPModule):  # FSDP2 reduces by itself
        return model
    device = next(model.parameters()).device
    unused = any(getattr(m, "leaves_parameters_unused", False) for m in model.modules())
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
