"""``train.strategy: fsdp``: the model sharded with FSDP2 under ``torchrun``, and its checkpoints.

``fully_shard`` goes on every block of the model (each element of a top-level ModuleList or
Sequential, else each top-level child that has parameters) and then on the model itself, before
the optimizer and :func:`sparsetrain.sparsify` see the parameters: they are the sharded DTensors,
and the masks are sharded with them (see :mod:`sparsetrain.sharding`). Buffers (BatchNorm
statistics) are not sharded: as DDP does, rank 0's are broadcast before every training forward,
so the ranks differ only by their own last update and a checkpoint of rank 0's resumes exactly.
In a single process the model stays as it is.

Checkpoints keep the run's usual files and their header, with one difference:

* rotating checkpoints (``checkpoints/step-<step>.pt``, the ones a resume reads) leave out model,
  optimizer and sparsifier; each rank writes its shards of those with
  ``torch.distributed.checkpoint`` into ``step-<step>.pt.shards/`` beside the file, and rank 0
  writes the file only once every shard is written. A resume reads the shards on any number of
  processes (DCP reshards);
* result files (``final.pt``, a branch's) hold the whole tensors, gathered, so ``sparsetrain
  eval | report | export`` read them in one process as any other run's.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetrain import sharding
from sparsetrain.train import distributed

__all__ = [
    "SHARDS_SUFFIX",
    "ShardedParts",
    "gather",
    "is_sharded",
    "load_parts",
    "remove_checkpoint",
    "save_parts",
    "shard_model",
    "shards_of",
    "training_parts",
]

log = logging.getLogger(__name__)

SHARDS_SUFFIX = ".shards"  # step-<step>.pt.shards/: the DCP directory of a rotating checkpoint
_PARTS = ("model", "optimizer", "sparsifier")  # what the shards hold


def shard_model(
    model: nn.Module, strategy: str, prepare: Callable[[nn.Module], None] | None = None
) -> nn.Module:
    """``model`` with ``fully_shard`` on each block and on itself (``strategy == "fsdp"`` under a
    process group), else ``model`` unchanged. ``prepare`` changes the plain model first (the
    method's own layers, which FSDP2 cannot add once the model is sharded)."""
    if strategy != "fsdp" or not distributed.is_distributed():
        return model
    from torch.distributed.fsdp import fully_shard

    if prepare is not None:
        prepare(model)

    blocks = []
    for child in model.children():
        parts = list(child) if isinstance(child, nn.ModuleList | nn.Sequential) else [child]
        blocks += [b for b in parts if any(True for _ in b.parameters())]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    model.register_forward_pre_hook(_broadcast_buffers)
    log.info(
        "FSDP: %d blocks and the model sharded over %d processes",
        *(len(blocks), torch.distributed.get_world_size()),
    )
    return model


def _broadcast_buffers(module: nn.Module, args: Any) -> None:
    """Rank 0's buffers on every rank before a training forward (DDP's ``broadcast_buffers``)."""
    if module.training:
        distributed.sync_buffers(module)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is sharded."""
    return sharding.any_sharded(model.parameters())


class ShardedParts:
    """Model, optimizer and sparsifier of a sharded run, to be saved by :func:`save_parts`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Any) -> None:
        self.model, self.optimizer, self.sparsifier = model, optimizer, sparsifier


def sharded_config_problem(kernels: str, options: Mapping[str, Any]) -> str | None:
    """Why a run with these ``sparsity.kernels`` and method ``options`` cannot train sharded."""
    if kernels != "dense":
        return (
            f"sparsity.kernels={kernels} needs whole weights on each rank; "
            "train.strategy=fsdp shards them: use sparsity.kernels=dense or train.strategy=ddp"
        )
    if options.get("parallel"):
        return (
            "P-GaP (sparsity.options.parallel=true) trains one whole model copy per process and "
            "cannot run sharded: use train.strategy=ddp, or C-GaP (parallel=false)"
        )
    return None


def shards_of(path: Path) -> Path:
    """The DCP directory beside the checkpoint file ``path``."""
    return path.with_name(path.name + SHARDS_SUFFIX)


def gather(tree: Any) -> Any:
    """``tree`` with every sharded tensor replaced by the whole one (every rank calls it)."""
    if sharding.is_sharded(tree):
        return sharding.full(tree)
    if isinstance(tree, Mapping):
        return {k: gather(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(gather(v) for v in tree)
    return tree


def save_parts(path: Path, checkpoint: dict[str, Any], resumable: bool) -> dict[str, Any]:
    """The checkpoint rank 0 writes to ``path``: a resumable one's shards saved beside it (every
    rank calls this), a result's gathered whole; unchanged when nothing is sharded."""
    parts = checkpoint.get("shards")
    if not isinstance(parts, ShardedParts):
        return checkpoint
    from sparsetrain.sharded_checkpoint import save_sharded

    out = dict(checkpoint)
    if resumable:
        distributed.sync_buffers(parts.model)  # rank 0's, which the next forward broadcasts
        save_sharded(shards_of(path), parts.model, parts.optimizer, parts.sparsifier)
        distributed.barrier()  # every shard is on disk before the file that names them
        out["shards"] = shards_of(path).name
    else:
        out.update(
            model=gather(parts.model.state_dict()),
            optimizer=gather(parts.optimizer.state_dict()),
            sparsifier=gather(parts.sparsifier.state_dict()),
            shards=None,
        )
    return out


def load_parts(state: Any, checkpoint: Mapping[str, Any], path: Path) -> None:
    """Load model, optimizer and sparsifier from the shards a checkpoint file names."""
    from sparsetrain.sharded_checkpoint import load_sharded

    load_sharded(
        path.with_name(checkpoint["shards"]), state.model, state.optimizer, state.sparsifier
    )


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file and its shards, if any."""
    path.unlink(missing_ok=True)
    shutil.rmtree(shards_of(path), ignore_errors=True)


def training_parts(state: Any) -> dict[str, Any]:
    """What :func:`~sparsetrain.train.checkpoint.state_checkpoint` stores of model, optimizer and
    sparsifier: their state dicts, or, when sharded, a :class:`ShardedParts` to save."""
    if not is_sharded(state.model):
        return {
            "model": state.model.state_dict(),
            "sparsifier": state.sparsifier.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "shards": None,
        }
    return {
        **dict.fromkeys(_PARTS),
        "shards": ShardedParts(state.model, state.optimizer, state.sparsifier),
    }
