"""DSR: dynamic sparse reparameterization with one adaptive global threshold.

Mostafa & Wang, ICML 2019 (https://arxiv.org/abs/1902.05967, Algorithm 1); behaviour follows the
authors' code (IntelAI/dynamic-reparameterization). Every P optimizer steps, until a stop point:

1. prune every active weight with ``|w| < H``, one threshold H shared by all sparse tensors;
2. regrow exactly as many at random inactive positions (never one just pruned), at value 0, split
   across tensors in proportion to each tensor's surviving count (:func:`allocate_regrowth`);
3. adapt H: halve it when more than (1 + tolerance) K were pruned, double it when fewer than
   (1 - tolerance) K were.

The total number of active weights never changes; per-layer sparsities drift freely, which is the
point of the method. No dense gradient and no sorting is needed. Momentum is not reset: pruned
weights and their state are zeroed by the sparsifier, regrown ones start at 0 with zero state.

K, the number of weights to prune per step, is absolute in the paper (20,000 for WRN-28-2, whose
1,451,520 reparameterized weights make that 1.38%; 400,000 of ResNet-50's ~22.7M, 1.8%). To carry
it to other models it defaults to ``target_prune_fraction`` = 0.0138 of the reparameterized
weights, active and inactive alike (the paper kept K fixed across sparsities); ``target_prune``
sets it absolutely.

Defaults that differ from the paper or its code, and why: the paper's dense layers (WRN-28-2's
first conv, 1x1 shortcut convs and classifier, :func:`paper_dense_names`) stay dense by default
(``paper_dense_layers``; false reparameterizes every selected weight, as for ResNet-50, whose
classifier the paper made sparse); the overall sparsity over the selected weights is then lower
than ``sparsity``, which applies to the reparameterized tensors, as in the paper. K is a fraction
of the model (above) rather than absolute, so that it carries across model sizes.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sparsetrain import distributions, mask_ops
from sparsetrain.errors import ConfigError
from sparsetrain.methods.base import Method
from sparsetrain.methods.registry import register_method

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["DSR", "PeriodSchedule", "allocate_regrowth", "paper_dense_names"]

log = logging.getLogger(__name__)

# Halving stops here: below float32's smallest normal only exact zeros satisfy |w| < H, and a
# threshold that underflowed to 0 could never double back up.
_MIN_THRESHOLD = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class PeriodSchedule:
    """Piecewise-constant period: ``periods[i]`` steps apply from step ``starts[i]`` on.

    ``starts`` are 0-based step offsets (step ``t`` is 1-based, so step ``t`` lies in the segment
    whose start is at most ``t - 1``), as the reference reads the period from the current epoch.
    Of equal starts (a short run rounding two to the same step) the later one wins.
    """

    periods: tuple[int, ...]
    starts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.periods or len(self.periods) != len(self.starts):
            raise ConfigError(
                f"dsr: periods {list(self.periods)} and period_starts {list(self.starts)} must be "
                "non-empty lists of the same length"
            )
        if any(int(p) != p or p < 1 for p in self.periods):
            raise ConfigError(f"dsr: periods must be positive integers, got {list(self.periods)}")
        if self.starts[0] != 0 or list(self.starts) != sorted(self.starts):
            raise ConfigError(
                f"dsr: period_starts must begin at 0 and never decrease, got {list(self.starts)} "
                "(in steps)"
            )

    def __call__(self, t: int) -> int:
        return int(self.periods[bisect.bisect_right(self.starts, t - 1) - 1])


def allocate_regrowth(
    survivors: Mapping[str, int],
    capacity: Mapping[str, int],
    total: int,
    generator: torch.Generator,
) -> dict[str, int]:
    """Split ``total`` regrown weights across tensors in proportion to their ``survivors``.

    Shares are rounded down and the remainder goes to one random tensor that still has room. A
    tensor whose share exceeds its ``capacity`` takes what fits and the rest is split again, in the
    same proportions, over the tensors with room left; every round fills a tensor or finishes, so
    the loop ends after at most one round per tensor. Raises :class:`ConfigError` when the tensors
    cannot hold ``total`` at all (the reference loops forever there).
    """
    names = list(survivors)
    room = {n: int(capacity[n]) for n in names}
    if total > sum(room.values()):
        raise ConfigError(
            f"dsr: {total} weights were pruned but only {sum(room.values())} inactive positions "
            "(other than those just pruned) are free to regrow them; raise the sparsity or lower "
            "target_prune / target_prune_fraction"
        )
    out = dict.fromkeys(names, 0)
    remaining = int(total)
    while remaining > 0:
        open_ = [n for n in names if room[n] > 0]
        weight = {n: max(0, int(survivors[n])) for n in open_}
        if sum(weight.values()) == 0:  # only tensors without survivors have room: split evenly
            weight = dict.fromkeys(open_, 1)
        norm = sum(weight.values())
        share = {n: remaining * weight[n] // norm for n in open_}
        full = [n for n in open_ if share[n] >= room[n]]
        if full:  # these take what fits; the rest is split again over the others
            share = {n: room[n] for n in full}
        else:
            leftover = remaining - sum(share.values())
            spare = [n for n in open_ if room[n] > share[n]]
            if leftover > 0:
                lucky = spare[int(torch.randint(len(spare), (1,), generator=generator))]
                share[lucky] += min(leftover, room[lucky] - share[lucky])
        for n, k in share.items():
            out[n] += k
            room[n] -= k
            remaining -= k
    return out


def paper_dense_names(shapes: Mapping[str, torch.Size]) -> list[str]:
    """The layers the paper kept dense in WRN: the first conv, 1x1 convs, the last layer.

    First conv = the first 4-d weight; 1x1 convs = 4-d weights with a 1x1 kernel (shortcut and
    downsample convs); last layer = the last sparse parameter. In a bottleneck ResNet this also
    keeps the bottleneck 1x1 convs dense, which the paper's ResNet-50 did not: exclude layers by
    name there instead. A model without convolutions (an MLP, a Transformer) has none of these
    layers, and its last sparse weight need not be a classifier (a GPT's head is tied to the
    embedding and dense anyway): nothing is kept dense there.
    """
    names = list(shapes)
    convs = [n for n in names if len(shapes[n]) == 4]
    if not convs:
        return []
    dense = {n for n in convs if tuple(shapes[n][2:]) == (1, 1)}
    dense.update(convs[:1] + names[-1:])
    return [n for n in names if n in dense]


def _random_positions(free: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Bool mask of ``n`` uniformly random positions among the True entries of ``free``."""
    candidates = torch.nonzero(free.reshape(-1)).flatten()
    order = torch.randperm(candidates.numel(), generator=generator)[:n]
    out = torch.zeros(free.numel(), dtype=torch.bool, device=free.device)
    out[candidates[order.to(candidates.device)]] = True
    return out.view_as(free)


@register_method("dsr")
class DSR(Method):
    """Prune below a global adaptive threshold, regrow at random in proportion to survivors.

    Options (lengths in ``unit``: ``fraction`` of training, ``epochs`` or ``steps``):
        target_prune: K, weights to prune per reparameterization (absolute); overrides
            ``target_prune_fraction`` (K as a fraction of the reparameterized weights).
        tolerance: delta of the dead band [(1 - delta) K, (1 + delta) K] where H stays.
        threshold: H at the start.
        periods / period_starts: P = ``periods[i]`` optimizer steps from ``period_starts[i]`` on
            (default: the paper's 100/200/400/800 at epochs 0/25/80/140 of 200).
        stop: no reparameterization after this point (None: never stop).
        paper_dense_layers: keep the paper's dense layers (see :func:`paper_dense_names`) dense
            by giving them all-ones masks that DSR never touches (default, as the paper's WRN;
            false makes every selected weight reparameterized).
    """

    def __init__(
        self,
        *,
        target_prune: int | None = None,
        target_prune_fraction: float = 0.0138,
        tolerance: float = 0.1,
        threshold: float = 1e-3,
        periods: Sequence[int] = (100, 200, 400, 800),
        period_starts: Sequence[float] = (0.0, 0.125, 0.4, 0.7),
        stop: float | None = 0.95,
        unit: str = "fraction",
        paper_dense_layers: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if isinstance(self.sparsity, list | tuple) or not 0.0 < float(self.sparsity) < 1.0:
            raise ConfigError(
                f"dsr needs one sparsity in (0, 1): with no inactive position nothing can be "
                f"regrown; got {self.sparsity!r}"
            )
        if target_prune is not None and (int(target_prune) != target_prune or target_prune < 1):
            raise ConfigError(f"dsr: target_prune must be a positive integer, got {target_prune!r}")
        if not 0.0 < target_prune_fraction < 1.0:
            raise ConfigError(
                f"dsr: target_prune_fraction must be in (0, 1), got {target_prune_fraction!r}"
            )
        if not 0.0 <= tolerance < 1.0:
            raise ConfigError(f"dsr: tolerance must be in [0, 1), got {tolerance!r}")
        if not 0.0 < threshold < math.inf:
            raise ConfigError(f"dsr: threshold must be a positive number, got {threshold!r}")
        self.target_prune = None if target_prune is None else int(target_prune)
        self.target_prune_fraction = float(target_prune_fraction)
        self.tolerance = float(tolerance)
        self.threshold = float(threshold)
        self.schedule = PeriodSchedule(
            tuple(periods), tuple(self.steps_from(s, unit) for s in period_starts)
        )
        self.stop_step = None if stop is None else self.steps_from(stop, unit)
        if self.stop_step is not None and self.stop_step < 1:
            raise ConfigError(f"dsr: stop ({stop!r} {unit}) must come after the first step")
        self.paper_dense_layers = bool(paper_dense_layers)
        self.names: list[str] = []  # the reparameterized tensors, set by init_masks
        self.reparameterizations = 0
        self.last_pruned = 0

    # ------------------------------------------------------------------ hooks
    def init_masks(self, sp: Sparsifier) -> None:
        """The same sparsity in every reparameterized tensor (or the chosen distribution), at
        random positions, at least one weight each; paper-dense layers get all-ones masks."""
        shapes = {n: p.shape for n, p in sp.params.items()}
        dense = set(paper_dense_names(shapes)) if self.paper_dense_layers else set()
        self.names = [n for n in sp.params if n not in dense]
        if not self.names:
            raise ConfigError(
                "dsr: no parameter is left to reparameterize once the paper's dense layers are "
                f"kept dense ({', '.join(sorted(dense))}); set paper_dense_layers=false"
            )
        weights = self.distribution_inputs(sp, self.names)
        targets = distributions.resolve(
            self.distribution,
            weights,
            float(self.sparsity),
            erk_power=self.erk_power,
            min_density=self.min_density,
            overrides={n: s for n, s in self.layer_sparsity.items() if n in weights},
        )
        sp.targets = {n: targets.get(n, 0.0) for n in sp.params}
        sp.set_masks(
            {
                n: mask_ops.random_mask(
                    w.shape,
                    max(1, mask_ops.n_keep(w.numel(), targets[n])),
                    mask_ops.generator_for(self.seed, n, 0),
                )
                for n, w in weights.items()
            }
        )
        numel = sum(w.numel() for w in weights.values())
        if self.target_prune is None:
            self.target_prune = max(1, round(self.target_prune_fraction * numel))
        active = sum(int(sp.mask(n).sum()) for n in self.names)
        log.info(
            "dsr: %d reparameterized tensors, %d of %d weights active, K = %d per step",
            len(self.names),
            active,
            numel,
            self.target_prune,
        )
        if self.target_prune > active // 2:
            log.warning(
                "dsr: K = %d is more than half of the %d active weights; lower target_prune",
                self.target_prune,
                active,
            )

    def after_step(self, sp: Sparsifier, t: int) -> None:
        """Reparameterize after every step ``t`` that is a multiple of the current period P(t),
        as the reference does (``g % P(epoch) == 0``), up to the stop step. A pure function of
        ``t`` (the sparsifier's saved step count), so a resumed run repeats the same steps."""
        if (self.stop_step is None or t <= self.stop_step) and t % self.schedule(t) == 0:
            self.reparameterize(sp, t)

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def reparameterize(self, sp: Sparsifier, t: int) -> int:
        """One prune / regrow / threshold update at step ``t``; returns the number pruned."""
        before = {n: sp.mask(n) for n in self.names}
        pruned: dict[str, torch.Tensor] = {}
        for n, mask in before.items():
            magnitude = sp.weight(n).abs()
            below = mask & (magnitude < self.threshold)
            if mask.any() and torch.equal(below, mask):  # never empty a tensor
                largest = mask_ops.topk_mask(magnitude.float().masked_fill(~mask, -math.inf), 1)
                below &= ~largest
            pruned[n] = below
        count = {n: int(p.sum()) for n, p in pruned.items()}
        total = sum(count.values())
        growth = allocate_regrowth(
            {n: int(before[n].sum()) - count[n] for n in self.names},
            {n: before[n].numel() - int(before[n].sum()) for n in self.names},
            total,
            mask_ops.generator_for(self.seed, "dsr/allocation", t),
        )
        for n, mask in before.items():
            if count[n] == 0 and growth[n] == 0:
                continue
            new = mask & ~pruned[n]
            if growth[n]:
                new |= _random_positions(~mask, growth[n], mask_ops.generator_for(self.seed, n, t))
            sp.set_mask(n, new)
            log.debug("dsr step %d: %s pruned %d, regrew %d", t, n, count[n], growth[n])
        old = self.threshold
        if total > (1.0 + self.tolerance) * self.target_prune:
            self.threshold = max(self.threshold / 2.0, _MIN_THRESHOLD)
        elif total < (1.0 - self.tolerance) * self.target_prune:
            self.threshold *= 2.0
        log.debug(
            "dsr step %d: pruned %d (K = %d), H %g -> %g",
            t,
            total,
            self.target_prune,
            old,
            self.threshold,
        )
        self.reparameterizations += 1
        self.last_pruned = total
        return total

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "target_prune": self.target_prune,
            "periods": list(self.schedule.periods),
            "period_start_steps": list(self.schedule.starts),
            "stop_step": self.stop_step,
            "reparameterizations": self.reparameterizations,
            "last_pruned": self.last_pruned,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])
        self.target_prune = int(state["target_prune"])
        self.schedule = PeriodSchedule(tuple(state["periods"]), tuple(state["period_start_steps"]))
        self.stop_step = state["stop_step"]
        self.reparameterizations = int(state["reparameterizations"])
        self.last_pruned = int(state["last_pruned"])
