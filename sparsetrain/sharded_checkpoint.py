"""Checkpoints of sharded (FSDP2) sparse training with ``torch.distributed.checkpoint`` (DCP).

Each rank writes its own shards of the model, the optimizer state and every tensor of the
sparsifier's state placed as a DTensor (masks, kept values, AST's stacks of sub-network masks), so
no rank ever holds the whole model; DCP records every tensor's global shape, so a
checkpoint saved on N ranks loads on N ranks exactly and on any other number of ranks, or into a
plain unsharded model in one process (resharding). Model and optimizer go through
``torch.distributed.checkpoint.state_dict`` (keys are fully-qualified names, not positions).

The rest of the sparsifier's state (targets, counters, the method's schedules and thresholds, and
tensors it holds whole on every rank) is small and the same on every rank: it is stored once, as
one serialized object, beside the shards.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from sparsetrain import sharding
from sparsetrain.errors import CheckpointError
from sparsetrain.masks import Sparsifier

__all__ = ["load_sharded", "save_sharded"]

log = logging.getLogger(__name__)

_REST = "sparsetrain/rest"  # the serialized small state: the sparsifier's skeleton and ``extra``
_PLACED = "__placed__"  # marks where a placed tensor of the sparsifier's state was taken out
_PREFIX = "sparsifier/"


def _split(tree: Any, path: str, placed: dict[str, torch.Tensor]) -> Any:
    """``tree`` with each DTensor replaced by a marker naming it in ``placed``."""
    if isinstance(tree, DTensor):
        placed[path] = tree
        return {_PLACED: path}
    if isinstance(tree, Mapping):
        return {k: _split(v, f"{path}/{k}", placed) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_split(v, f"{path}/{i}", placed) for i, v in enumerate(tree))
    return tree


def _join(tree: Any, placed: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_split`."""
    if isinstance(tree, Mapping):
        if set(tree) == {_PLACED}:
            return placed[tree[_PLACED]]
        return {k: _join(v, placed) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_join(v, placed) for v in tree)
    return tree


def save_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sp: Sparsifier,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save model, optimizer and sparsifier into the directory ``path``; every rank calls it.

    ``extra``: any small picklable state of the caller's (lr scheduler, counters), the same on
    every rank; :func:`load_sharded` returns it.
    """
    path = Path(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    placed: dict[str, torch.Tensor] = {}
    skeleton = _split(sp.state_dict(), _PREFIX.rstrip("/"), placed)
    buffer = io.BytesIO()
    torch.save({"sparsifier": skeleton, "extra": dict(extra or {})}, buffer)
    state = {"model": model_state, "optimizer": optim_state, _REST: buffer.getvalue(), **placed}
    dcp.save(state, checkpoint_id=str(path))
    log.debug("saved sharded checkpoint %s (%d placed sparsifier tensors)", path, len(placed))
    return path


def load_sharded(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, sp: Sparsifier
) -> dict[str, Any]:
    """Restore what :func:`save_sharded` wrote into a freshly built ``model``, ``optimizer`` and
    ``sp`` (sharded on any number of ranks, or not at all); returns its ``extra``."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a sharded checkpoint (no DCP .metadata in it)")
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    rest: dict[str, Any] = {_REST: b""}
    dcp.load(rest, checkpoint_id=str(path))
    saved = torch.load(io.BytesIO(rest[_REST]), weights_only=False)
    # DCP loads into tensors shaped like the saved ones: the optimizer's state must exist. Its
    # initialising step (zero gradients, lr 0) is not a training step: the sparsifier sits it out.
    sp.detach()
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
    finally:
        sp.attach(optimizer)
    current: dict[str, torch.Tensor] = {}
    _split(sp.state_dict(), _PREFIX.rstrip("/"), current)
    targets = {}
    for key, meta in metadata.items():
        if not key.startswith(_PREFIX):
            continue
        like = current.get(key)
        if like is not None and tuple(like.shape) == tuple(meta.size):
            targets[key] = sharding.placed(torch.empty_like(sharding.local(like)), like)
        else:  # held whole from here on (e.g. loaded without sharding)
            targets[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    dcp.load({"model": model_state, "optimizer": optim_state, **targets}, checkpoint_id=str(path))
    sp.load_state_dict(_join(saved["sparsifier"], targets))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    sp.drift.settle()
    return saved["extra"]
