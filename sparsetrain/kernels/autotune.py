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
from sparsetrain.kernels.extension import ConvKernels
from sparsetrain.kernels.sparse_conv import (
    ConvGeometry,
    ConvStructure,
    Workspace,
    memory_format,
    sparse_conv_backward,
    sparse_conv_forward,
)
from sparsetrain.kernels.sparse_linear import (
    GradBuffer,
    LinearStructure,
    sparse_grad_input,
    sparse_grad_weight,
    sparse_linear_forward,
)

__all__ = ["Autotuner", "ConvTuneKey", "TuneKey", "default_tuner", "density_bucket"]

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


@dataclass(frozen=True)
class ConvTuneKey:
    """What a timing answer for a convolution is valid for."""

    weight_shape: tuple[int, ...]
    geometry: ConvGeometry
    input_shape: tuple[int, ...]  # the input as the layer runs it (4-D; a Conv1d has height 1)
    channels_last: bool
    bias: bool
    dtype: torch.dtype
    density: float  # bucket, see density_bucket
    backward: bool
    grad_input: bool
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

    def use_sparse_conv(
        self,
        kernels: ConvKernels,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        structure: ConvStructure,
        geometry: ConvGeometry,
        x: torch.Tensor,
        backward: bool,
        grad_input: bool = True,
    ) -> bool:
        """True when the sparse convolution is faster for this case (timed now if never seen)."""
        x4 = x.unsqueeze(2) if x.dim() == 3 else x
        key = ConvTuneKey(
            tuple(weight.shape),
            geometry,
            tuple(x4.shape),
            memory_format(x4) == torch.channels_last,
            bias is not None,
            weight.dtype,
            density_bucket(structure.density),
            backward,
            grad_input and backward,
            torch.get_num_threads(),
        )
        what = (
            f"conv {'x'.join(map(str, weight.shape))} on {'x'.join(map(str, key.input_shape))} "
            f"at density {structure.density:.3f}, {'forward+backward' if backward else 'forward'}"
        )
        return self.decide(key, lambda: _conv_calls(key, kernels, weight, bias, structure), what)

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


def _conv_calls(
    key: ConvTuneKey,
    kernels: ConvKernels,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    structure: ConvStructure,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """oneDNN's convolution and its backward, and the sparse kernels, on random inputs."""
    g = key.geometry
    w = weight.detach().reshape(structure.shape[0], -1, *structure.kernel)
    b = None if bias is None else bias.detach()
    x = torch.randn(key.input_shape, dtype=w.dtype, device=w.device)
    if key.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (pt, pb, pl, pr) = g.padding
    symmetric = (pt, pl) == (pb, pr)
    xd = x if symmetric else F.pad(x, (pl, pr, pt, pb))
    padding = [pt, pl] if symmetric else [0, 0]
    out = g.output_size(*key.input_shape[2:], structure.kernel)
    gy = torch.randn(key.input_shape[0], structure.shape[0], *out, dtype=w.dtype, device=w.device)
    mask = [key.grad_input, True, b is not None]
    bias_sizes = None if b is None else list(b.shape)
    ticks = itertools.count()
    buffer = GradBuffer(lambda: next(ticks))  # as in training: storage reused every step
    ws = Workspace()

    def dense() -> None:
        F.conv2d(xd, w, b, g.stride, padding, g.dilation)
        if key.backward:
            torch.ops.aten.convolution_backward(
                gy, xd, w, bias_sizes, list(g.stride), padding, list(g.dilation), False, [0, 0],
                1, mask,
            )  # fmt: skip

    def sparse() -> None:
        values = structure.gather(w)
        sparse_conv_forward(kernels, x, values, b, structure, g, ws)
        if key.backward:
            _, grad_values = sparse_conv_backward(
                kernels, gy, x, values, structure, g, key.grad_input, True, ws
            )
            buffer.fill(grad_values, structure)
            if b is not None:
                gy.sum((0, 2, 3))

    return dense, sparse


_DEFAULT = Autotuner()


def default_tuner() -> Autotuner:
    """The process-wide tuner whose cache every ``auto`` model shares."""
    return _DEFAULT
