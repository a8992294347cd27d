"""One phase of P-GaP training (a worker's round, or the fine-tune): its data and its steps.

The data order is drawn from the phase's own generator only, never from the global RNG, so a
worker trains on the same batches whether it runs alone on a rank or after other workers in the
same process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from sparsetrain.errors import SparsetrainError

__all__ = ["endless_batches", "fit", "shard"]


def shard(data: Dataset, index: int, count: int) -> Dataset:
    """Every ``count``-th example from ``index``."""
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[index::count] for t in data.tensors))
    return Subset(data, range(index, len(data), count))


def endless_batches(data: Dataset, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
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


def fit(
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
