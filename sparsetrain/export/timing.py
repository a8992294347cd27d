"""Wall-clock comparison of two call forms on a shared, noisy CPU.

The two callables alternate within each round (order reversed on odd rounds to cancel position
effects such as cache warmth) and the speed-up is the median over rounds of the per-round time
ratio. Pairing each measurement with its neighbour in time cancels most of the slowdown other
processes cause, which hits both alike; on a 2-core machine shared with other jobs, unpaired
single timings vary by 10x or more (see docs/performance.md).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Comparison", "compare"]


@dataclass(frozen=True)
class Comparison:
    """Seconds per call of a baseline and a candidate, and speed-ups (baseline / candidate)."""

    baseline_s: float  # median over rounds
    candidate_s: float
    speedup: float  # median over rounds of the paired ratio baseline / candidate
    best_speedup: float  # fastest baseline round / fastest candidate round


def _elapsed(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start


def compare(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    rounds: int = 5,
    min_round_s: float = 0.002,
) -> Comparison:
    """Time ``baseline`` against ``candidate`` in ``rounds`` interleaved rounds.

    Each round runs both for the same number of calls, chosen so the baseline's share lasts
    about ``min_round_s``; both run once first as warm-up.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    fns = (baseline, candidate)
    with torch.inference_mode():
        for fn in fns:
            fn()
        single = max(min(_elapsed(baseline, 1) for _ in range(3)), 1e-7)
        calls = max(1, math.ceil(min_round_s / single))
        times: tuple[list[float], list[float]] = ([], [])
        for r in range(rounds):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                times[i].append(_elapsed(fns[i], calls) / calls)
    ratios = [b / max(c, 1e-12) for b, c in zip(*times, strict=True)]
    return Comparison(
        baseline_s=statistics.median(times[0]),
        candidate_s=statistics.median(times[1]),
        speedup=statistics.median(ratios),
        best_speedup=min(times[0]) / max(min(times[1]), 1e-12),
    )
