"""P-GaP's rounds: every worker trains from the same model, the models merge, groups prune back.

Worker k of round r seeds its data order and the global RNG (dropout) from (seed, r, k), so the
workers may run one after another in one process or one per rank and give the same merged model.
After every merge, hashes of the weights and masks are compared across ranks.

After the prune-back, BatchNorm running statistics are recalibrated (``bn_batches`` forward
passes in train mode without gradients, a cumulative average from reset statistics): the merged
statistics were measured on the dense workers, and pruning a grown group back shifts its
activations, which cost about 5 points of test accuracy on small_cnn at 95% until training had
refreshed them. The reference does not recalibrate (its Transformer has LayerNorm only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from sparsetrain import mask_ops
from sparsetrain.collectives import World, all_gather_object, broadcast_tensors, tensor_digest
from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import Sparsifier
from sparsetrain.methods.gap.parallel import phase
from sparsetrain.methods.gap.parallel.merge import merge_ranks, merge_workers
from sparsetrain.methods.gap.partitions import Partition, layer_state_keys

__all__ = ["Rounds"]

log = logging.getLogger(__name__)


@dataclass
class Rounds:
    """The model every worker starts from, its masks, and how one phase of training goes.

    ``world`` None runs every worker in this process; otherwise this process is worker
    ``world.rank`` and the merge and checks are collectives over the process group.
    """

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
    retarget: Callable[[Sparsifier], None] | None = None  # before each prune-back
    bn_batches: int = 0

    def __post_init__(self) -> None:
        self.grouped = [name for names in self.partition.groups for name in names]
        self.group_keys = [layer_state_keys(self.model, names) for names in self.partition.groups]
        self.owned = {key for keys in self.group_keys for key in keys}

    def ones(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: torch.ones_like(self.sp.params[n], dtype=torch.bool) for n in names}

    def fresh(self, steps: int, stream: str, index: int) -> tuple[Any, Any, torch.Generator]:
        """A new optimizer, lr schedule and data-order generator for a phase, seeded by its name."""
        generator = mask_ops.generator_for(self.seed, stream, index)
        torch.manual_seed(generator.initial_seed())  # dropout and other global randomness
        optimizer = self.optimizer_fn(self.model.parameters())
        self.sp.attach(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor_fn(max(1, steps)))
        return optimizer, scheduler, generator

    def fit(self, optimizer: Any, scheduler: Any, batches: Iterator[Any], steps: int) -> float:
        return phase.fit(
            self.model, optimizer, scheduler, batches, steps, self.loss_fn, self.device
        )

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
            data = phase.shard(self.data, k, kappa) if self.shard else self.data
            batches = phase.endless_batches(data, self.batch_size, generator)
            losses.append(self.fit(optimizer, scheduler, batches, steps))
            log.info(
                "P-GaP round %d, worker %d: %d steps, train loss %.4f", r + 1, k, steps, losses[-1]
            )
            if self.world is None:  # worker 0 also holds what is in no group
                keep = set(self.group_keys[k])
                states.append(
                    {
                        key: value.clone()
                        for key, value in self.model.state_dict().items()
                        if key in keep or (k == 0 and key not in self.owned)
                    }
                )
        self.merge(states)
        if self.retarget is not None:
            self.retarget(self.sp)
        self.prune_back()
        self.recalibrate_bn(r)
        if self.world:
            losses = [loss for part in all_gather_object(losses) for loss in part]
        return sum(losses) / len(losses)

    def merge(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Load the merged model: from ``states`` (sequential) or from the ranks (distributed)."""
        self.sp.set_masks(self.ones(self.grouped))  # else merged values outside old masks -> 0
        state = self.model.state_dict()
        if self.world:
            merge_ranks(state, self.group_keys)
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

    @torch.no_grad()
    def recalibrate_bn(self, r: int) -> None:
        """Fresh BatchNorm statistics of the pruned model (the module docstring); rank 0's win."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or self.bn_batches <= 0:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the recalibration batches
        generator = mask_ops.generator_for(self.seed, "pgap-bn", r)
        batches = phase.endless_batches(self.data, self.batch_size, generator)
        self.model.train()
        for _ in range(self.bn_batches):
            x, _ = next(batches)
            self.model(x.to(self.device, non_blocking=True))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        if self.world:  # CUDA kernels need not agree to the bit
            buffers = [b for m in norms for b in m.buffers()]
            broadcast_tensors(buffers, src=0)

    def digest(self, what: str) -> str:
        """Hash of weights, buffers and masks; with ranks, raises unless every rank's is equal."""
        masks = {f"mask:{n}": m for n, m in self.sp.masks.items()}
        value = tensor_digest({**self.model.state_dict(), **masks})
        if self.world:
            digests = all_gather_object(value)
            differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
            if differing:
                raise SparsetrainError(
                    f"P-GaP {what} differ across ranks (ranks {differing} vs rank 0)"
                )
        return value
