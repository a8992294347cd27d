"""The epochs of ``sparsetrain train``: one pass over the training batches, evaluation, and the
per-epoch records written to ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sparsetrain import tasks
from sparsetrain.progress import progress as progress_bar
from sparsetrain.train import distributed
from sparsetrain.train.guard import NonFiniteLoss
from sparsetrain.train.state import Data, TrainState

if TYPE_CHECKING:
    from sparsetrain.train.steplog import StepLog

__all__ = ["StepHook", "append_metrics", "evaluate", "run_epochs", "train_epoch"]

log = logging.getLogger(__name__)

StepHook = Callable[[TrainState], None]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward_model(state: TrainState) -> nn.Module:
    """The module the loop calls: under ``torchrun``, DDP around ``state.model`` (made once)."""
    if state.forward is None:
        state.forward = distributed.wrap_model(state.model)
    return state.forward


def train_epoch(
    state: TrainState,
    loader: Iterable,
    log_every: int = 0,
    on_step: StepHook | None = None,
    skip_nonfinite: bool = False,
    task: str = tasks.CLASSIFICATION,
    steps: StepLog | None = None,
    phase: str | None = None,
) -> tuple[float, float]:
    """One pass over ``loader`` (the rest of the epoch after a mid-epoch resume); returns the
    epoch's mean train loss and accuracy over every process.

    ``on_step(state)`` runs at every step boundary (checkpoints, signals). With
    ``skip_nonfinite`` a batch whose loss is inf or nan (on any process) updates nothing.
    ``task`` (the dataset's) adds its derived metrics to the progress bar; ``steps`` records
    the steps it is due for (tagged with ``phase``, which also names the progress bar).
    """
    model, device = _forward_model(state), _device_of(state.model)
    model.train()
    progress = state.progress
    progress.to(device)  # sums saved in a checkpoint come back on the CPU
    bar = progress_bar(
        loader,
        f"{phase.replace('_', ' ') + ' ' if phase else ''}epoch {state.epoch + 1}",
        hidden=bool(distributed.rank()),
        initial=progress.batch,
    )
    batches = len(loader)  # a whole epoch's, wherever this pass starts
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = tasks.loss(logits, y)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        progress.batch += 1
        if skip_nonfinite and distributed.any_rank(not bool(torch.isfinite(loss))):
            state.optimizer.zero_grad(set_to_none=True)
            progress.skipped += 1
            log.warning(
                "batch %d of epoch %d: non-finite loss, update skipped (%d so far this epoch)",
                *(progress.batch, state.epoch + 1, progress.skipped),
            )
        else:
            lr = state.optimizer.param_groups[0]["lr"]
            state.optimizer.step()  # the sparsifier's hooks mask grads, weights, optimizer state
            state.scheduler.step()
            state.step += 1
            progress.add(loss, logits, y)
            if steps is not None:
                steps.after_step(state, loss, lr, phase, epoch_end=progress.batch == batches)
            if log_every and state.step % log_every == 0:
                value = loss.item()
                derived = {k: f"{v:.3f}" for k, v in tasks.derived_metrics(task, value).items()}
                bar.set_postfix(loss=f"{value:.4f}", **derived)
                log.debug("step %d  loss %.4f", state.step, value)
        if on_step is not None:
            on_step(state)
    epoch = state.epoch + 1
    mean_loss, accuracy = progress.finish(device)
    distributed.sync_buffers(state.model)  # every rank evaluates and saves the same statistics
    if not np.isfinite(mean_loss):
        raise NonFiniteLoss(
            f"training diverged in epoch {epoch}: mean loss is {mean_loss}; "
            "lower optimizer.lr or add lr_schedule.warmup_epochs"
        )
    return mean_loss, accuracy


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (eval mode, no grad), per
    prediction: per example, or per token for a language model."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        total_loss += tasks.loss(logits, y, reduction="sum").item()
        correct += tasks.correct(logits, y).item()
        seen += y.numel()
    model.train(was_training)
    return total_loss / max(1, seen), correct / max(1, seen)


def append_metrics(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def run_epochs(
    state: TrainState,
    data: Data,
    epochs: int,
    *,
    eval_every: int = 1,
    log_every: int = 0,
    metrics_path: Path | None = None,
    phase: str | None = None,
    on_step: StepHook | None = None,
    on_epoch: Callable[[TrainState, dict[str, Any]], None] | None = None,
    skip_nonfinite: bool = False,
    steps: StepLog | None = None,
) -> list[dict[str, Any]]:
    """Train ``epochs`` more epochs from ``state``, evaluating every ``eval_every`` and at the end.

    Each epoch's record is returned and, with ``metrics_path``, appended to it as a JSON line;
    ``phase`` (e.g. "dense_finetune") tags records of extra training after the main run. An epoch
    that ``state`` is in the middle of counts as one and is finished. ``on_step(state)`` runs
    after every batch, ``on_epoch(state, record)`` after every record. ``steps`` records the
    steps between epochs (``steps.jsonl``, TensorBoard) and gets every epoch's record.
    """
    if steps is not None:
        steps.start(state, phase)
    records = []
    last = state.epoch + epochs
    task = data.info.task
    for _ in range(epochs):
        start = time.perf_counter()
        data.start_epoch(state.epoch, state.progress.batch)
        train_loss, train_acc = train_epoch(
            state,
            data.train,
            log_every,
            on_step=on_step,
            skip_nonfinite=skip_nonfinite,
            task=task,
            steps=steps,
            phase=phase,
        )
        state.epoch += 1
        test_loss = test_acc = None
        if state.epoch % eval_every == 0 or state.epoch == last:
            test_loss, test_acc = evaluate(state.model, data.test)
        state.elapsed += time.perf_counter() - start
        record = {
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            **tasks.derived_metrics(task, train_loss, prefix="train_"),
            **tasks.derived_metrics(task, test_loss, prefix="test_"),
            "lr": state.optimizer.param_groups[0]["lr"],
            "sparsity": state.sparsifier.sparsity,
            "time": round(state.elapsed, 3),
            **({"phase": phase} if phase else {}),
        }
        append_metrics(metrics_path, record)
        if steps is not None:
            steps.epoch(record)
        records.append(record)
        tested = "" if test_acc is None else f"  test {tasks.describe(task, test_loss, test_acc)}"
        log.info(
            "%sepoch %d/%d  train %s%s  sparsity %.2f%%  (%.0fs)",
            f"[{phase}] " if phase else "",
            *(state.epoch, last, tasks.describe(task, train_loss, train_acc), tested),
            *(100 * record["sparsity"], state.elapsed),
        )
        if on_epoch is not None:
            on_epoch(state, record)
    return records
