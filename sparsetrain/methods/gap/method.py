"""GaP: scheduled grow-and-prune (Ma et al., ICLR 2022), cyclic variant C-GaP.

https://arxiv.org/abs/2106.09857 ; reference code https://github.com/boone891214/GaP

The sparse layers are split into kappa groups (:mod:`sparsetrain.methods.gap.partitions`). Training is a
sequence of *steps* of ``step_length`` each: during a step exactly one group is dense and every
other group is sparse at its ratio with a fixed mask. The first step grows group 0 while the
others hold random masks; when a step ends, the group that was dense is pruned back to its ratio
by per-layer magnitude (no other group's mask changes) and the next group in cyclic order is
grown dense, its pruned weights restarting at 0. A round grows groups 0, 1, ..., kappa-1; after
``rounds`` rounds the last grown group is pruned and the all-sparse model is fine-tuned for the
rest of training.

Layout: by default ``rounds`` (2) x kappa steps fill the first 80% of training and the sparse
fine-tune the last 20% (``finetune``). Give ``step_length`` to fix the step instead: as many
rounds as fit before the fine-tune, or exactly ``rounds`` if given too (then the fine-tune takes
whatever remains unless ``finetune`` is given). The fine-tune always runs from the last
prune-back to the end of training. Lengths are in ``unit``: epochs, steps or fraction.
The reference also runs one extra step before its first round (group 0 grown once more); here
each round grows every group once, so every group is dense for the same number of steps.

The reference restarts the optimizer at every step (``restart_optimizer=True``: state is cleared
as a new optimizer's would be) and also its lr warm-up; here the lr follows the training loop's
one continuous schedule, which a method does not own.

Ratios per layer come from ``distribution``: ``uniform`` (the reference's usual setting) or
``global``, fixed per-layer ratios from one magnitude threshold over the initial weights (as the
reference derives its non-uniform ratios). ``parallel=True`` selects P-GaP, which trains one model
copy per group and so runs through its own driver, :mod:`sparsetrain.methods.gap.parallel`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from sparsetrain import mask_ops
from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.methods.base import Method
from sparsetrain.methods.gap.partitions import Partition, make_partition
from sparsetrain.methods.registry import register_method
from sparsetrain.phases import UNITS, Phases, length_in_steps

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["DEFAULT_GROUPS", "DEFAULT_ROUNDS", "FINETUNE_FRACTION", "GaP", "gap_phases"]

log = logging.getLogger(__name__)

DEFAULT_GROUPS = 4
DEFAULT_ROUNDS = 2
FINETUNE_FRACTION = 0.2
FINETUNE = "finetune"


def gap_phases(
    total_steps: int,
    steps_per_round: int,
    *,
    rounds: int | None = None,
    step_length: float | None = None,
    finetune: float | None = None,
    unit: str = "epochs",
    steps_per_epoch: int | None = None,
) -> tuple[int, Phases]:
    """``rounds`` x ``steps_per_round`` GaP steps, then the fine-tune; returns (rounds, phases).

    Phase ``i`` is GaP step ``i`` (kind ``step``), the last phase the fine-tune (kind
    ``finetune``, absent when it is 0 steps long). Only phase boundaries are rounded to whole steps.
    """
    if rounds is not None and (
        isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1
    ):
        raise ConfigError(f"GaP rounds must be a positive integer, got {rounds!r}")

    def steps(value: float, what: str) -> float:
        return length_in_steps(
            value, unit, steps_per_epoch=steps_per_epoch, total_steps=total_steps, what=what
        )

    if finetune is not None:
        reserved = steps(finetune, "GaP finetune")
    elif rounds is not None and step_length is not None:
        reserved = 0.0  # the layout is fully given: the fine-tune is whatever remains
    else:
        reserved = FINETUNE_FRACTION * total_steps
    if step_length is not None:
        length = steps(step_length, "GaP step_length")
        if length <= 0:
            raise ConfigError("GaP step_length must be longer than 0")
        if rounds is None:
            rounds = math.floor((total_steps - reserved) / (steps_per_round * length) + 1e-9)
            if rounds < 1:
                raise ConfigError(
                    f"not one GaP round of {steps_per_round} steps of {length:g} optimizer steps "
                    f"fits before a fine-tune of {reserved:g} in {total_steps} steps; shorten "
                    "step_length or finetune, or train longer"
                )
        grown = rounds * steps_per_round * length
        if grown > total_steps - reserved + 1e-6:
            raise ConfigError(
                f"{rounds} GaP rounds of {steps_per_round} steps of {length:g} optimizer steps "
                f"({grown:g}) and a fine-tune of {reserved:g} do not fit in {total_steps} steps"
            )
    else:
        rounds = DEFAULT_ROUNDS if rounds is None else rounds
        if reserved >= total_steps:
            raise ConfigError(f"GaP finetune ({reserved:g} steps) leaves no step of {total_steps}")
        length = (total_steps - reserved) / (rounds * steps_per_round)
    lengths = [("step", length)] * (rounds * steps_per_round)
    rest = total_steps - rounds * steps_per_round * length
    rest = 0.0 if rest < 1e-6 else rest  # float residue of a layout that fills training
    return rounds, Phases.from_lengths([*lengths, (FINETUNE, rest)], total_steps)


@register_method("gap")
class GaP(Method):
    """Grow one group of layers dense at a time, prune it back, cycle; then fine-tune sparse.

    Options: ``groups`` (kappa, default 4) or ``partition`` (one list of name globs per group);
    ``rounds``, ``step_length``, ``finetune`` and their ``unit`` (see the module docstring);
    ``restart_optimizer`` (clear optimizer state at every step, as the reference does);
    ``parallel`` (P-GaP, run by :func:`sparsetrain.methods.gap.parallel.pgap_train`) with ``shard`` (each P-GaP
    worker trains on its own shard of the data instead of all of it).
    """

    default_distribution = "uniform"
    needs_total_steps = True

    def __init__(
        self,
        *,
        groups: int | None = None,
        partition: Sequence[Sequence[str] | str] | None = None,
        rounds: int | None = None,
        step_length: float | None = None,
        finetune: float | None = None,
        unit: str = "epochs",
        restart_optimizer: bool = True,
        parallel: bool = False,
        shard: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if isinstance(self.sparsity, list | tuple):
            raise ConfigError("gap takes one sparsity, not a list")
        self.sparsity = mask_ops.check_sparsity(self.sparsity)
        if unit not in UNITS:
            raise ConfigError(f"unknown length unit {unit!r}; use one of {', '.join(UNITS)}")
        if groups is not None and partition is not None:
            raise ConfigError("give GaP either groups (a count) or partition (globs), not both")
        if partition is not None and (isinstance(partition, str) or not partition):
            raise ConfigError(
                f"GaP partition must be a non-empty list of glob lists, got {partition!r}"
            )
        if groups is not None and (
            isinstance(groups, bool) or not isinstance(groups, int) or groups < 1
        ):
            raise ConfigError(f"GaP groups must be a positive integer, got {groups!r}")
        if parallel and not restart_optimizer:
            raise ConfigError(
                "P-GaP workers always start from a fresh optimizer; drop restart_optimizer"
            )
        if shard and not parallel:
            raise ConfigError("shard applies to P-GaP (parallel: true) only")
        self.groups = groups
        self.partition_globs = partition
        self.parallel = bool(parallel)
        self.shard = bool(shard)
        self.restart_optimizer = bool(restart_optimizer)
        self.n_groups = len(partition) if partition is not None else groups or DEFAULT_GROUPS
        # C-GaP: one phase per GaP step (kappa per round); P-GaP: one phase per round.
        self.rounds, self.phases = gap_phases(
            int(self.total_steps),
            1 if self.parallel else self.n_groups,
            rounds=rounds,
            step_length=step_length,
            finetune=finetune,
            unit=unit,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.partition: Partition | None = None

    # ------------------------------------------------------------------ hooks
    def init_masks(self, sp: Sparsifier) -> None:
        """Group 0 dense; every other layer random at its ratio (the reference's step 0)."""
        if self.parallel:
            raise ConfigError(
                "P-GaP (gap with parallel: true) trains one model copy per group and merges them, "
                "so it cannot run inside one training loop; use sparsetrain.methods.gap.parallel.pgap_train or "
                "`sparsetrain train` (under torchrun for one process per group)"
            )
        self.partition = make_partition(
            sp.params, self.groups or self.n_groups, self.partition_globs
        )
        sp.targets = self.layer_targets(sp, self.sparsity)
        dense = set(self.partition.groups[self.dense_group(0)])
        sp.set_masks(
            {
                name: torch.ones_like(p, dtype=torch.bool)
                if name in dense
                else mask_ops.random_mask(
                    p.shape,
                    mask_ops.n_keep(p.numel(), sp.targets[name]),
                    mask_ops.generator_for(self.seed, name, 0),
                )
                for name, p in sp.params.items()
            }
        )
        sizes = {name: p.numel() for name, p in sp.params.items()}
        log.info(
            "C-GaP: %d rounds x %d groups, then fine-tune:\n%s\n%s",
            self.rounds,
            self.n_groups,
            self.partition.describe(sizes),
            self.phases.describe(self.steps_per_epoch),
        )

    def after_step(self, sp: Sparsifier, t: int) -> None:
        """Where a GaP step ends: prune its group back, grow the next one, restart the optimizer."""
        ended = self.phases.at(t - 1)
        if ended.end_step != t or ended.kind == FINETUNE:
            return
        assert self.partition is not None
        pruned = self.dense_group(t - 1)
        grown = self.dense_group(t) if t < self.phases.total_steps else None
        masks = {
            name: mask_ops.topk_mask(
                sp.params[name].detach().abs(),
                mask_ops.n_keep(sp.params[name].numel(), sp.targets[name]),
            )
            for name in self.partition.groups[pruned]
        }
        sp.set_masks(masks)
        if grown is not None:  # after the prune: with one group, its pruned weights restart at 0
            sp.set_masks(
                {
                    n: torch.ones_like(sp.params[n], dtype=torch.bool)
                    for n in self.partition.groups[grown]
                }
            )
        if self.restart_optimizer and sp.optimizer is not None and t < self.phases.total_steps:
            sp.optimizer.state.clear()  # exactly a new optimizer's (empty) state
        log.info(
            "C-GaP step %d: pruned group %d back, %s; sparsity %.2f%%",
            t,
            pruned,
            "fine-tuning all-sparse" if grown is None else f"grew group {grown}",
            100 * sp.sparsity,
        )

    def dense_group(self, step: int) -> int | None:
        """Group dense during zero-based optimizer ``step`` (None in the fine-tune)."""
        index = self.phases.index_at(step)
        return None if self.phases[index].kind == FINETUNE else index % self.n_groups

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"phases": self.phases.as_list(), "groups": self.n_groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        phases = state.get("phases")
        if phases is not None and (
            [tuple(p) for p in phases] != self.phases.as_list()
            or state.get("groups") != self.n_groups
        ):
            raise CheckpointError(
                "the checkpoint's GaP schedule differs from this run's (different total steps, "
                "groups, rounds or step lengths); resume with the same schedule"
            )
