"""``sparsetrain train`` for P-GaP: a config in, the training loop's run directory out."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsetrain import tasks
from sparsetrain.errors import SparsetrainError
from sparsetrain.methods.gap.parallel.driver import pgap_train
from sparsetrain.train import distributed
from sparsetrain.train.builders import build_data, build_model_for, layer_kwargs, seed_everything
from sparsetrain.train.checkpoint import save_checkpoint, state_checkpoint
from sparsetrain.train.config import Config, LRScheduleConfig, resolve, save_config
from sparsetrain.train.epochs import append_metrics, evaluate
from sparsetrain.train.optim import build_optimizer, lr_factor
from sparsetrain.train.outputs import write_report
from sparsetrain.train.rundir import claim_run_dir, tidy_run_dir
from sparsetrain.train.state import RunResult, TrainState

__all__ = ["phase_lr_factor", "run_pgap"]

log = logging.getLogger(__name__)


def phase_lr_factor(
    config: LRScheduleConfig, steps_per_epoch: int, run_steps: int, phase_steps: int
) -> Callable[[int], float]:
    """The run's lr schedule squeezed into one P-GaP phase of ``phase_steps`` steps.

    Every worker and the fine-tune restart the schedule, so its warm-up and step milestones,
    given in epochs of the whole run (``run_steps``), are scaled to the phase: a 1-epoch warm-up
    of a 10-epoch run warms up the first tenth of each phase (read in absolute epochs, a warm-up
    longer than a round would never reach the peak lr and no milestone past it would fire).
    """
    scale = phase_steps / max(1, run_steps)
    phase = dataclasses.replace(
        config,
        warmup_epochs=config.warmup_epochs * scale,
        milestones=tuple(m * scale for m in config.milestones),
    )
    return lr_factor(phase, steps_per_epoch, phase_steps)


def run_pgap(config: Config, overwrite: bool = False) -> RunResult:
    """``sparsetrain train`` for P-GaP (``sparsity.method: gap`` with ``options.parallel: true``).

    Under ``torchrun --nproc-per-node K`` each process is one of K workers (K groups); run as one
    process, the workers train one after another. ``train.epochs`` is one process's budget: the
    rounds, then the fine-tune. Only rank 0 writes the run directory, with the same files as the
    training loop; ``metrics.jsonl`` has a record per round (phase ``pgap_round``) and per
    fine-tune epoch. Like the training loop it refuses a run directory holding another run
    unless ``overwrite``. Each phase runs the config's lr schedule scaled to its length
    (:func:`phase_lr_factor`).
    """
    config = resolve(config)
    device = torch.device(config.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparsetrainError(f"train.device is {config.train.device} but CUDA is not available")
    world = distributed.init_distributed(device)
    main = world is None or world.main
    if world:  # the run directory's name may hold a timestamp: take rank 0's
        out = distributed.broadcast_object(config.train.out)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, out=out))
        device = world.device
    if not main:
        logging.getLogger("sparsetrain").setLevel(logging.WARNING)
    claim_run_dir(config.train.out, overwrite)
    seed_everything(config.train.seed, device)
    data = build_data(config)
    run_dir = Path(config.train.out)
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tidy_run_dir(run_dir, 0)
        save_config(config, run_dir / "config.yaml")
        metrics_path.write_text("")
        log.info("run directory %s", run_dir)

    def on_record(record: dict[str, Any]) -> None:
        if main:
            append_metrics(metrics_path, record)
            tested = f"  test acc {record['test_acc']:.2%}" if "test_acc" in record else ""
            log.info(
                "[%s] epoch %.2f  train loss %.4f%s  sparsity %.2f%%",
                record["phase"],
                record["epoch"],
                record["train_loss"],
                tested,
                100 * record["sparsity"],
            )

    steps_per_epoch = len(data.train)
    total = config.train.epochs * steps_per_epoch
    s = config.sparsity
    result = pgap_train(
        lambda: build_model_for(config, data.info),
        data.train.dataset,
        sparsity=s.sparsity,
        total_steps=total,
        batch_size=config.train.batch_size,
        optimizer_fn=lambda params: build_optimizer(params, config.optimizer),
        lr_factor_fn=lambda steps: phase_lr_factor(
            config.lr_schedule, steps_per_epoch, total, steps
        ),
        workers="distributed" if world else "sequential",
        seed=config.train.seed,
        mask_seed=s.seed,
        device=device,
        loss_fn=tasks.loss,
        evaluate=(lambda model: evaluate(model, data.test)) if main else None,
        on_record=on_record,
        **layer_kwargs(s),
        **{key: value for key, value in s.options.items() if key != "parallel"},
    )
    sp = result.sparsifier
    test_loss, test_acc = evaluate(result.model, data.test)
    state = TrainState(
        result.model, result.optimizer, result.scheduler, sp, config.train.epochs, total
    )
    extras = {
        "pgap_groups": len(result.partition),
        "pgap_rounds": result.rounds,
        "pgap_processes": result.world_size,
        "mask_hash": result.mask_hash,
    }
    last = {**result.records[-1], "test_loss": test_loss, "test_acc": test_acc}
    checkpoint = save_checkpoint(  # written by rank 0 only
        run_dir / "final.pt", state_checkpoint(state, config, data, {**last, **extras})
    )
    report = sp.report()
    plots = write_report(run_dir, report, last, extras, result.records) if main else []
    return RunResult(
        run_dir=run_dir,
        config=config,
        state=state,
        metrics=result.records,
        test_loss=test_loss,
        test_acc=test_acc,
        report=report,
        checkpoint=checkpoint,
        plots=plots,
        extras=extras,
    )
