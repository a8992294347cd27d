"""Phase-list schedules: training cut into contiguous, labelled step ranges.

Phase machines (AC/DC's compressed/decompressed alternation, GaP's partition cycle) act only where
a phase begins. Lengths may come in epochs, steps or fractions of training; they are summed as
floats and only the *boundaries* are rounded, so scaled layouts do not drift by a rounding error
per phase (ten phases of 4.5 steps end at step 45, not 40 or 50). :func:`acdc_phases` lays out
AC/DC's alternation, with the paper's reference layouts as presets.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sparsetrain.errors import ConfigError

__all__ = [
    "ACDC_LENGTHS",
    "ACDC_PRESETS",
    "UNITS",
    "Phase",
    "Phases",
    "acdc_phases",
    "length_in_steps",
]

UNITS = ("epochs", "steps", "fraction")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """Steps ``start_step`` (inclusive) to ``end_step`` (exclusive), counted from 0, of one kind.

    Zero-based step ``i`` is the ``(i + 1)``-th optimizer step, so a phase starting at ``s`` takes
    effect right after ``s`` steps are done (a method's ``after_step(sp, s)``).
    """

    kind: str
    start_step: int
    end_step: int

    @property
    def length(self) -> int:
        """Number of optimizer steps in the phase."""
        return self.end_step - self.start_step

    def as_tuple(self) -> tuple[str, int, int]:
        """``(kind, start_step, end_step)``, for tests, logs and reports."""
        return (self.kind, self.start_step, self.end_step)


def length_in_steps(
    value: float,
    unit: str,
    *,
    steps_per_epoch: int | None = None,
    total_steps: int | None = None,
    what: str = "length",
) -> float:
    """A length in ``epochs``, ``steps`` or ``fraction`` of training, as (unrounded) steps."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if value < 0:
        raise ConfigError(f"{what} must not be negative, got {value}")
    if unit == "steps":
        return float(value)
    if unit == "epochs":
        if not steps_per_epoch:
            raise ConfigError(f"{what} is given in epochs, which needs steps_per_epoch")
        return float(value) * steps_per_epoch
    if unit == "fraction":
        if not total_steps:
            raise ConfigError(f"{what} is given as a fraction of training, which needs total_steps")
        return float(value) * total_steps
    raise ConfigError(f"unknown length unit {unit!r}; use one of {', '.join(UNITS)}")


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


@dataclass(frozen=True)
class Phases:
    """An ordered, gap-free list of :class:`Phase` starting at step 0."""

    phases: tuple[Phase, ...]
    _starts: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.phases:
            raise ConfigError("a phase schedule needs at least one phase")
        expected = 0
        for phase in self.phases:
            if phase.start_step != expected:
                raise ConfigError(
                    f"phase {phase.kind!r} starts at step {phase.start_step}, expected {expected}"
                )
            if phase.length < 1:
                raise ConfigError(
                    f"phase {phase.kind!r} at step {phase.start_step} is {phase.length} steps "
                    "long; every phase needs at least one step"
                )
            expected = phase.end_step
        object.__setattr__(self, "_starts", [p.start_step for p in self.phases])

    @classmethod
    def from_lengths(
        cls, lengths: Sequence[tuple[str, float]], total_steps: int | None = None
    ) -> Phases:
        """Phases from ``(kind, length in steps)`` n_compressed; lengths may be fractional.

        Boundaries are the rounded running sums. Zero-length entries are dropped; an entry that is
        positive but rounds to no step is an error (train longer or give lengths in steps). With
        ``total_steps`` the last boundary must land on it exactly.
        """
        phases, start, position = [], 0, 0.0
        for kind, length in lengths:
            if length < 0:
                raise ConfigError(f"phase {kind!r} has negative length {length}")
            if length == 0:
                continue
            position += length
            end = _round_half_up(position)
            if end <= start:
                raise ConfigError(
                    f"phase {kind!r} ({length:.3g} steps) rounds to 0 steps; "
                    "train longer or give the phase lengths in steps"
                )
            phases.append(Phase(kind, start, end))
            start = end
        schedule = cls(tuple(phases))
        if total_steps is not None and schedule.total_steps != total_steps:
            raise ConfigError(
                f"phases span {schedule.total_steps} steps, training has {total_steps}"
            )
        return schedule

    @property
    def total_steps(self) -> int:
        """Steps covered by the whole schedule."""
        return self.phases[-1].end_step

    def __iter__(self) -> Iterator[Phase]:
        return iter(self.phases)

    def __len__(self) -> int:
        return len(self.phases)

    def __getitem__(self, index: int) -> Phase:
        return self.phases[index]

    def index_at(self, step: int) -> int:
        """Index of the phase holding zero-based ``step``; steps past the end stay in the last."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return bisect.bisect_right(self._starts, step) - 1

    def at(self, step: int) -> Phase:
        """The phase holding zero-based ``step`` (the last phase for steps past the end)."""
        return self.phases[self.index_at(step)]

    def starting_at(self, step: int) -> Phase | None:
        """The phase that begins at ``step``, if one does."""
        index = bisect.bisect_left(self._starts, step)
        if index < len(self._starts) and self._starts[index] == step:
            return self.phases[index]
        return None

    def as_list(self) -> list[tuple[str, int, int]]:
        """``[(kind, start_step, end_step), ...]``."""
        return [phase.as_tuple() for phase in self.phases]

    def describe(self, steps_per_epoch: int | None = None) -> str:
        """One line per phase, in steps and (when known) epochs, for logs."""
        lines = []
        for phase in self.phases:
            line = f"{phase.kind:<17} steps {phase.start_step:>7}-{phase.end_step:<7}"
            if steps_per_epoch:
                line += (
                    f" epochs {phase.start_step / steps_per_epoch:.2f}-"
                    f"{phase.end_step / steps_per_epoch:.2f}"
                )
            lines.append(line.rstrip())
        return "\n".join(lines)


# ------------------------------------------------------------------ AC/DC layout
ACDC_LENGTHS = ("warmup", "compressed", "decompressed", "last_dense", "final_compressed")

# The reference layouts in epochs, with the run length they were made for; scaled to any run.
ACDC_PRESETS: dict[str, dict[str, int]] = {
    # ResNet-50 / MobileNet ImageNet configs: prune at 10, 20, ..., 70 and 85; restore at
    # 15, ..., 65 and 75.
    "imagenet": dict(
        epochs=100, warmup=10, compressed=5, decompressed=5, last_dense=10, final_compressed=15
    ),
    # CIFAR-100 WRN-28-10 configs: prune at 10, 50, 90, 130, 170; restore at 30, 70, 110, 150.
    "cifar": dict(
        epochs=200, warmup=10, compressed=20, decompressed=20, last_dense=20, final_compressed=30
    ),
}


def acdc_phases(
    total_steps: int,
    *,
    preset: str | None = "imagenet",
    unit: str = "epochs",
    steps_per_epoch: int | None = None,
    **lengths: float | None,
) -> Phases:
    """The AC/DC layout: warm-up, compressed (decompressed compressed)*, last dense, final sparse.

    Args:
        total_steps: optimizer steps in the whole run.
        preset: ``imagenet`` (10/5/5/10/15 of 100 epochs) or ``cifar`` (10/20/20/20/30 of 200),
            both scaled to ``total_steps`` as fractions of their reference run; None needs every
            length.
        unit: unit of the given lengths: ``epochs``, ``steps`` or ``fraction`` of training.
        **lengths: any of ``warmup``, ``compressed``, ``decompressed``, ``last_dense``,
            ``final_compressed``; a given length overrides the preset's.

    As many compressed/decompressed pairs as fit go between the warm-up and the last dense phase
    (the alternation starts and ends compressed); steps left over lengthen the last dense phase.
    Only phase boundaries are rounded to whole steps. In a run too short for the preset, its
    phases shorter than one step get one step (logged); under 4 steps, the layout is a dense
    warm-up and one final compressed step.
    """
    unknown = sorted(set(lengths) - set(ACDC_LENGTHS))
    if unknown:
        raise ConfigError(
            f"unknown AC/DC phase length(s) {unknown}; valid: {', '.join(ACDC_LENGTHS)}"
        )
    if preset is not None and preset not in ACDC_PRESETS:
        raise ConfigError(
            f"unknown AC/DC preset {preset!r}; choose {', '.join(ACDC_PRESETS)} or None"
        )
    if unit not in UNITS:
        raise ConfigError(f"unknown length unit {unit!r}; use one of {', '.join(UNITS)}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"AC/DC needs total_steps >= 1, got {total_steps!r}")
    missing = [key for key in ACDC_LENGTHS if lengths.get(key) is None]
    if preset is None and missing:
        raise ConfigError(f"AC/DC without a preset needs every phase length; missing {missing}")
    steps: dict[str, float] = {}
    for key in ACDC_LENGTHS:
        value = lengths.get(key)
        if value is None:  # the preset's share of the run
            steps[key] = ACDC_PRESETS[preset][key] / ACDC_PRESETS[preset]["epochs"] * total_steps
        else:
            steps[key] = length_in_steps(
                value,
                unit,
                steps_per_epoch=steps_per_epoch,
                total_steps=total_steps,
                what=f"AC/DC {key}",
            )
    for key in ACDC_LENGTHS[1:]:
        if steps[key] <= 0:
            raise ConfigError(f"AC/DC {key} phase must be longer than 0, got {lengths.get(key)}")
    # A short run (a smoke test, one epoch on little data) would scale the preset's phases below
    # one step: those get one step each, and a run too short even for that keeps a dense
    # warm-up and one final compressed step.
    short = {k: v for k, v in steps.items() if lengths.get(k) is None and 0 < v < 1}
    steps.update(dict.fromkeys(short, 1.0))
    warmup, comp, decomp = steps["warmup"], steps["compressed"], steps["decompressed"]
    last, final = steps["last_dense"], steps["final_compressed"]
    middle = total_steps - warmup - last - final
    n_compressed = math.floor((middle + decomp) / (comp + decomp) + 1e-6)
    if n_compressed < 1 and preset is not None and all(v is None for v in lengths.values()):
        log.warning(
            "AC/DC: %d steps are too short for any alternation (4 are needed): %d dense "
            "step(s), then one final compressed step",
            *(total_steps, total_steps - 1),
        )
        items = [("warmup", total_steps - 1.0), ("final_compressed", 1.0)]
        return Phases.from_lengths(items, total_steps)
    if short:
        log.warning(
            "AC/DC: %d steps are too short for the %s preset's %s; those phases get one step each",
            *(total_steps, preset, ", ".join(f"{k} ({v:.2g} steps)" for k, v in short.items())),
        )
    if n_compressed < 1:
        raise ConfigError(
            f"AC/DC phases do not fit in {total_steps} steps: warm-up {warmup:g}, last dense "
            f"{last:g} and final compressed {final:g} steps leave {middle:g} steps, less than "
            f"one compressed phase of {comp:g}; shorten the phases or train longer"
        )
    slack = max(0.0, middle - n_compressed * comp - (n_compressed - 1) * decomp)
    items = [("warmup", warmup), ("compressed", comp)]
    items += [("decompressed", decomp), ("compressed", comp)] * (n_compressed - 1)
    items += [("last_dense", last + slack), ("final_compressed", final)]
    return Phases.from_lengths(items, total_steps)
