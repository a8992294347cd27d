"""Training batches whose order is a pure function of (seed, epoch), sharded across processes.

A sampler that draws its shuffle from a generator carried across epochs makes epoch ``e``'s order
depend on every draw before it, so a resumed run would have to replay history to find it. Here the
permutation of epoch ``e`` comes from a generator seeded by ``(seed, e)`` alone: a run resumed
mid-epoch sets the epoch, skips the batches already consumed (without loading them), and sees
exactly the batches the uninterrupted run saw.

Under ``torchrun`` every process draws the same permutation and cuts the same global batches of
``batch_size`` examples; process ``rank`` takes its contiguous share of each. The global batches,
and so the number of steps per epoch and every step-based schedule, do not depend on the number of
processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError

__all__ = ["EpochBatchSampler", "epoch_generator"]


def epoch_generator(seed: int, epoch: int, stream: str = "train-order") -> torch.Generator:
    """The generator of one epoch's random choices: seeded by (seed, stream, epoch) only."""
    return mask_ops.generator_for(seed, stream, epoch)


class EpochBatchSampler(Sampler[list[int]]):
    """Lists of indices, one per step: this process's share of each global batch of an epoch.

    ``set_epoch(e, start=k)`` selects epoch ``e`` and makes the next iteration begin at its batch
    ``k`` (later iterations start at 0 again). ``drop_last`` drops the final partial batch when
    the dataset holds more than one batch, so every step sees ``batch_size`` examples.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0 or size <= 0:
            raise ConfigError(
                f"need a positive dataset size and batch size, got {size}, {batch_size}"
            )
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size ({batch_size}) is the global batch and must be divisible by "
                f"the number of processes ({world_size})"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not one of {world_size} processes")
        self.size = size
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last and size > batch_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order; the next iteration begins at its batch ``start``."""
        if not 0 <= start <= len(self):
            raise ConfigError(f"batch {start} is outside an epoch of {len(self)} batches")
        self.epoch = int(epoch)
        self._start = int(start)

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def order(self) -> torch.Tensor:
        """The epoch's permutation of the dataset's indices (the same in every process)."""
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=epoch_generator(self.seed, self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        order = self.order()
        share = self.batch_size // self.world_size
        for b in range(start, len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            if len(batch) < self.batch_size:  # the last partial batch: split as evenly as we can
                yield batch.tensor_split(self.world_size)[self.rank].tolist()
            else:
                yield batch[self.rank * share : (self.rank + 1) * share].tolist()
