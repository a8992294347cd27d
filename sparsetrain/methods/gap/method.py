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

Where the defaults differ from the paper or the reference code, and why:

* Kappa defaults to 4 groups (the paper's ResNet-50 setting), but never more than the model has
  sparse layers: a 3-layer MLP gets 3, and the log says so.
* The reference runs one extra step before its first round (group 0 grown once more); here each
  round grows every group once, so every group is dense for the same number of steps.
* The first layer stays dense (``dense_stem``): the first sparse weight, when it is a
  convolution, gets an all-ones mask and is in no group, and the ratios are solved over the
  other layers. The reference keeps its first layer (the embedding) dense; a stem conv of a few
  hundred weights pruned back per layer to 95% keeps whole filters at zero, whose gradient is
  then zero for good. Embeddings are dense by the layer selection already. An MLP's first
  Linear layer stays sparse: it holds most of the weights, and the reference prunes its first
  projections too.
* The reference restarts the optimizer and its lr warm-up at every step (each step is a new
  launch). ``restart_optimizer`` clears the optimizer state as a new optimizer's would be;
  ``restart_warmup`` scales the lr of the first fraction of every phase (GaP step or fine-tune)
  by a linear ramp 1/W, 2/W, ..., 1 on top of the training loop's own schedule, which a method
  does not own (the reference's 4,000-update warm-up is about a tenth of its 10-epoch steps,
  hence the default 0.1). ``restart_optimizer: false, restart_warmup: 0`` is the continuous
  variant.
* ``distribution: global`` gives fixed non-uniform per-layer ratios from one magnitude threshold,
  as the reference derives its ratios, but from *trained* weights: the first round runs at the
  uniform ratio, each group's dense weights are recorded when it is first pruned back, and once
  every group has been recorded (the end of round 1) one global threshold over them fixes every
  layer's ratio, applied at each layer's next prune-back. Ratios from the random initial weights
  would reflect only the init scale, i.e. fan-in (fc1 98% vs conv2 30% at 95% on small_cnn).
  With one round only the last group gets its ratio; layers in no group keep the uniform ratio.

``parallel=True`` selects P-GaP, which trains one model copy per group and so runs through its own
driver, :mod:`sparsetrain.methods.gap.parallel`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sparsetrain import distributions, mask_ops
from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.methods.base import Method
from sparsetrain.methods.gap.partitions import Partition, layer_of, make_partition
from sparsetrain.methods.registry import register_method
from sparsetrain.phases import UNITS, Phases, length_in_steps

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = [
    "DEFAULT_GROUPS",
    "DEFAULT_ROUNDS",
    "FINETUNE_FRACTION",
    "GaP",
    "choose_groups",
    "gap_phases",
    "stem_names",
    "warmup_factor",
]

log = logging.getLogger(__name__)

DEFAULT_GROUPS = 4
DEFAULT_ROUNDS = 2
FINETUNE_FRACTION = 0.2
FINETUNE = "finetune"
RESTART_WARMUP = 0.1


def stem_names(params: Mapping[str, torch.Tensor]) -> list[str]:
    """The first sparse weight when it is a convolution's (3 or more dims): the dense stem."""
    first = next(iter(params), None)
    return [first] if first is not None and params[first].dim() >= 3 else []


def choose_groups(names: Sequence[str], groups: int | None, what: str) -> int:
    """``groups``, or by default :data:`DEFAULT_GROUPS` capped at the number of layers (logged)."""
    layers = len(dict.fromkeys(layer_of(n) for n in names))
    if groups is not None:
        return groups
    chosen = min(DEFAULT_GROUPS, layers)
    if chosen < DEFAULT_GROUPS:
        log.info(
            "%s: %d groups (the default %d, capped at the %d sparse layers to grow)",
            *(what, chosen, DEFAULT_GROUPS, layers),
        )
    return chosen


def warmup_factor(step: int, length: int, fraction: float) -> float:
    """lr multiplier at zero-based ``step`` of a phase of ``length`` steps whose first
    ``fraction`` is a linear warm-up (1/W, 2/W, ..., 1), as each reference GaP step restarts it."""
    warm = round(fraction * length)
    return 1.0 if step >= warm else (step + 1) / warm


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

    Options: ``groups`` (kappa; default 4, at most the number of sparse layers) or ``partition``
    (one list of name globs per group); ``rounds``, ``step_length``, ``finetune`` and their
    ``unit`` (see the module docstring); ``dense_stem`` (keep a first conv dense);
    ``restart_optimizer`` / ``restart_warmup`` (clear optimizer state and restart a linear lr
    warm-up over this fraction of every phase, as the reference does); ``parallel`` (P-GaP, run
    by :func:`sparsetrain.methods.gap.parallel.pgap_train`) with ``shard`` (each P-GaP worker
    trains on its own shard of the data instead of all of it) and ``recalibrate_bn`` (batches of
    BatchNorm recalibration after each P-GaP prune-back; default 20).
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
        dense_stem: bool = True,
        restart_optimizer: bool = True,
        restart_warmup: float = RESTART_WARMUP,
        parallel: bool = False,
        shard: bool = False,
        recalibrate_bn: int | None = None,
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
        if recalibrate_bn is not None and (not parallel or recalibrate_bn < 0):
            raise ConfigError(
                "recalibrate_bn (batches, >= 0) applies to P-GaP (parallel: true) only: C-GaP "
                "trains on right after each prune-back, which refreshes the statistics"
            )
        if not 0.0 <= restart_warmup < 1.0:
            raise ConfigError(f"GaP restart_warmup must be in [0, 1), got {restart_warmup!r}")
        self.groups = groups
        self.partition_globs = partition
        self.parallel = bool(parallel)
        self.shard = bool(shard)
        self.dense_stem = bool(dense_stem)
        self.restart_optimizer = bool(restart_optimizer)
        self.restart_warmup = float(restart_warmup)
        self.recalibrate_bn = 20 if recalibrate_bn is None else int(recalibrate_bn)
        self._layout = dict(rounds=rounds, step_length=step_length, finetune=finetune, unit=unit)
        self.n_groups = len(partition) if partition is not None else groups or DEFAULT_GROUPS
        self._lay_out()
        self.partition: Partition | None = None
        self.stem: list[str] = []
        self.ratios: dict[str, float] | None = None  # `global`: fixed once round 1 is recorded
        self._recorded: dict[str, torch.Tensor] = {}  # `global`: |w| at a group's first prune
        self._base_lrs: list[Any] | None = None

    def _lay_out(self) -> None:
        """C-GaP: one phase per GaP step (kappa per round); P-GaP: one phase per round."""
        self.rounds, self.phases = gap_phases(
            int(self.total_steps),
            1 if self.parallel else self.n_groups,
            steps_per_epoch=self.steps_per_epoch,
            **self._layout,
        )

    # ------------------------------------------------------------------ hooks
    def init_masks(self, sp: Sparsifier) -> None:
        """Group 0 dense; every other layer random at its ratio (the reference's step 0)."""
        if self.parallel:
            raise ConfigError(
                "P-GaP (gap with parallel: true) trains one model copy per group and merges them, "
                "so it cannot run inside one training loop; use sparsetrain.methods.gap.parallel.pgap_train or "
                "`sparsetrain train` (under torchrun for one process per group)"
            )
        sparse = self.sparse_layers(sp)
        if self.partition_globs is None:
            self.n_groups = choose_groups(list(sparse), self.groups, "C-GaP")
            self._lay_out()
        self.partition = make_partition(sparse, self.n_groups, self.partition_globs)
        sp.targets = self.initial_targets(sp)
        dense = set(self.partition.groups[self.dense_group(0)]) | set(self.stem)
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
            "C-GaP: %d rounds x %d groups, then fine-tune%s:\n%s\n%s",
            self.rounds,
            self.n_groups,
            f" (dense stem: {', '.join(self.stem)})" if self.stem else "",
            self.partition.describe(sizes),
            self.phases.describe(self.steps_per_epoch),
        )

    def before_step(self, sp: Sparsifier, t: int) -> bool:
        """Scale this step's lr by the restarted warm-up (restored after the step)."""
        phase = self.phases.at(t - 1)
        factor = warmup_factor(t - 1 - phase.start_step, phase.length, self.restart_warmup)
        if factor < 1.0 and sp.optimizer is not None:
            groups = sp.optimizer.param_groups
            self._base_lrs = [group["lr"] for group in groups]
            for group in groups:
                group["lr"] = group["lr"] * factor
        return False

    def after_step(self, sp: Sparsifier, t: int) -> None:
        """Where a GaP step ends: prune its group back, grow the next one, restart the optimizer."""
        if self._base_lrs is not None:
            for group, lr in zip(sp.optimizer.param_groups, self._base_lrs, strict=True):
                group["lr"] = lr
            self._base_lrs = None
        ended = self.phases.at(t - 1)
        if ended.end_step != t or ended.kind == FINETUNE:
            return
        assert self.partition is not None
        pruned = self.dense_group(t - 1)
        grown = self.dense_group(t) if t < self.phases.total_steps else None
        names = self.partition.groups[pruned]
        self.record_for_ratios(sp, {n: sp.weight(n) for n in names})
        if self.ratios is not None:
            sp.targets.update({n: self.ratios[n] for n in names})
        masks = {
            name: mask_ops.topk_mask(
                sp.weight(name).abs(),
                mask_ops.n_keep(sp.params[name].numel(), sp.targets[name]),
            )
            for name in names
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

    # ------------------------------------------------------------- ratios
    def sparse_layers(self, sp: Sparsifier) -> dict[str, torch.nn.Parameter]:
        """The parameters GaP prunes: all but the dense stem (set here, see ``dense_stem``)."""
        self.stem = stem_names(sp.params) if self.dense_stem else []
        sparse = {n: p for n, p in sp.params.items() if n not in self.stem}
        if not sparse:
            raise ConfigError(
                f"GaP: no sparse layer is left once the stem {self.stem} is kept dense; "
                "set dense_stem: false"
            )
        return sparse

    def _resolve(self, distribution: str, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        overrides = {n: s for n, s in self.layer_sparsity.items() if n in weights}
        return distributions.resolve(
            distribution,
            weights,
            self.sparsity,
            erk_power=self.erk_power,
            min_density=self.min_density,
            overrides=overrides,
        )

    def initial_targets(self, sp: Sparsifier) -> dict[str, float]:
        """Per-layer ratios to start from (``global`` starts uniform); the stem at 0."""
        weights = {n: sp.params[n].detach() for n in sp.params if n not in self.stem}
        start = "uniform" if self.distribution == "global" else self.distribution
        targets = self._resolve(start, weights)
        self.warn_floored(sp, targets)
        return {n: targets.get(n, 0.0) for n in sp.params}

    def record_for_ratios(self, sp: Sparsifier, dense: Mapping[str, torch.Tensor]) -> None:
        """``global``: keep the trained dense weights of a group being pruned back for the first
        time; once every grouped layer is kept, fix the ratios by one magnitude threshold."""
        if self.distribution != "global" or self.ratios is not None:
            return
        assert self.partition is not None
        for name, weight in dense.items():
            self._recorded.setdefault(name, weight.detach().abs().clone())
        grouped = [n for names in self.partition.groups for n in names]
        if all(n in self._recorded for n in grouped):
            self.ratios = self._resolve("global", {n: self._recorded[n] for n in grouped})
            self.warn_floored(sp, self.ratios)
            self._recorded = {}
            log.info(
                "GaP global ratios from the trained weights: %s",
                ", ".join(f"{n} {100 * r:.1f}%" for n, r in self.ratios.items()),
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "phases": self.phases.as_list(),
            "groups": self.n_groups,
            "ratios": None if self.ratios is None else dict(self.ratios),
            "recorded": {n: w.clone() for n, w in self._recorded.items()},
        }

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
        ratios = state.get("ratios")
        self.ratios = None if ratios is None else dict(ratios)
        self._recorded = {n: w.clone() for n, w in state.get("recorded", {}).items()}
