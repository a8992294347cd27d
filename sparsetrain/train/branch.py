"""A dense branch of a run: a model trained with every mask off over the run's last steps.

AC/DC's dense twin branches off the run at the end of its last dense phase and trains to the end
on the very batches and learning rates the sparse model saw there (resuming the run at that step,
mid-epoch if need be), so the two models differ only by the masks.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import sparsetrain as st
from sparsetrain.train.checkpoint import save_checkpoint, state_checkpoint
from sparsetrain.train.optim import build_optimizer, lr_factor
from sparsetrain.train.state import TrainState

if TYPE_CHECKING:
    from sparsetrain.train.context import TrainContext

__all__ = ["train_dense_branch"]


def train_dense_branch(
    ctx: TrainContext,
    model: nn.Module,
    optimizer_state: dict[str, Any] | None,
    step: int,
    name: str,
) -> tuple[tuple[float, float], Path]:
    """Train ``model`` densely from step ``step`` to the end of ``ctx``'s run; evaluate it and
    save it as ``<run_dir>/<name>.pt`` (its records go to metrics.jsonl with phase ``name``)."""
    config, data = ctx.config, ctx.data
    steps_per_epoch = len(data.train)
    total = config.train.epochs * steps_per_epoch
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    if optimizer_state is not None:  # a copy: load_state_dict adopts the given tensors
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    # last_epoch=step-1: construction steps once, so the first branch step uses the lr of `step`.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.lr_schedule, steps_per_epoch, total), last_epoch=step - 1
    )
    dense = dataclasses.replace(
        config.sparsity, method="dense", sparsity=0.0, distribution=None, options={}
    )
    sp = st.sparsify(
        model,
        optimizer,
        method="dense",
        sparsity=0.0,
        include=dense.include,
        exclude=dense.dense,
        dense_first=dense.dense_first,
        dense_last=dense.dense_last,
    )
    epoch, batch = divmod(step, steps_per_epoch)
    state = TrainState(model, optimizer, scheduler, sp, epoch=epoch, step=step)
    state.progress.batch = batch  # run_epochs finishes a started epoch from this batch
    ctx.run_epochs(state, config.train.epochs - epoch, phase=name)
    loss, acc = ctx.evaluate(model)
    branch_config = dataclasses.replace(config, sparsity=dense)
    metrics = {"test_loss": loss, "test_acc": acc, "branched_at_step": step}
    path = save_checkpoint(
        ctx.run_dir / f"{name}.pt", state_checkpoint(state, branch_config, data, metrics)
    )
    sp.detach()
    return (loss, acc), path
