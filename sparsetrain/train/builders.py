"""What ``sparsetrain train`` builds from a config before the first step: seeded RNGs, loaders,
the model, and the sparse training state (model, optimizer, lr schedule, sparsifier)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

import sparsetrain as st
from sparsetrain.data import DatasetInfo, dataset_info, load_dataset
from sparsetrain.errors import ConfigError
from sparsetrain.methods import get_method
from sparsetrain.models import build_model, model_task
from sparsetrain.train import distributed
from sparsetrain.train.config import Config, SparsityConfig
from sparsetrain.train.fsdp import shard_model
from sparsetrain.train.optim import build_optimizer, build_scheduler
from sparsetrain.train.sampler import EpochBatchSampler
from sparsetrain.train.state import Data, TrainState

__all__ = [
    "EVAL_BATCH_SIZE",
    "build_data",
    "build_model_for",
    "build_state",
    "layer_kwargs",
    "make_loader",
    "seed_everything",
]

EVAL_BATCH_SIZE = 1000


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
    s = config.sparsity
    prepare = partial(get_method(s.method).prepare_model, sparsity=s.sparsity, **s.options)
    model = build_model_for(config, data.info).to(device)
    model = shard_model(model, config.train.strategy, prepare)
    optimizer = build_optimizer(model.parameters(), config.optimizer)
    steps_per_epoch = len(data.train)
    total_steps = config.train.epochs * steps_per_epoch
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
