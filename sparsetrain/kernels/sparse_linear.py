"""Linear forward and backward on CSR kernels, the weight gradient only at the mask's positions.

For ``y = x W^T + b`` with an unstructured mask on ``W`` the three products of a training step are

* forward ``y^T = W x^T``: CSR ``W`` times dense ``x^T`` (MKL SpMM, int32 indices);
* ``grad_x^T = W^T grad_y^T``: CSR of the transposed pattern, built once per mask, its values
  put in order by a cached permutation (no CSR transpose per step);
* ``grad_W = grad_y^T x`` restricted to the mask: ``torch.sparse.sampled_addmm`` computes only the
  nnz dot products; they are written into a dense zero tensor of the weight's shape, so
  ``.grad`` stays an ordinary dense tensor and every optimizer and method works unchanged.

The values come from the dense weight (one gather of nnz elements per forward), so the optimizer
keeps updating the ordinary ``nn.Parameter`` and only a mask change needs a rebuild of the
:class:`LinearStructure`. A method that reads the full gradient (RigL's grow score) asks for it
with ``dense_grad=True``: ``grad_W`` is then the dense product, exactly the gradient the masked
dense layer would have.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "CSR_DTYPES",
    "GradBuffer",
    "LinearStructure",
    "sparse_grad_input",
    "sparse_grad_weight",
    "sparse_linear",
    "sparse_linear_forward",
]

CSR_DTYPES = (torch.float32, torch.float64)  # what MKL's CSR kernels take on CPU


@functools.cache
def _quiet_beta_warning() -> None:
    """torch warns once per process that CSR is beta; let that one warning pass silently."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        torch.sparse_csr_tensor(
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0),
            (1, 1),
            check_invariants=False,
        )


class KeptIndex:
    """What every sparse structure derives from its ``index`` (the kept positions of the
    flattened weight, in the kernels' order) and its 2-D ``shape`` (outputs, inputs)."""

    index: torch.Tensor
    shape: tuple[int, ...]

    @property
    def nnz(self) -> int:
        return self.index.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept values of ``weight`` in ``index`` order (values off the mask unread)."""
        return weight.reshape(-1).index_select(0, self.index)


@dataclass(frozen=True, eq=False)
class LinearStructure(KeptIndex):
    """The CSR patterns of one mask and of its transpose, and where their values come from.

    ``index`` holds the flat positions of the mask in the (row-major) weight in CSR order, so the
    CSR values are one sorted gather from the dense weight. ``perm_t`` orders those values for
    the CSR of ``W^T``: a gather from the small values vector, which stays in cache, rather than
    a second, scattered gather from the weight.
    """

    shape: tuple[int, int]  # (out_features, in_features)
    crow: torch.Tensor
    col: torch.Tensor
    index: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    perm_t: torch.Tensor
    _zeros: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> LinearStructure:
        """Build both patterns from a 2-D bool mask."""
        if mask.dim() != 2:
            raise ValueError(f"a Linear mask is 2-D, got shape {tuple(mask.shape)}")
        _quiet_beta_warning()
        mask = mask.bool()
        rows, cols = mask.shape
        index = mask.reshape(-1).nonzero().squeeze(1)  # row-major order = CSR order of W
        row = index.div(cols, rounding_mode="floor")
        col = index - row * cols
        # Rows are already sorted, so a stable sort by column gives (column, row) order: the CSR
        # order of W^T (a small-key sort, ~50x faster than argsort of a combined key).
        perm_t = torch.sort(col, stable=True).indices
        bounds = torch.arange(rows + 1, device=index.device) * cols
        crow_t = torch.cat([col.new_zeros(1), torch.bincount(col, minlength=cols).cumsum(0)])
        return cls(  # int32 indices: MKL runs ~1.5x faster with them than with int64
            shape=(rows, cols),
            crow=torch.searchsorted(index, bounds).to(torch.int32),
            col=col.to(torch.int32),
            index=index,
            crow_t=crow_t.to(torch.int32),
            col_t=row.index_select(0, perm_t).to(torch.int32),
            perm_t=perm_t,
        )

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """``W`` restricted to the mask, as CSR over gathered ``values``."""
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, self.shape, check_invariants=False
        )

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """``W^T`` restricted to the mask, as CSR over the same gathered ``values``."""
        return torch.sparse_csr_tensor(
            self.crow_t,
            self.col_t,
            values.index_select(0, self.perm_t),
            self.shape[::-1],
            check_invariants=False,
        )

    def pattern(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a CSR tensor of zeros (the sampling pattern of ``sampled_addmm``)."""
        zeros = self._zeros.get(dtype)
        if zeros is None:
            zeros = self._zeros[dtype] = torch.zeros(
                self.nnz, dtype=dtype, device=self.index.device
            )
        return torch.sparse_csr_tensor(
            self.crow, self.col, zeros, self.shape, check_invariants=False
        )


def sparse_linear_forward(
    x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, s: LinearStructure
) -> torch.Tensor:
    """``x W^T + b`` for a 2-D ``x`` and ``W``'s gathered ``values`` (a transposed view)."""
    w = s.csr(values)
    if bias is None:
        return torch.mm(w, x.t()).t()
    return torch.addmm(bias.unsqueeze(1), w, x.t()).t()


def sparse_grad_input(
    grad_y: torch.Tensor, values: torch.Tensor, s: LinearStructure
) -> torch.Tensor:
    """``grad_y W`` through the transposed pattern, for ``W``'s gathered ``values``."""
    return torch.mm(s.csr_t(values), grad_y.t()).t()


def sparse_grad_weight(
    grad_y: torch.Tensor, x: torch.Tensor, s: LinearStructure, buffer: GradBuffer | None = None
) -> torch.Tensor:
    """``grad_y^T x`` at the mask's positions only, as a dense tensor with zeros elsewhere
    (in ``buffer``'s storage when given, see :class:`GradBuffer`)."""
    sampled = torch.sparse.sampled_addmm(s.pattern(grad_y.dtype), grad_y.t(), x).values()
    if buffer is not None:
        return buffer.fill(sampled, s)
    grad = torch.zeros(s.shape[0] * s.shape[1], dtype=grad_y.dtype, device=grad_y.device)
    grad.put_(s.index, sampled)
    return grad.view(s.shape)


class GradBuffer:
    """Dense weight-gradient storage reused from one training step to the next.

    A fresh weight-sized gradient costs a page-faulting allocation and a memset of the whole
    weight (64 MiB for 4096x4096, longer than the three sparse products at 95% sparsity). Reused
    storage is still zero off the mask, so a step only writes the nnz values into it. Autograd
    adopts the returned tensor as ``.grad`` without a copy, so ``.grad`` shares the storage.

    The storage is handed out at most once per tick of ``clock`` (the sparsifier's optimizer
    step count): a second gradient within the same step (gradient accumulation, a layer applied
    twice, a backward without an optimizer step) is a fresh tensor, so nothing handed out is
    overwritten while autograd or ``.grad`` may still hold it. A ``.grad`` that still lives in
    the storage at the next step (``zero_grad(set_to_none=False)``) makes the buffer let go of it
    (:meth:`release_if_shared`), so the new gradient is not written into the one it is added to.
    Storage written through since the last hand-out (a gradient added into ``.grad``, the
    sparsifier's masking) is cleared before reuse, as it is when the mask changes. A gradient
    kept past the next step otherwise changes with the storage: clone it to keep it.
    """

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self._storage: torch.Tensor | None = None
        self._index: torch.Tensor | None = None  # the mask positions written last time
        self._tick: int | None = None  # clock value at the last hand-out
        self._version = -1  # the storage's version counter right after the last hand-out
        self._values: torch.Tensor | None = None  # what the last hand-out wrote, compact

    def fill(self, values: torch.Tensor, s: LinearStructure) -> torch.Tensor:
        """A dense gradient of ``s.shape`` with ``values`` at ``s``'s positions, zeros elsewhere."""
        numel = s.shape[0] * s.shape[1]
        storage, tick = self._storage, self.clock()
        fits = storage is not None and (storage.numel(), storage.dtype, storage.device) == (
            numel,
            values.dtype,
            values.device,
        )
        if fits and tick == self._tick:
            return torch.zeros_like(storage).put_(s.index, values).view(s.shape)
        if not fits:
            storage = self._storage = torch.zeros(numel, dtype=values.dtype, device=values.device)
        elif self._index is not s.index or _version(storage) != self._version:
            storage.zero_()  # another mask, or written through since: clear what it holds
        self._index, self._tick = s.index, tick
        out = storage.put_(s.index, values).view(s.shape)
        self._version, self._values = _version(storage), values
        return out

    def values(self, grad: torch.Tensor | None, s: LinearStructure) -> torch.Tensor | None:
        """The nnz values of ``grad`` in ``s``'s order when ``grad`` :meth:`holds` exactly what
        the last hand-out wrote (the optimizer step over kept weights reads them instead of
        gathering them again), else None. Read-only."""
        return self._values if self.holds(grad, s) else None

    def release_if_shared(self, grad: torch.Tensor | None) -> None:
        """Let go of the storage if ``grad`` (a weight's current ``.grad``) lives in it."""
        if self._shares(grad):
            self._storage, self._index, self._tick, self._values = None, None, None, None

    def holds(self, grad: torch.Tensor | None, s: LinearStructure) -> bool:
        """Whether ``grad`` is exactly what the last hand-out wrote for ``s``, unwritten since.

        It must be the storage itself (not a sum autograd made with another use of the weight)
        with an unchanged version counter (no accumulation, no masking, no other in-place
        write), so it is zero off ``s``'s mask. Writes through ``.data`` bypass the counter.
        """
        return self._shares(grad) and self._index is s.index and _version(grad) == self._version

    def _shares(self, grad: torch.Tensor | None) -> bool:
        storage = self._storage
        return (
            grad is not None
            and storage is not None
            and grad.data_ptr() == storage.data_ptr()
            and grad.numel() == storage.numel()
            and grad.is_contiguous()
        )


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter; inference tensors (the autotuner's timing runs) have none, and
    nothing but inference-mode code can write to them, so they count as never written."""
    return 0 if t.is_inference() else t._version


class _SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,  # noqa: ANN001 - autograd's signature
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        structure: LinearStructure,
        dense_grad: bool,
        buffer: GradBuffer | None,
    ) -> torch.Tensor:
        values = structure.gather(weight)
        ctx.save_for_backward(x, weight)  # weight: autograd's check that it is not changed
        ctx.values, ctx.structure, ctx.dense_grad, ctx.buffer = (
            values,
            structure,
            dense_grad,
            buffer,
        )
        ctx.has_bias = bias is not None
        return sparse_linear_forward(x, values, bias, structure)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        x, weight = ctx.saved_tensors
        s = ctx.structure
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = sparse_grad_input(grad_y, ctx.values, s) if need_x else None
        grad_w = None
        if need_w:
            if ctx.dense_grad:
                grad_w = grad_y.t().mm(x)
            else:
                if ctx.buffer is not None:
                    ctx.buffer.release_if_shared(weight.grad)
                grad_w = sparse_grad_weight(grad_y, x, s, ctx.buffer)
        grad_b = grad_y.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    structure: LinearStructure,
    dense_grad: bool = False,
    grad_buffer: GradBuffer | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` on CSR kernels, differentiable in all three tensors.

    ``weight``'s gradient is dense with zeros off the mask, or the full dense gradient with
    ``dense_grad`` (what the masked dense layer gives before its gradient is masked); with
    ``grad_buffer`` it lives in that buffer's reused storage. Values of ``weight`` off the mask
    are never read. CPU, float32/float64.
    """
    if x.shape[-1] != structure.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the layer takes {structure.shape[1]}")
    flat = x.reshape(-1, structure.shape[1])
    y = _SparseLinearFunction.apply(flat, weight, bias, structure, dense_grad, grad_buffer)
    return y.reshape(*x.shape[:-1], structure.shape[0])
