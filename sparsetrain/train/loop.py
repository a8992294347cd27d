"""The training loop behind ``sparsetrain train``, readable top to bottom.

``train(config)`` seeds everything, loads the data into memory, builds the model, optimizer and
per-step lr schedule, makes the model sparse with :func:`sparsetrain.sparsify` (two lines, as in a
user's own loop), trains and evaluates epoch by epoch, then writes the run directory::

    config.yaml     the resolved config (every default filled in)
    metrics.jsonl   one JSON record per epoch: epoch, step, train/test loss and accuracy, lr, ...
    final.pt        checkpoint (see sparsetrain.train.checkpoint)
    report.txt/json per-layer sparsity, inference and training FLOPs
    curves.png, layer_sparsity.png

Methods that produce more than one model hook in after the main training through
``after_training`` (see :class:`TrainContext`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import sparsetrain as st
from sparsetrain.data import DatasetInfo, dataset_info, load_dataset
from sparsetrain.errors import SparsetrainError
from sparsetrain.models import build_model
from sparsetrain.report import plot_layer_sparsity, plot_training_curves
from sparsetrain.report.summary import Report
from sparsetrain.train.checkpoint import save_checkpoint, state_checkpoint
from sparsetrain.train.config import Config, resolve, save_config
from sparsetrain.train.optim import build_optimizer, build_scheduler

__all__ = [
    "Data",
    "RunResult",
    "TrainContext",
    "TrainState",
    "append_metrics",
    "build_data",
    "build_model_for",
    "build_state",
    "evaluate",
    "make_loader",
    "run_epochs",
    "seed_everything",
    "state_checkpoint",
    "train",
    "train_epoch",
]

log = logging.getLogger(__name__)
EVAL_BATCH_SIZE = 1000


@dataclass
class Data:
    train: DataLoader
    test: DataLoader
    info: DatasetInfo
    generator: torch.Generator  # the shuffling order; checkpoints save its state


@dataclass
class TrainState:
    """Everything that changes while training; ``run_epochs`` advances it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sparsifier: st.Sparsifier
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    elapsed: float = 0.0  # seconds spent in run_epochs


@dataclass
class RunResult:
    run_dir: Path
    config: Config
    state: TrainState
    metrics: list[dict[str, Any]]
    test_loss: float
    test_acc: float
    report: Report
    checkpoint: Path
    plots: list[Path]
    extras: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_loader(
    dataset, batch_size: int, generator: torch.Generator | None, workers: int
) -> DataLoader:
    """Batches indexed in one go (``dataset[list]``): far faster than per-sample collation."""
    if generator is None:
        batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    else:  # training drops the last partial batch so every step sees batch_size examples
        drop = len(dataset) > batch_size
        batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop)
    return DataLoader(
        dataset, sampler=batches, batch_size=None, num_workers=workers, generator=generator
    )


def build_data(config: Config) -> Data:
    d, t = config.data, config.train
    train_set, info = load_dataset(d.name, "train", d.dir, **d.options)
    test_set, _ = load_dataset(d.name, "test", d.dir, **d.options)
    generator = torch.Generator().manual_seed(t.seed)
    return Data(
        train=make_loader(train_set, t.batch_size, generator, t.num_workers),
        test=make_loader(test_set, EVAL_BATCH_SIZE, None, t.num_workers),
        info=info,
        generator=generator,
    )


def build_model_for(config: Config, info: DatasetInfo | None = None) -> nn.Module:
    """The config's model, shaped for its dataset (``info`` read from the data config if None)."""
    info = info or dataset_info(config.data.name, **config.data.options)
    return build_model(
        config.model.name,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        image_size=info.image_size,
        width=config.model.width,
        **config.model.options,
    )


def build_state(config: Config, data: Data, device: torch.device) -> TrainState:
    model = build_model_for(config, data.info).to(device)
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    steps_per_epoch = len(data.train)
    total_steps = config.train.epochs * steps_per_epoch
    s = config.sparsity
    sp = st.sparsify(
        model,
        optimizer,
        method=s.method,
        sparsity=s.sparsity,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        distribution=s.distribution,
        include=s.include,
        exclude=s.dense,
        dense_first=s.dense_first,
        dense_last=s.dense_last,
        seed=s.seed,
        erk_power=s.erk_power,
        **s.options,
    )
    scheduler = build_scheduler(optimizer, config.lr_schedule, steps_per_epoch, total_steps)
    return TrainState(model, optimizer, scheduler, sp)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_epoch(state: TrainState, loader: DataLoader, log_every: int = 0) -> tuple[float, float]:
    """One pass over ``loader``; returns mean train loss and accuracy."""
    model, device = state.model, _device_of(state.model)
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    quiet = bool(os.environ.get("CI")) or None  # None: tqdm shows a bar only on a terminal
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}", leave=False, disable=quiet)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()  # the sparsifier's hooks mask gradients, weights, optimizer state
        state.scheduler.step()
        state.step += 1
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if log_every and state.step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.debug("step %d  loss %.4f", state.step, loss.item())
    mean_loss = total_loss.item() / max(1, seen)
    if not np.isfinite(mean_loss):
        raise SparsetrainError(
            f"training diverged in epoch {state.epoch + 1}: mean loss is {mean_loss}; "
            "lower optimizer.lr or add lr_schedule.warmup_epochs"
        )
    return mean_loss, correct.item() / max(1, seen)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (eval mode, no grad)."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
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
) -> list[dict[str, Any]]:
    """Train ``epochs`` more epochs from ``state``, evaluating every ``eval_every`` and at the end.

    Each epoch's record is returned and, with ``metrics_path``, appended to it as a JSON line;
    ``phase`` (e.g. "dense_finetune") tags records of extra training after the main run.
    """
    records = []
    last = state.epoch + epochs
    for _ in range(epochs):
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(state, data.train, log_every)
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
            "lr": state.optimizer.param_groups[0]["lr"],
            "sparsity": state.sparsifier.sparsity,
            "time": round(state.elapsed, 3),
            **({"phase": phase} if phase else {}),
        }
        append_metrics(metrics_path, record)
        records.append(record)
        tested = "" if test_acc is None else f"  test loss {test_loss:.4f} acc {test_acc:.2%}"
        log.info(
            "%sepoch %d/%d  train loss %.4f acc %.2f%%%s  sparsity %.2f%%  (%.0fs)",
            f"[{phase}] " if phase else "",
            *(state.epoch, last, train_loss, 100 * train_acc, tested),
            *(100 * record["sparsity"], state.elapsed),
        )
    return records


@dataclass
class TrainContext:
    """What a method's ``after_training(ctx)`` hook receives: the seam for extra models.

    After the main training, :func:`train` calls ``sp.method.after_training(ctx)`` if the method
    defines it. The hook may train further (``ctx.run_epochs`` on a copy of ``ctx.state`` with its
    own optimizer from :mod:`sparsetrain.train.optim`), evaluate any model (``ctx.evaluate``), and
    write files into ``ctx.run_dir``. It returns a mapping of JSON-ready results (e.g.
    ``{"dense_test_acc": 0.91}``) that lands in ``RunResult.extras``, ``report.json``, the final
    checkpoint's ``metrics`` and the log. Records of extra epochs go to ``metrics.jsonl`` tagged
    with ``phase``.
    """

    config: Config
    data: Data
    state: TrainState
    run_dir: Path
    metrics_path: Path

    def run_epochs(self, state: TrainState, epochs: int, phase: str) -> list[dict[str, Any]]:
        t = self.config.train
        return run_epochs(
            state,
            self.data,
            epochs,
            eval_every=t.eval_every,
            log_every=t.log_every,
            metrics_path=self.metrics_path,
            phase=phase,
        )

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.data.test)


def train(config: Config) -> RunResult:
    """Train ``config`` from scratch and write its run directory; see the module docstring."""
    config = resolve(config)
    if config.sparsity.method == "gap" and config.sparsity.options.get("parallel"):
        from sparsetrain.pgap import run_pgap  # P-GaP trains one model copy per group

        return run_pgap(config)
    device = torch.device(config.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparsetrainError(f"train.device is {config.train.device} but CUDA is not available")
    seed_everything(config.train.seed, device)
    data = build_data(config)
    state = build_state(config, data, device)
    sp = state.sparsifier

    run_dir = Path(config.train.out)  # created only once the run is known to start
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    log.info("run directory %s", run_dir)
    log.info(
        "%s: %d sparse tensors, sparsity %.2f%%, %d steps per epoch",
        sp.method.name,
        *(len(sp.params), 100 * sp.sparsity, len(data.train)),
    )

    t = config.train
    consoles = [lg for lg in (logging.root, logging.getLogger("sparsetrain")) if lg.handlers]
    with logging_redirect_tqdm(consoles):  # log lines print above the progress bar
        metrics = run_epochs(
            state,
            data,
            t.epochs,
            eval_every=t.eval_every,
            log_every=t.log_every,
            metrics_path=metrics_path,
        )
        hook = getattr(sp.method, "after_training", None)
        ctx = TrainContext(config, data, state, run_dir, metrics_path)
        extras = dict(hook(ctx) or {}) if hook is not None else {}
    if extras:
        log.info("after training: %s", extras)

    last = {**metrics[-1], **extras}
    checkpoint = save_checkpoint(run_dir / "final.pt", state_checkpoint(state, config, data, last))
    report = sp.report()
    (run_dir / "report.txt").write_text(report.format() + "\n")
    summary = {"metrics": last, "extras": extras, **report.to_dict()}
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = [plot_training_curves(metrics, run_dir / "curves.png")]  # main run, no extra phases
    if report.sparsity.rows:
        plots.append(plot_layer_sparsity(report.sparsity, run_dir / "layer_sparsity.png"))
    return RunResult(
        run_dir=run_dir,
        config=config,
        state=state,
        metrics=metrics,
        test_loss=metrics[-1]["test_loss"],
        test_acc=metrics[-1]["test_acc"],
        report=report,
        checkpoint=checkpoint,
        plots=plots,
        extras=extras,
    )
