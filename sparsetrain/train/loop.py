"""The training loop behind ``sparsetrain train``, readable top to bottom.

``train(config)`` seeds everything, loads the data into memory, builds the model, optimizer and
per-step lr schedule, makes the model sparse with :func:`sparsetrain.sparsify` (two lines, as in a
user's own loop), trains and evaluates epoch by epoch, then writes the run directory::

    config.yaml     the resolved config (every default filled in)
    metrics.jsonl   one JSON record per epoch: epoch, step, train/test loss and accuracy (and,
                    for a language model, bits per byte: see sparsetrain.tasks), lr, ...
    checkpoints/    step-<step>.pt: the newest train.keep checkpoints, to resume from
    final.pt        checkpoint (see sparsetrain.train.checkpoint)
    report.txt/json per-layer sparsity, inference and training FLOPs
    curves.png, layer_sparsity.png

Methods that produce more than one model hook in after the main training through
``after_training`` (see :class:`TrainContext`).

``train(config, resume=run_dir)`` continues an interrupted run bit for bit (see
:mod:`sparsetrain.train.resume`); SIGTERM/SIGINT save a checkpoint and stop (see
:mod:`sparsetrain.train.guard`). Under ``torchrun`` each process runs ``train``: the model trains
in DDP on its share of every batch, and rank 0 writes the run directory (see
:mod:`sparsetrain.train.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import sparsetrain as st
from sparsetrain import tasks
from sparsetrain.data import DatasetInfo, dataset_info, load_dataset
from sparsetrain.errors import ConfigError, SparsetrainError
from sparsetrain.inputs import ExampleInput
from sparsetrain.models import build_model, model_task
from sparsetrain.report import plot_layer_sparsity, plot_training_curves
from sparsetrain.report.summary import Report
from sparsetrain.train import distributed
from sparsetrain.train.checkpoint import save_checkpoint, state_checkpoint
from sparsetrain.train.config import Config, SparsityConfig, resolve, save_config
from sparsetrain.train.guard import NonFiniteLoss, StepGuard
from sparsetrain.train.optim import build_optimizer, build_scheduler
from sparsetrain.train.resume import (
    ResumePoint,
    check_same_run,
    find_resume,
    restore_run,
    trim_metrics,
)
from sparsetrain.train.rundir import claim_run_dir, tidy_run_dir
from sparsetrain.train.sampler import EpochBatchSampler
from sparsetrain.train.signals import StopSignals
from sparsetrain.train.state import Data, EpochProgress, RunResult, TrainState

__all__ = [
    "Data",
    "EpochProgress",
    "RunResult",
    "TrainContext",
    "TrainState",
    "append_metrics",
    "build_data",
    "build_model_for",
    "build_state",
    "evaluate",
    "layer_kwargs",
    "make_loader",
    "run_epochs",
    "seed_everything",
    "state_checkpoint",
    "train",
    "train_epoch",
    "write_report",
]

log = logging.getLogger(__name__)
EVAL_BATCH_SIZE = 1000


StepHook = Callable[["TrainState"], None]


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_loader(
    dataset,
    batch_size: int,
    generator: torch.Generator | None,
    workers: int,
    sampler: Iterable[list[int]] | None = None,
) -> DataLoader:
    """Batches indexed in one go (``dataset[list]``): far faster than per-sample collation.

    ``sampler`` yields the batches (lists of indices); without one, ``generator`` None gives them
    in order (evaluation) and a generator shuffles. The loader always draws from a generator of
    its own, never from the global RNG, so evaluating does not change the training's randomness.
    """
    if sampler is not None:
        batches = sampler
    elif generator is None:
        batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    else:  # training drops the last partial batch so every step sees batch_size examples
        drop = len(dataset) > batch_size
        batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop)
    return DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,
        num_workers=workers,
        generator=torch.Generator() if generator is None else generator,
    )


def build_data(config: Config, world: distributed.World | None = None) -> Data:
    """Train and test loaders; under ``torchrun`` (``world``) each process loads its share of
    every global batch of ``train.batch_size`` (see :mod:`sparsetrain.train.sampler`)."""
    d, t = config.data, config.train
    train_set, info = load_dataset(d.name, "train", d.dir, **d.options)
    test_set, _ = load_dataset(d.name, "test", d.dir, **d.options)
    sampler = EpochBatchSampler(
        len(train_set),
        t.batch_size,
        seed=t.seed,
        rank=world.rank if world else 0,
        world_size=world.size if world else 1,
    )
    generator = torch.Generator().manual_seed(t.seed)
    return Data(
        train=make_loader(train_set, t.batch_size, generator, t.num_workers, sampler),
        test=make_loader(test_set, EVAL_BATCH_SIZE, None, t.num_workers),
        info=info,
        generator=generator,
        sampler=sampler,
    )


def build_model_for(config: Config, info: DatasetInfo | None = None) -> nn.Module:
    """The config's model, shaped for its dataset (``info`` read from the data config if None)."""
    info = info or dataset_info(config.data.name, **config.data.options)
    task = model_task(config.model.name)
    if task != info.task:
        raise ConfigError(
            f"model {config.model.name!r} is a {task} model but dataset {info.name!r} is for "
            f"{info.task}; pick a model from sparsetrain.models.list_models({info.task!r})"
        )
    return build_model(
        config.model.name,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        image_size=info.image_size,
        width=config.model.width,
        **config.model.options,
    )


def layer_kwargs(s: SparsityConfig) -> dict[str, Any]:
    """The config's choice of sparse weights and of their per-layer ratios, as keyword arguments
    of :func:`sparsetrain.sparsify` (and of P-GaP's driver)."""
    return {
        "distribution": s.distribution,
        "include": s.include,
        "exclude": s.dense,
        "dense_first": s.dense_first,
        "dense_last": s.dense_last,
        "erk_power": s.erk_power,
        "min_density": s.min_density,
        "layer_sparsity": s.layer_sparsity,
    }


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
        seed=s.seed,
        kernels=s.kernels,
        **layer_kwargs(s),
        **s.options,
    )
    scheduler = build_scheduler(optimizer, config.lr_schedule, steps_per_epoch, total_steps)
    return TrainState(model, optimizer, scheduler, sp)


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
) -> tuple[float, float]:
    """One pass over ``loader`` (the rest of the epoch after a mid-epoch resume); returns the
    epoch's mean train loss and accuracy over every process.

    ``on_step(state)`` runs at every step boundary (checkpoints, signals). With
    ``skip_nonfinite`` a batch whose loss is inf or nan (on any process) updates nothing.
    ``task`` (the dataset's) adds its derived metrics to the progress bar.
    """
    model, device = _forward_model(state), _device_of(state.model)
    model.train()
    progress = state.progress
    progress.to(device)  # sums saved in a checkpoint come back on the CPU
    quiet = bool(os.environ.get("CI")) or None  # None: tqdm shows a bar only on a terminal
    bar = tqdm(
        loader,
        desc=f"epoch {state.epoch + 1}",
        leave=False,
        disable=True if distributed.rank() else quiet,
        initial=progress.batch,
    )
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
            state.optimizer.step()  # the sparsifier's hooks mask grads, weights, optimizer state
            state.scheduler.step()
            state.step += 1
            progress.add(loss, logits, y)
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


def write_report(
    run_dir: Path,
    report: Report,
    last: dict[str, Any],
    extras: dict[str, Any],
    metrics: list[dict[str, Any]],
) -> list[Path]:
    """Write report.txt, report.json (``last`` record, ``extras``, ``report``) and the plots of
    ``metrics`` (the main run's records) into ``run_dir``; returns the plots' paths."""
    (run_dir / "report.txt").write_text(report.format() + "\n")
    summary = {"metrics": last, "extras": extras, **report.to_dict()}
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = [plot_training_curves(metrics, run_dir / "curves.png")]
    if report.sparsity.rows:
        plots.append(plot_layer_sparsity(report.sparsity, run_dir / "layer_sparsity.png"))
    return plots


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
) -> list[dict[str, Any]]:
    """Train ``epochs`` more epochs from ``state``, evaluating every ``eval_every`` and at the end.

    Each epoch's record is returned and, with ``metrics_path``, appended to it as a JSON line;
    ``phase`` (e.g. "dense_finetune") tags records of extra training after the main run. An epoch
    that ``state`` is in the middle of counts as one and is finished. ``on_step(state)`` runs
    after every batch, ``on_epoch(state, record)`` after every record.
    """
    records = []
    last = state.epoch + epochs
    task = data.info.task
    for _ in range(epochs):
        start = time.perf_counter()
        data.start_epoch(state.epoch, state.progress.batch)
        train_loss, train_acc = train_epoch(
            state, data.train, log_every, on_step=on_step, skip_nonfinite=skip_nonfinite, task=task
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


@dataclass
class TrainContext:
    """This loop's side of a method's ``after_training(run)`` hook
    (:class:`sparsetrain.methods.base.TrainingRun`): the seam for extra models.

    After the main training, :func:`train` calls ``sp.method.after_training(ctx)`` if the method
    defines it. The hook may evaluate any model (``evaluate``) and train a dense branch of the run
    (``train_dense_branch``). It returns a mapping of JSON-ready results (e.g.
    ``{"dense_test_acc": 0.91}``) that lands in ``RunResult.extras``, ``report.json``, the final
    checkpoint's ``metrics`` and the log. Records of extra epochs go to ``metrics.jsonl`` tagged
    with ``phase``.
    """

    config: Config
    data: Data
    state: TrainState
    run_dir: Path
    metrics_path: Path | None  # None on ranks other than 0, which write no files
    on_step: StepHook | None = None  # stops extra training on SIGTERM/SIGINT

    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def sparsifier(self) -> st.Sparsifier:
        return self.state.sparsifier

    def train_dense_branch(
        self, model: nn.Module, optimizer_state: dict[str, Any] | None, step: int, name: str
    ) -> tuple[tuple[float, float], Path]:
        from sparsetrain.train.branch import train_dense_branch

        return train_dense_branch(self, model, optimizer_state, step, name)

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
            on_step=self.on_step,
            skip_nonfinite=t.skip_nonfinite,
        )

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.data.test)


def _report_training_input(sp: st.Sparsifier, data: Data, batch_size: int) -> None:
    """FLOPs count training batches: take their example and size from the training data, not
    from the first forward the sparsifier happened to see (none, or an evaluation batch, after a
    resume; this process's share of the global batch under ``torchrun``)."""
    x, _ = data.train.dataset[[0]]
    sp.batch_size = min(batch_size, len(data.train.dataset))
    sp.inputs = ExampleInput((torch.zeros_like(x).to(_device_of(sp.model)),), {}, sp.batch_size)


def _with_out(config: Config, out: str | Path) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, out=str(out)))


def train(
    config: Config | None = None,
    *,
    resume: str | Path | ResumePoint | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Train ``config`` and write its run directory; see the module docstring.

    ``resume`` (a run directory, a checkpoint file or a :class:`ResumePoint`) continues that run
    in its own directory, ending bit for bit where an uninterrupted run would; ``config`` (None:
    the checkpoint's own) may differ from the checkpoint's only in ``RESUMABLE_KEYS`` of
    :mod:`sparsetrain.train.resume`. A new run refuses a directory that holds another run's
    checkpoints unless ``overwrite`` (see :mod:`sparsetrain.train.rundir`). Under ``torchrun``
    every process calls this.
    """
    point = None
    if resume is not None and overwrite:
        raise ConfigError("overwrite cannot be combined with resume: a resumed run keeps its own")
    if resume is not None:
        point = resume if isinstance(resume, ResumePoint) else find_resume(resume)
        config = _with_out(point.config() if config is None else config, point.run_dir)
    elif config is None:
        raise ConfigError("train() needs a config, or a run to resume")
    config = resolve(config)
    if point is not None:
        check_same_run(point.config(), config, point.path)
    if config.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise SparsetrainError(f"train.device is {config.train.device} but CUDA is not available")
    world = distributed.init_distributed(config.train.device)
    return _train(config, point, world, overwrite)


def _train(
    config: Config, point: ResumePoint | None, world: distributed.World | None, overwrite: bool
) -> RunResult:
    main = world is None or world.main
    if world is not None:  # the run directory's name may hold a timestamp: take rank 0's
        config = _with_out(config, distributed.broadcast_object(config.train.out))
        if not main:
            logging.getLogger("sparsetrain").setLevel(logging.WARNING)
    if point is None:
        claim_run_dir(config.train.out, overwrite)
    device = world.device if world else torch.device(config.train.device)
    seed_everything(config.train.seed, device)
    data = build_data(config, world)
    state = build_state(config, data, device)
    sp = state.sparsifier

    run_dir = Path(config.train.out)
    metrics_path = run_dir / "metrics.jsonl"
    metrics: list[dict[str, Any]] = []
    if point is not None:
        restore_run(state, data, point)
        metrics = trim_metrics(metrics_path, state.epoch, write=main)
    if main:  # created only once the run is known to start
        run_dir.mkdir(parents=True, exist_ok=True)
        tidy_run_dir(run_dir, state.step)
        save_config(config, run_dir / "config.yaml")
        if point is None:
            metrics_path.write_text("")
    log.info("run directory %s", run_dir)
    log.info(
        "%s: %d sparse tensors, sparsity %.2f%%, %d steps per epoch%s",
        sp.method.name,
        *(len(sp.params), 100 * sp.sparsity, len(data.train)),
        f", {world.size} processes" if world else "",
    )

    t = config.train
    consoles = [lg for lg in (logging.root, logging.getLogger("sparsetrain")) if lg.handlers]
    with StopSignals() as signals, logging_redirect_tqdm(consoles):  # logs print above the bar
        guard = StepGuard(config, data, run_dir, signals)
        try:
            metrics += run_epochs(
                state,
                data,
                t.epochs - state.epoch,
                eval_every=t.eval_every,
                log_every=t.log_every,
                metrics_path=metrics_path if main else None,
                on_step=guard.step,
                on_epoch=guard.epoch,
                skip_nonfinite=t.skip_nonfinite,
            )
        except NonFiniteLoss:
            raise guard.non_finite(state) from None
        guard.finish(state, metrics[-1])
        hook = getattr(sp.method, "after_training", None)
        ctx = TrainContext(
            config, data, state, run_dir, metrics_path if main else None, guard.after_training_step
        )
        extras = dict(hook(ctx) or {}) if hook is not None else {}
    state.forward = None  # the DDP wrapper is the loop's, not the result's
    _report_training_input(sp, data, t.batch_size)
    if extras:
        log.info("after training: %s", extras)

    last = {**metrics[-1], **extras}
    checkpoint = save_checkpoint(run_dir / "final.pt", state_checkpoint(state, config, data, last))
    report = sp.report()
    plots = write_report(run_dir, report, last, extras, metrics) if main else []
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
