"""``auto`` kernels: time a layer's sparse and dense versions once, keep whichever is faster.

Whether CSR beats MKL's dense matmul depends on the layer's shape, density, the batch size, the
thread count and the machine (see docs/performance.md: large layers win from about 80-90%
sparsity, tiny ones never). So each distinct case is measured once on the machine itself,
forward and backward as training runs them, and the answer is cached per process under a key of
shape, density bucket, batch size and threads: layers of the same kind, later epochs and other
models in the same process reuse it. Densities are bucketed on a quarter-octave grid (~19%
apart), fine enough that gradual pruning re-times a layer a few times per halving of its density
and no more.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsetrain.export.timing import compare
from sparsetrain.kernels.sparse_linear import (
    GradBuffer,
    LinearStructure,
    sparse_grad_input,
    sparse_grad_weight,
    sparse_linear_forward,
)

__all__ = ["Autotuner", "TuneKey", "default_tuner", "density_bucket"]

log = logging.getLogger(__name__)

# (case, dense call, sparse call) -> speed-up of sparse over dense (dense time / sparse time).
# The case is a TuneKey for a layer's products, or another frozen key (the kept-weights optimizer
# step's StepKey) for other choices made the same way.
Timer = Callable[[Hashable, Callable[[], object], Callable[[], object]], float]


def density_bucket(density: float) -> float:
    """``density`` rounded to the nearest point of the grid 2**(k/4)."""
    if density <= 0.0:
        return 0.0
    return 2.0 ** (round(4 * math.log2(density)) / 4)


@dataclass(frozen=True)
class TuneKey:
    """What a timing answer is valid for."""

    out_features: int
    in_features: int
    bias: bool
    dtype: torch.dtype
    density: float  # bucket, see density_bucket
    batch: int  # rows of the flattened input
    backward: bool  # timed forward + backward (training) or forward only
    grad_input: bool  # the backward includes grad_x (False for a first layer)
    threads: int


def _paired_timer(rounds: int) -> Timer:
    def timer(key: Hashable, dense: Callable[[], object], sparse: Callable[[], object]) -> float:
        return compare(dense, sparse, rounds=rounds).speedup

    return timer


class Autotuner:
    """Per-key choice between sparse and dense kernels, measured on first use.

    Args:
        timer: ``timer(key, dense_fn, sparse_fn) -> speedup`` (dense time / sparse time); the
            default alternates the two in ``rounds`` paired rounds
            (:func:`sparsetrain.export.timing.compare`). Inject another for deterministic tests
            or a different measurement.
        min_speedup: sparse is chosen only when measured at least this much faster, so noise on
            a shared machine does not pick a kernel that is really a tie or a loss.
    """

    def __init__(
        self, timer: Timer | None = None, *, min_speedup: float = 1.1, rounds: int = 5
    ) -> None:
        self.timer = timer or _paired_timer(rounds)
        self.min_speedup = float(min_speedup)
        self.speedups: dict[Hashable, float] = {}

    def key(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        structure: LinearStructure,
        batch: int,
        backward: bool,
        grad_input: bool,
    ) -> TuneKey:
        out_features, in_features = structure.shape
        return TuneKey(
            out_features,
            in_features,
            bias is not None,
            weight.dtype,
            density_bucket(structure.density),
            batch,
            backward,
            grad_input and backward,
            torch.get_num_threads(),
        )

    def use_sparse(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        structure: LinearStructure,
        batch: int,
        backward: bool,
        grad_input: bool = True,
    ) -> bool:
        """True when sparse kernels are faster for this case (timed now if never seen)."""
        key = self.key(weight, bias, structure, batch, backward, grad_input)
        what = (
            f"{key.out_features}x{key.in_features} at density {structure.density:.3f}, batch "
            f"{batch}, {'forward+backward' if backward else 'forward'}"
        )
        return self.decide(key, lambda: self._calls(key, weight, bias, structure), what)

    def decide(
        self,
        key: Hashable,
        calls: Callable[[], tuple[Callable[[], object], Callable[[], object]]],
        what: str,
    ) -> bool:
        """True when the sparse call is faster for ``key``; ``calls()`` builds the (dense,
        sparse) pair to time, only when ``key`` was never measured in this process."""
        speedup = self.speedups.get(key)
        if speedup is None:
            dense, sparse = calls()
            speedup = self.speedups[key] = float(self.timer(key, dense, sparse))
            log.info(
                "auto kernels: %s: sparse %.2fx dense -> %s",
                what,
                speedup,
                "sparse" if speedup >= self.min_speedup else "dense",
            )
        return speedup >= self.min_speedup

    def _calls(
        self,
        key: TuneKey,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        structure: LinearStructure,
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        w = weight.detach()
        b = None if bias is None else bias.detach()
        x = torch.randn(key.batch, key.in_features, dtype=w.dtype, device=w.device)
        gy = torch.randn(key.batch, key.out_features, dtype=w.dtype, device=w.device)
        ticks = itertools.count()
        buffer = GradBuffer(lambda: next(ticks))  # as in training: storage reused every step

        def dense() -> None:
            F.linear(x, w, b)
            if key.backward:
                if key.grad_input:
                    gy.mm(w)
                gy.t().mm(x)

        def sparse() -> None:
            values = structure.gather(w)
            sparse_linear_forward(x, values, b, structure)
            if key.backward:
                if key.grad_input:
                    sparse_grad_input(gy, values, structure)
                sparse_grad_weight(gy, x, structure, buffer)

        return dense, sparse


_DEFAULT = Autotuner()


def default_tuner() -> Autotuner:
    """The process-wide tuner whose cache every ``auto`` model shares."""
    return _DEFAULT
