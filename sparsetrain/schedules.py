"""Schedules: small frozen objects that are pure functions of the step ``t``.

A method asks ``schedule(t)`` instead of keeping counters, so resuming from a checkpoint at step
``t`` repeats exactly what an uninterrupted run does, and one schedule serves several methods
(GMP's sparsity ramp, RigL/SET/DSR drop fractions, update-step predicates).

``t`` is the 1-based index of the optimizer step the method is deciding about (see
:mod:`sparsetrain.methods.base`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparsetrain.errors import ConfigError

__all__ = ["Constant", "Cosine", "Cubic", "Every"]


def _check_window(start: int, end: int | None, what: str) -> None:
    if start < 0:
        raise ConfigError(f"{what}: start must be >= 0, got {start}")
    if end is not None and end <= start:
        raise ConfigError(f"{what}: end ({end}) must come after start ({start})")


@dataclass(frozen=True)
class Constant:
    """The same value at every step (SET's drop fraction zeta)."""

    value: float

    def __call__(self, t: int) -> float:
        return self.value


@dataclass(frozen=True)
class Cosine:
    """Cosine decay from ``value`` at ``start`` to 0 at ``end``, then 0.

    With ``start=0`` this is RigL's drop fraction f(t) = alpha/2 (1 + cos(pi t / T_end))
    (Evci et al. 2020, https://arxiv.org/abs/1911.11134, Sec. 3).
    """

    value: float
    end: int
    start: int = 0

    def __post_init__(self) -> None:
        _check_window(self.start, self.end, "cosine schedule")

    def __call__(self, t: int) -> float:
        progress = min(1.0, max(0.0, (t - self.start) / (self.end - self.start)))
        return 0.5 * self.value * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Cubic:
    """Zhu & Gupta's ramp s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 with n dt = end - start.

    ``initial`` before ``start``, ``final`` from ``end`` on (https://arxiv.org/abs/1710.01878,
    Sec. 3). Evaluated at any ``t``, not only on the update grid, so the value a method reads does
    not depend on how often it updates.
    """

    initial: float
    final: float
    start: int
    end: int

    def __post_init__(self) -> None:
        _check_window(self.start, self.end, "cubic schedule")

    def __call__(self, t: int) -> float:
        if t >= self.end:
            return self.final
        progress = max(0.0, (t - self.start) / (self.end - self.start))
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class Every:
    """Is ``t`` an update step: ``start <= t <= stop`` and ``t - start`` a multiple of ``freq``.

    ``stop=None`` never stops. ``t`` is 1-based, so with ``start=0`` the first update is at
    ``t = freq`` (after ``freq`` optimizer steps).
    """

    freq: int
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if int(self.freq) != self.freq or self.freq < 1:
            raise ConfigError(f"update frequency must be a positive integer, got {self.freq!r}")
        if self.stop is not None and self.stop < self.start:
            raise ConfigError(f"update window: stop ({self.stop}) is before start ({self.start})")
        if self.start < 0:
            raise ConfigError(f"update window: start must be >= 0, got {self.start}")

    def __call__(self, t: int) -> bool:
        if t < self.start or (self.stop is not None and t > self.stop):
            return False
        return (t - self.start) % self.freq == 0
