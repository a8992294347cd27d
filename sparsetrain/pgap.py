"""P-GaP: GaP's parallel variant, one process per group under ``torchrun`` or all in one process.

Ma et al., ICLR 2022 (https://arxiv.org/abs/2106.09857); reference code
https://github.com/boone891214/GaP. Every layer starts sparse with a random mask at its ratio.
Each round, every worker starts from the same model, grows its own group of layers dense and
trains ``step_length`` with a fresh optimizer and lr schedule. The workers' models are merged and
every grouped layer is pruned back to its ratio by per-layer magnitude. After the rounds, the
sparse model is fine-tuned.

Merge: the layers of group k, meaning every parameter and buffer of the modules owning its sparse
weights (:func:`sparsetrain.partitions.layer_state_keys`), come from worker k. Everything else is
**averaged over the workers**: layers in no group, norm layers, dense layers, and running
statistics. The sum runs in worker order. Integer buffers, such as BatchNorm's batch counter,
come from worker 0.

Determinism: worker k of round r seeds its data order and the global RNG (dropout) from
(seed, r, k). The workers can therefore run one after another in one process
(``workers="sequential"``) or one per rank (``"distributed"``), and both give the same merged
model: bit for bit on CPU with the same thread count, and on GPU as far as its kernels are
deterministic. For the same reason the merge gathers the averaged tensors and sums them in worker
order on every rank.

The fine-tune is the same deterministic run on every rank, so no rank waits idle in a
collective. Rank 0's weights are then broadcast so every rank ends identical. After every merge
and at the end, hashes of the masks and weights are compared across ranks.

Data: each worker trains on all the data in its own order, because the reference's workers are
full training runs. With ``shard=True``, worker k gets every kappa-th example starting from k.
Budget: ``total_steps`` counts one process's optimizer steps (wall-clock): ``rounds`` x
``step_length``, then the fine-tune. The rounds cost kappa times that in compute.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError, SparsetrainError
from sparsetrain.masks import Sparsifier
from sparsetrain.methods import Method, build_method
from sparsetrain.methods.gap import DEFAULT_GROUPS, FINETUNE
from sparsetrain.partitions import Partition, layer_state_keys, make_partition
from sparsetrain.select import select_parameters

if TYPE_CHECKING:
    from sparsetrain.train.config import Config
    from sparsetrain.train.loop import RunResult

__all__ = [
    "PGaPResult",
    "World",
    "all_gather_tensors",
    "broadcast_tensors",
    "check_identical",
    "init_distributed",
    "merge_workers",
    "pgap_train",
    "run_pgap",
    "tensor_hash",
]

log = logging.getLogger(__name__)

WORKERS = ("sequential", "distributed")


# ------------------------------------------------------------ distributed
@dataclass(frozen=True)
class World:
    """This process's rank, the number of processes, and the device it computes on."""

    rank: int
    size: int
    device: torch.device


def init_distributed(device: str | torch.device = "cpu") -> tuple[World, bool]:
    """Join the process group that ``torchrun`` describes, or reuse one that is already set up.

    ``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The backend is
    gloo on CPU and NCCL on CUDA, where each rank uses GPU LOCAL_RANK. Returns the world and
    whether this call created the group, in which case the caller destroys it when done.
    """
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        missing = [
            k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
        ]
        if missing:
            raise ConfigError(
                f"distributed P-GaP needs a process group: run under torchrun (missing "
                f"{', '.join(missing)}) or call torch.distributed.init_process_group first"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return World(dist.get_rank(), dist.get_world_size(), device), created


def _buckets(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices of ``tensors`` by dtype: one flat buffer, so one collective, per dtype."""
    buckets: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        buckets.setdefault(tensor.dtype, []).append(index)
    return buckets


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t.numel() for t in like]
    return [part.view_as(t) for part, t in zip(flat.split(sizes), like, strict=True)]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int) -> None:
    """Overwrite ``tensors``, in place on every rank, with rank ``src``'s values."""
    for indices in _buckets(tensors).values():
        group = [tensors[i] for i in indices]
        flat = _flat(group)
        dist.broadcast(flat, src)
        with torch.no_grad():
            for tensor, value in zip(group, _split(flat, group), strict=True):
                tensor.copy_(value)


def all_gather_tensors(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every rank's copy of ``tensors``: ``result[rank][i]`` is rank ``rank``'s ``tensors[i]``."""
    out: list[list[torch.Tensor]] = [list(tensors) for _ in range(dist.get_world_size())]
    for indices in _buckets(tensors).values():
        group = [tensors[i] for i in indices]
        flat = _flat(group)
        copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, flat)
        for rank, copy in enumerate(copies):
            for i, value in zip(indices, _split(copy, group), strict=True):
                out[rank][i] = value
    return out


def tensor_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and exact bytes: equal only for bit-identical tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_identical(digest: str, what: str) -> None:
    """Raise unless every rank passes the same ``digest`` (e.g. a :func:`tensor_hash`)."""
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
        raise SparsetrainError(f"P-GaP {what} differ across ranks (ranks {differing} vs rank 0)")


# ------------------------------------------------------------------ merge
def _ordered_mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean summed in worker order: the same bits in every process that holds the same copies."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total.div_(len(tensors))


def merge_workers(
    states: Sequence[Mapping[str, torch.Tensor]], group_keys: Sequence[Sequence[str]]
) -> dict[str, torch.Tensor]:
    """The merged state of worker ``states`` (worker k's ``state_dict``): see the module docstring.

    Keys of group k come from ``states[k]``; other floating-point keys are averaged in worker
    order; other keys (integer counters) come from worker 0. A worker's state may leave out the
    other groups' keys.
    """
    owner = {key: k for k, keys in enumerate(group_keys) for key in keys}
    merged = {}
    for key in dict.fromkeys(key for state in states for key in state):
        if key in owner:
            merged[key] = states[owner[key]][key].clone()
        elif states[0][key].is_floating_point():
            merged[key] = _ordered_mean([state[key] for state in states])
        else:
            merged[key] = states[0][key].clone()
    return merged


def _merge_distributed(
    state: Mapping[str, torch.Tensor], group_keys: Sequence[Sequence[str]]
) -> None:
    """:func:`merge_workers` in place over ranks: rank k holds worker k's state."""
    owned = {key for keys in group_keys for key in keys}
    floats = [k for k, v in state.items() if k not in owned and v.is_floating_point()]
    others = [k for k, v in state.items() if k not in owned and not v.is_floating_point()]
    gathered = all_gather_tensors([state[k] for k in floats])
    merged = [_ordered_mean(copies) for copies in zip(*gathered, strict=True)]
    with torch.no_grad():
        for key, value in zip(floats, merged, strict=True):
            state[key].copy_(value)
    for k, keys in enumerate(group_keys):
        broadcast_tensors([state[key] for key in keys], src=k)
    broadcast_tensors([state[key] for key in others], src=0)


# ------------------------------------------------------------------- data
def _shard(data: Dataset, index: int, count: int) -> Dataset:
    """Every ``count``-th example from ``index``."""
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[index::count] for t in data.tensors))
    return Subset(data, range(index, len(data), count))


def _batches(data: Dataset, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
    """Endless shuffled batches in an order drawn from ``generator`` only; full batches only
    (unless the data is smaller than one). In-memory tensors are indexed directly (fast)."""
    if isinstance(data, TensorDataset):
        n = len(data)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, max(1, n - batch_size + 1), batch_size):
                index = order[start : start + batch_size]
                yield tuple(t[index] for t in data.tensors)
    sampler = RandomSampler(data, generator=generator)
    loader = DataLoader(
        data, batch_size, sampler=sampler, drop_last=len(data) > batch_size, generator=generator
    )
    while True:
        yield from loader


def _fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[Any],
    steps: int,
    loss_fn: Callable[..., torch.Tensor],
    device: torch.device,
) -> float:
    """``steps`` optimizer steps; the mean training loss."""
    model.train()
    total, seen = torch.zeros((), device=device), 0
    for _ in range(steps):
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # the sparsifier's hooks mask gradients, weights and optimizer state
        scheduler.step()
        total += loss.detach() * len(y)
        seen += len(y)
    mean = total.item() / max(1, seen)
    if not math.isfinite(mean):
        raise SparsetrainError(f"P-GaP training diverged: mean loss {mean}; lower the lr")
    return mean


# ------------------------------------------------------------------ driver
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


@dataclass
class _Run:
    """The model every worker starts from, its masks, and how one phase of training goes."""

    model: nn.Module
    sp: Sparsifier
    partition: Partition
    world: World | None
    data: Dataset
    batch_size: int
    shard: bool
    seed: int
    device: torch.device
    optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    lr_factor_fn: Callable[[int], Callable[[int], float]]
    loss_fn: Callable[..., torch.Tensor]

    def __post_init__(self) -> None:
        self.grouped = [name for names in self.partition.groups for name in names]
        self.group_keys = [layer_state_keys(self.model, names) for names in self.partition.groups]
        self.owned = {key for keys in self.group_keys for key in keys}

    def ones(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: torch.ones_like(self.sp.params[n], dtype=torch.bool) for n in names}

    def fresh(self, steps: int, stream: str, index: int) -> tuple[Any, Any, Iterator[Any]]:
        """A new optimizer, lr schedule and data order for a phase, seeded by its name."""
        generator = mask_ops.generator_for(self.seed, stream, index)
        torch.manual_seed(generator.initial_seed())  # dropout and other global randomness
        optimizer = self.optimizer_fn(self.model.parameters())
        self.sp.attach(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor_fn(max(1, steps)))
        return optimizer, scheduler, generator

    def fit(self, optimizer: Any, scheduler: Any, batches: Iterator[Any], steps: int) -> float:
        return _fit(self.model, optimizer, scheduler, batches, steps, self.loss_fn, self.device)

    def run_round(self, r: int, steps: int) -> float:
        """Train this process's workers from the current model, merge, prune back; mean loss."""
        start = {key: value.clone() for key, value in self.model.state_dict().items()}
        start_masks = self.sp.masks
        kappa = len(self.partition)
        states, losses = [], []
        for k in [self.world.rank] if self.world else range(kappa):
            self.sp.set_masks(start_masks)
            self.model.load_state_dict(start)
            self.sp.set_masks(self.ones(self.partition.groups[k]))  # grown weights start at 0
            optimizer, scheduler, generator = self.fresh(steps, f"pgap-worker-{k}", r)
            data = _shard(self.data, k, kappa) if self.shard else self.data
            losses.append(
                self.fit(optimizer, scheduler, _batches(data, self.batch_size, generator), steps)
            )
            log.info(
                "P-GaP round %d, worker %d: %d steps, train loss %.4f", r + 1, k, steps, losses[-1]
            )
            if self.world is None:
                keep = set(self.group_keys[k])
                states.append(
                    {
                        key: value.clone()
                        for key, value in self.model.state_dict().items()
                        if key in keep or key not in self.owned
                    }
                )
        self.merge(states)
        self.prune_back()
        if self.world:
            gathered: list[list[float] | None] = [None] * self.world.size
            dist.all_gather_object(gathered, losses)
            losses = [loss for part in gathered for loss in part]
        return sum(losses) / len(losses)

    def merge(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Load the merged model: from ``states`` (sequential) or from the ranks (distributed)."""
        self.sp.set_masks(self.ones(self.grouped))  # else merged values outside old masks -> 0
        state = self.model.state_dict()
        if self.world:
            _merge_distributed(state, self.group_keys)
            return
        with torch.no_grad():
            for key, value in merge_workers(states, self.group_keys).items():
                state[key].copy_(value)

    def prune_back(self) -> None:
        """Every grouped layer back to its ratio by magnitude; ungrouped masks never change."""
        params, targets = self.sp.params, self.sp.targets
        self.sp.set_masks(
            {
                n: mask_ops.topk_mask(
                    params[n].detach().abs(), mask_ops.n_keep(params[n].numel(), targets[n])
                )
                for n in self.grouped
            }
        )

    def digest(self, what: str) -> str:
        """Hash of weights, buffers and masks; checked equal on every rank."""
        masks = {f"mask:{n}": m for n, m in self.sp.masks.items()}
        value = tensor_hash({**self.model.state_dict(), **masks})
        if self.world:
            check_identical(value, what)
        return value


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _initial_model(
    model_fn: Callable[[], nn.Module],
    method: Method,
    world: World | None,
    device: torch.device,
    seed: int,
    select: dict[str, Any],
) -> tuple[nn.Module, Sparsifier]:
    """The same random model on every rank, every sparse layer random at its ratio."""
    torch.manual_seed(seed)
    model = model_fn().to(device)
    if world:
        broadcast_tensors(list(model.state_dict().values()), src=0)
    params = select_parameters(model, **select)
    if not params:
        raise ConfigError("P-GaP: the model has no sparse weight (check include/exclude)")
    sp = Sparsifier(model, params)
    sp.targets = method.layer_targets(sp, method.sparsity)
    sp.set_masks(
        {
            name: mask_ops.random_mask(
                p.shape,
                mask_ops.n_keep(p.numel(), sp.targets[name]),
                mask_ops.generator_for(method.seed, name, 0),
            )
            for name, p in params.items()
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
            magnitude threshold over the initial weights).
        total_steps: one process's optimizer steps: the rounds, then the fine-tune.
        optimizer_fn: a fresh optimizer over the given parameters, for every worker and the
            fine-tune (default SGD lr 0.05, momentum 0.9, weight decay 5e-4).
        lr_factor_fn: ``steps -> (t -> lr multiplier)`` for a phase of ``steps`` optimizer steps;
            each worker and the fine-tune restart it (default: a constant lr).
        workers: ``"sequential"`` (kappa workers in this process) or ``"distributed"`` (this
            process is one rank, launched by ``torchrun --nproc-per-node kappa``).
        seed / mask_seed: seed of the initial model, data orders and dropout / of the random
            initial masks (default ``seed``). The global RNG is reseeded at every phase.
        include / exclude / dense_first / dense_last: which weights are sparse
            (:func:`sparsetrain.select.select_parameters`).
        evaluate: ``model -> (test loss, test accuracy)`` for the records, after every merge and
            every fine-tune epoch.
        on_record: called with each record (phase, round or epoch, step, losses, sparsity) as it
            is made.
        **options: GaP options: ``groups`` (kappa; default the world size, or 4 in sequential
            mode) or ``partition``, ``rounds``, ``step_length``, ``finetune``, ``unit``,
            ``shard`` (see :class:`sparsetrain.methods.gap.GaP`).
    """
    if workers not in WORKERS:
        raise ConfigError(f"P-GaP workers must be one of {', '.join(WORKERS)}, got {workers!r}")
    world, created = init_distributed(device) if workers == "distributed" else (None, False)
    try:
        device = world.device if world else torch.device(device)
        steps_per_epoch = max(1, len(data) // batch_size)
        common = dict(sparsity=sparsity, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        common.update(distribution=distribution, erk_power=erk_power)
        common["seed"] = seed if mask_seed is None else mask_seed
        method = build_method("gap", common, {**options, "parallel": True})
        explicit = method.groups is not None or method.partition_globs is not None
        kappa = method.n_groups if explicit else world.size if world else DEFAULT_GROUPS
        if world and kappa != world.size:
            raise ConfigError(
                f"P-GaP runs one process per group: {kappa} groups need {kappa} processes "
                f"(torchrun --nproc-per-node {kappa}), got {world.size}"
            )
        select = dict(
            include=include, exclude=exclude, dense_first=dense_first, dense_last=dense_last
        )
        model, sp = _initial_model(model_fn, method, world, device, seed, select)
        globs = method.partition_globs
        partition = make_partition(sp.params, None if globs else kappa, globs)
        log.info(
            "P-GaP: %d groups, %d rounds, %s workers:\n%s\n%s",
            kappa,
            method.rounds,
            workers,
            partition.describe({n: p.numel() for n, p in sp.params.items()}),
            method.phases.describe(steps_per_epoch),
        )
        run = _Run(
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
            lr_factor_fn or (lambda steps: lambda t: 1.0),
            loss_fn,
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
        batches = _batches(data, batch_size, generator)
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
            mask_hash=tensor_hash(sp.masks),
            rank=world.rank if world else 0,
            world_size=world.size if world else 1,
        )
    finally:
        if created:
            dist.destroy_process_group()


# --------------------------------------------------------------------- CLI
def run_pgap(config: Config) -> RunResult:
    """``sparsetrain train`` for P-GaP (``sparsity.method: gap`` with ``options.parallel: true``).

    Under ``torchrun --nproc-per-node K`` each process is one of K workers (K groups); run as one
    process, the workers train one after another. ``train.epochs`` is one process's budget: the
    rounds, then the fine-tune. Only rank 0 writes the run directory, with the same files as the
    training loop; ``metrics.jsonl`` has a record per round (phase ``pgap_round``) and per
    fine-tune epoch.
    """
    import dataclasses
    import json
    from pathlib import Path

    from sparsetrain.report import plot_layer_sparsity, plot_training_curves
    from sparsetrain.train.checkpoint import save_checkpoint
    from sparsetrain.train.config import resolve, save_config
    from sparsetrain.train.loop import (
        RunResult,
        TrainState,
        append_metrics,
        build_data,
        build_model_for,
        evaluate,
        seed_everything,
        state_checkpoint,
    )
    from sparsetrain.train.optim import build_optimizer, lr_factor

    config = resolve(config)
    device = torch.device(config.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparsetrainError(f"train.device is {config.train.device} but CUDA is not available")
    distributed = dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    world, created = init_distributed(device) if distributed else (None, False)
    try:
        main = world is None or world.rank == 0
        if world:  # the run directory's name may hold a timestamp: take rank 0's
            out = [config.train.out]
            dist.broadcast_object_list(out, src=0)
            config = dataclasses.replace(
                config, train=dataclasses.replace(config.train, out=out[0])
            )
            device = world.device
        if not main:
            logging.getLogger("sparsetrain").setLevel(logging.WARNING)
        seed_everything(config.train.seed, device)
        data = build_data(config)
        run_dir = Path(config.train.out)
        metrics_path = run_dir / "metrics.jsonl"
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
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
            lr_factor_fn=lambda steps: lr_factor(config.lr_schedule, steps_per_epoch, steps),
            workers="distributed" if world else "sequential",
            seed=config.train.seed,
            mask_seed=s.seed,
            device=device,
            distribution=s.distribution,
            include=s.include,
            exclude=s.dense,
            dense_first=s.dense_first,
            dense_last=s.dense_last,
            erk_power=s.erk_power,
            evaluate=(lambda model: evaluate(model, data.test)) if main else None,
            on_record=on_record,
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
        checkpoint = run_dir / "final.pt"
        report = sp.report()
        plots: list[Path] = []
        if main:
            save_checkpoint(checkpoint, state_checkpoint(state, config, data, {**last, **extras}))
            (run_dir / "report.txt").write_text(report.format() + "\n")
            summary = {"metrics": last, "extras": extras, **report.to_dict()}
            (run_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
            plots.append(plot_training_curves(metrics_path, run_dir / "curves.png"))
            if report.sparsity.rows:
                plots.append(plot_layer_sparsity(report.sparsity, run_dir / "layer_sparsity.png"))
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
    finally:
        if created:
            dist.destroy_process_group()
