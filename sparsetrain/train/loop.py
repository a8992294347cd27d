"""The training loop behind ``sparsetrain train``, readable top to bottom.

``train(config)`` seeds everything, loads the data into memory, builds the model, optimizer and
per-step lr schedule, makes the model sparse with :func:`sparsetrain.sparsify` (two lines, as in a
user's own loop), trains and evaluates epoch by epoch, then writes the run directory::

    config.yaml     the resolved config (every default filled in)
    metrics.jsonl   one JSON record per epoch: epoch, step, train/test loss and accuracy (and,
                    for a language model, bits per byte: see sparsetrain.tasks), lr, ...
    steps.jsonl     every train.log_every steps: loss, lr, sparsity, per-layer density (see
                    sparsetrain.train.steplog); tensorboard/ when train.loggers asks for it
    checkpoints/    step-<step>.pt: the newest train.keep checkpoints, to resume from
    final.pt        checkpoint (see sparsetrain.train.checkpoint)
    report.txt/json per-layer sparsity, inference and training FLOPs
    curves.png, layer_sparsity.png

Methods that produce more than one model hook in after the main training through
``after_training`` (see :class:`~sparsetrain.train.context.TrainContext`).

The pieces it calls live beside it: :mod:`~sparsetrain.train.builders` (data, model, sparse
state), :mod:`~sparsetrain.train.epochs` (training and evaluation epochs, metrics records) and
:mod:`~sparsetrain.train.outputs` (reports and figures).

``train(config, resume=run_dir)`` continues an interrupted run bit for bit (see
:mod:`sparsetrain.train.resume`); SIGTERM/SIGINT save a checkpoint and stop (see
:mod:`sparsetrain.train.guard`). Under ``torchrun`` each process runs ``train``: the model trains
in DDP on its share of every batch, and rank 0 writes the run directory (see
:mod:`sparsetrain.train.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from sparsetrain.errors import ConfigError, SparsetrainError
from sparsetrain.train import distributed
from sparsetrain.train.builders import build_data, build_state, seed_everything
from sparsetrain.train.checkpoint import save_checkpoint, state_checkpoint
from sparsetrain.train.config import Config, resolve, save_config
from sparsetrain.train.context import TrainContext
from sparsetrain.train.epochs import run_epochs
from sparsetrain.train.guard import NonFiniteLoss, StepGuard
from sparsetrain.train.outputs import report_training_input, write_report
from sparsetrain.train.resume import (
    ResumePoint,
    check_same_run,
    find_resume,
    restore_run,
    trim_metrics,
    trim_steps,
)
from sparsetrain.train.rundir import claim_run_dir, tidy_run_dir
from sparsetrain.train.signals import StopSignals
from sparsetrain.train.state import RunResult
from sparsetrain.train.steplog import STEPS_FILE, StepLog, check_loggers

__all__ = ["train"]

log = logging.getLogger(__name__)


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
    check_loggers(config)
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
        if main:
            trim_steps(run_dir / STEPS_FILE, state.step)
    if main:  # created only once the run is known to start
        run_dir.mkdir(parents=True, exist_ok=True)
        tidy_run_dir(run_dir, state.step)
        save_config(config, run_dir / "config.yaml")
        if point is None:
            metrics_path.write_text("")
            (run_dir / STEPS_FILE).write_text("")
    steps = StepLog.for_run(config, run_dir, state.step, main)
    log.info("run directory %s", run_dir)
    log.info(
        "%s: %d sparse tensors, sparsity %.2f%%, %d steps per epoch%s",
        sp.method.name,
        *(len(sp.params), 100 * sp.sparsity, len(data.train)),
        f", {world.size} processes" if world else "",
    )

    t = config.train
    consoles = [lg for lg in (logging.root, logging.getLogger("sparsetrain")) if lg.handlers]
    with (
        StopSignals() as signals,
        logging_redirect_tqdm(consoles),  # logs print above the bar
        contextlib.closing(steps),
    ):
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
                steps=steps,
            )
        except NonFiniteLoss:
            raise guard.non_finite(state) from None
        guard.finish(state, metrics[-1])
        hook = getattr(sp.method, "after_training", None)
        ctx = TrainContext(
            config,
            data,
            state,
            run_dir,
            metrics_path if main else None,
            guard.after_training_step,
            steps,
        )
        extras = dict(hook(ctx) or {}) if hook is not None else {}
    state.forward = None  # the DDP wrapper is the loop's, not the result's
    report_training_input(sp, data, t.batch_size)
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
