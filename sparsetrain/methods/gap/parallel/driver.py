"""P-GaP's driver: the initial sparse model, the rounds, then the sparse fine-tune.

The fine-tune is the same deterministic run on every rank, so no rank waits idle in a
collective. Rank 0's weights are then broadcast so every rank ends identical, and hashes of the
final weights and masks are compared across ranks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sparsetrain import mask_ops
from sparsetrain.collectives import (
    World,
    broadcast_tensors,
    init_distributed,
    tensor_digest,
)
from sparsetrain.errors import ConfigError
from sparsetrain.masks import Sparsifier
from sparsetrain.methods import build_method
from sparsetrain.methods.gap.method import FINETUNE, GaP, choose_groups, warmup_factor
from sparsetrain.methods.gap.parallel.phase import endless_batches
from sparsetrain.methods.gap.parallel.rounds import Rounds
from sparsetrain.methods.gap.partitions import Partition, make_partition
from sparsetrain.select import layer_overrides, select_parameters

__all__ = ["WORKERS", "PGaPResult", "pgap_train"]

log = logging.getLogger(__name__)

WORKERS = ("sequential", "distributed")


@dataclass
class PGaPResult:
    """The trained sparse model and what the run did, as seen by this process."""

    model: nn.Module
    sparsifier: Sparsifier
    optimizer: torch.optim.Optimizer  # the fine-tune's
    scheduler: torch.optim.lr_scheduler.LRScheduler
    partition: Partition
    rounds: int
    records: list[dict[str, Any]] = field(default_factory=list)
    merge_hashes: list[str] = field(default_factory=list)  # weights + masks after each merge
    mask_hash: str = ""  # the final masks
    rank: int = 0
    world_size: int = 1


def _world(workers: str, device: str | torch.device) -> World | None:
    """This process's place among the workers: None when it runs them all (``sequential``).

    The process group is :func:`sparsetrain.collectives.init_distributed`'s: joined once
    and left at exit, so P-GaP may run more than once in a process.
    """
    if workers not in WORKERS:
        raise ConfigError(f"P-GaP workers must be one of {', '.join(WORKERS)}, got {workers!r}")
    if workers == "sequential":
        return None
    world = init_distributed(device)
    if world is None and os.environ.get("WORLD_SIZE") == "1":
        return World(0, 1, torch.device(device))  # torchrun with one process: no group needed
    if world is None:
        raise ConfigError(
            "distributed P-GaP needs a process group: run under torchrun --nproc-per-node K "
            "(K groups) or call torch.distributed.init_process_group first"
        )
    return world


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _initial_model(
    model_fn: Callable[[], nn.Module],
    method: GaP,
    world: World | None,
    device: torch.device,
    seed: int,
    select: dict[str, Any],
    layer_sparsity: Mapping[str, float] | None = None,
) -> tuple[nn.Module, Sparsifier]:
    """The same random model on every rank, every sparse layer but the stem random at its ratio."""
    torch.manual_seed(seed)
    model = model_fn().to(device)
    if world:
        broadcast_tensors(list(model.state_dict().values()), src=0)
    params = select_parameters(model, **select)
    if not params:
        raise ConfigError("P-GaP: the model has no sparse weight (check include/exclude)")
    sp = Sparsifier(model, params)
    method.layer_sparsity = layer_overrides(layer_sparsity, list(params))
    method.sparse_layers(sp)
    sp.targets = method.initial_targets(sp)
    sp.set_masks(
        {
            name: mask_ops.random_mask(
                p.shape,
                mask_ops.n_keep(p.numel(), sp.targets[name]),
                mask_ops.generator_for(method.seed, name, 0),
            )
            for name, p in params.items()
            if name not in method.stem
        }
    )
    return model, sp


def pgap_train(
    model_fn: Callable[[], nn.Module],
    data: Dataset,
    *,
    sparsity: float,
    total_steps: int,
    batch_size: int = 128,
    optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr_factor_fn: Callable[[int], Callable[[int], float]] | None = None,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    workers: str = "sequential",
    seed: int = 0,
    mask_seed: int | None = None,
    device: str | torch.device = "cpu",
    distribution: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    dense_first: bool = False,
    dense_last: bool = False,
    erk_power: float = 1.0,
    min_density: float = 0.01,
    layer_sparsity: Mapping[str, float] | None = None,
    evaluate: Callable[[nn.Module], tuple[float, float]] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> PGaPResult:
    """Train a sparse model with P-GaP; the workers run one after another or one per rank.

    Args:
        model_fn: builds the model; called once per process after ``torch.manual_seed(seed)``
            (with ``"distributed"`` rank 0's initial weights are broadcast to every rank).
        data: the training set, a map-style dataset yielding ``(input, target)``.
        sparsity: fraction of zeros over the sparse weights; per-layer ratios from
            ``distribution`` (``uniform`` by default, ``global``: fixed ratios from one
            magnitude threshold over the weights merged after the first round).
        total_steps: one process's optimizer steps: the rounds, then the fine-tune.
        optimizer_fn: a fresh optimizer over the given parameters, for every worker and the
            fine-tune (default SGD lr 0.05, momentum 0.9, weight decay 5e-4).
        lr_factor_fn: ``steps -> (t -> lr multiplier)`` for a phase of ``steps`` optimizer steps;
            each worker and the fine-tune restart it (default: a constant lr), multiplied by
            the linear warm-up over the first ``restart_warmup`` of the phase.
        workers: ``"sequential"`` (kappa workers in this process) or ``"distributed"`` (this
            process is one rank, launched by ``torchrun --nproc-per-node kappa``; the process
            group is joined once per process and left at exit).
        seed / mask_seed: seed of the initial model, data orders and dropout / of the random
            initial masks (default ``seed``). The global RNG is reseeded at every phase.
        include / exclude / dense_first / dense_last: which weights are sparse
            (:func:`sparsetrain.select.select_parameters`).
        min_density / layer_sparsity: the per-layer floor and overrides of the ratios (as in
            :func:`sparsetrain.sparsify`).
        evaluate: ``model -> (test loss, test accuracy)`` for the records, after every merge and
            every fine-tune epoch.
        on_record: called with each record (phase, round or epoch, step, losses, sparsity) as it
            is made.
        **options: GaP options: ``groups`` (kappa; default the world size, or in sequential
            mode 4 capped at the number of sparse layers) or ``partition``, ``rounds``,
            ``step_length``, ``finetune``, ``unit``, ``dense_stem``, ``restart_warmup``,
            ``shard``, ``recalibrate_bn`` (see :class:`sparsetrain.methods.gap.GaP`).
    """
    world = _world(workers, device)
    device = world.device if world else torch.device(device)
    steps_per_epoch = max(1, len(data) // batch_size)
    common = dict(sparsity=sparsity, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    common.update(distribution=distribution, erk_power=erk_power, min_density=min_density)
    common["seed"] = seed if mask_seed is None else mask_seed
    method = build_method("gap", common, {**options, "parallel": True})
    assert isinstance(method, GaP)
    select = dict(include=include, exclude=exclude, dense_first=dense_first, dense_last=dense_last)
    model, sp = _initial_model(model_fn, method, world, device, seed, select, layer_sparsity)
    sparse = {n: p for n, p in sp.params.items() if n not in method.stem}
    explicit = method.groups is not None or method.partition_globs is not None
    if explicit:
        kappa = method.n_groups
    else:
        kappa = world.size if world else choose_groups(list(sparse), None, "P-GaP")
    if world and kappa != world.size:
        raise ConfigError(
            f"P-GaP runs one process per group: {kappa} groups need {kappa} processes "
            f"(torchrun --nproc-per-node {kappa}), got {world.size}"
        )
    globs = method.partition_globs
    partition = method.partition = make_partition(sparse, None if globs else kappa, globs)
    log.info(
        "P-GaP: %d groups, %d rounds, %s workers%s:\n%s\n%s",
        kappa,
        method.rounds,
        workers,
        f" (dense stem: {', '.join(method.stem)})" if method.stem else "",
        partition.describe({n: p.numel() for n, p in sp.params.items()}),
        method.phases.describe(steps_per_epoch),
    )
    base_factor = lr_factor_fn or (lambda steps: lambda t: 1.0)

    def phase_factor(steps: int) -> Callable[[int], float]:
        """The phase's lr schedule times the warm-up every reference worker restarts."""
        factor = base_factor(steps)
        return lambda t: factor(t) * warmup_factor(t, steps, method.restart_warmup)

    def retarget(sp: Sparsifier) -> None:
        """``global``: ratios from the first merged (trained, dense) weights, then fixed."""
        method.record_for_ratios(sp, {n: sp.params[n] for names in partition.groups for n in names})
        if method.ratios is not None:
            sp.targets.update(method.ratios)

    run = Rounds(
        model,
        sp,
        partition,
        world,
        data,
        batch_size,
        method.shard,
        seed,
        device,
        optimizer_fn or _default_optimizer,
        phase_factor,
        loss_fn,
        retarget,
        method.recalibrate_bn,
    )
    records: list[dict[str, Any]] = []

    def report(record: dict[str, Any]) -> None:
        if evaluate is not None:
            record["test_loss"], record["test_acc"] = evaluate(model)
        record["sparsity"] = sp.sparsity
        records.append(record)
        if on_record is not None:
            on_record(record)

    step, hashes = 0, []
    for r in range(method.rounds):
        loss = run.run_round(r, method.phases[r].length)
        step = method.phases[r].end_step
        hashes.append(run.digest(f"weights and masks after round {r + 1}"))
        record = {"phase": "pgap_round", "round": r + 1, "epoch": step / steps_per_epoch}
        report({**record, "step": step, "train_loss": loss})

    optimizer, scheduler, generator = run.fresh(total_steps - step, "pgap-finetune", 0)
    batches = endless_batches(data, batch_size, generator)
    while step < total_steps:  # one record per epoch of this process's steps
        chunk = min(total_steps - step, steps_per_epoch - step % steps_per_epoch)
        loss = run.fit(optimizer, scheduler, batches, chunk)
        step += chunk
        record = {"phase": FINETUNE, "epoch": step / steps_per_epoch, "step": step}
        report({**record, "train_loss": loss, "lr": optimizer.param_groups[0]["lr"]})
    if world:  # identical runs, but CUDA kernels need not be bit-exact: rank 0's wins
        broadcast_tensors(list(model.state_dict().values()), src=0)
    run.digest("final weights and masks")
    return PGaPResult(
        model=model,
        sparsifier=sp,
        optimizer=optimizer,
        scheduler=scheduler,
        partition=partition,
        rounds=method.rounds,
        records=records,
        merge_hashes=hashes,
        mask_hash=tensor_digest(sp.masks),
        rank=world.rank if world else 0,
        world_size=world.size if world else 1,
    )
