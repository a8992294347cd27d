"""Conv1d/Conv2d forward and backward as direct sparse convolutions over the mask's nonzeros.

im2col + CSR is far slower than oneDNN (docs/performance.md), so the compiled kernels
(:mod:`sparsetrain.kernels.extension`) loop over the nonzeros ``w[co, ci, ky, kx]`` instead, as
SparseProp does: each one adds a shifted input plane, times the weight, into an output plane.
Activations are first packed batch-innermost (``[tile][channel][row][column][T]``, zero padding
materialised), so every such step is a SIMD axpy over ``T`` images for any stride, dilation and
padding. The three products of a training step:

* forward: per output channel, the sum over its nonzeros (threads over output rows);
* ``grad_x``: at stride 1 the same kernel over the padded output gradient with the transposed,
  flipped pattern (per input channel); at other strides a scatter per input channel;
* ``grad_W``: one dot product per kept weight, so only the kept positions get a gradient, zeros
  elsewhere, exactly the masked dense gradient there. ``dense_grad=True`` (RigL's update steps)
  gives the full dense product instead.

Values are gathered from the dense weight at every call, as for Linear layers; a mask change
needs a new :class:`ConvStructure`. Conv1d runs as a Conv2d of height 1. Groups other than 1
are not supported (those layers stay dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sparsetrain.kernels.extension import ConvKernels
from sparsetrain.kernels.sparse_linear import GradBuffer, KeptIndex

__all__ = [
    "ConvGeometry",
    "ConvStructure",
    "Workspace",
    "memory_format",
    "sparse_conv",
    "sparse_conv_backward",
    "sparse_conv_forward",
]


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, dilation and zero padding of a 2-D convolution (a Conv1d has height 1)."""

    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, bottom, left, right

    def output_size(self, h: int, w: int, kernel: tuple[int, int]) -> tuple[int, int]:
        (sh, sw), (dh, dw), (pt, pb, pl, pr) = self.stride, self.dilation, self.padding
        return (
            (h + pt + pb - dh * (kernel[0] - 1) - 1) // sh + 1,
            (w + pl + pr - dw * (kernel[1] - 1) - 1) // sw + 1,
        )


@dataclass(frozen=True, eq=False)
class ConvStructure(KeptIndex):
    """The nonzeros of one convolution mask, by output channel and by input channel.

    ``index`` holds the flat positions of the kept weights in row-major order (sorted by output
    channel: the order of every values vector); ``perm_t`` orders them by input channel for the
    input gradient. Offsets into packed buffers depend on the input size and are cached per
    geometry.
    """

    shape: tuple[int, int]  # (out_channels, in_channels * kh * kw), for GradBuffer
    kernel: tuple[int, int]  # (kh, kw)
    index: torch.Tensor
    rowptr: torch.Tensor  # by output channel
    out_channel: torch.Tensor
    in_channel: torch.Tensor
    ky: torch.Tensor
    kx: torch.Tensor
    rowptr_t: torch.Tensor  # by input channel
    perm_t: torch.Tensor
    _offsets: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> ConvStructure:
        """Both orders from a bool mask of a Conv2d (4-D) or Conv1d (3-D) weight."""
        if mask.dim() not in (3, 4):
            raise ValueError(f"a convolution mask is 3-D or 4-D, got shape {tuple(mask.shape)}")
        if mask.dim() == 3:
            mask = mask.unsqueeze(2)
        co, ci, kh, kw = mask.shape
        index = mask.bool().reshape(-1).nonzero().squeeze(1)
        per_out = ci * kh * kw
        out_channel = index.div(per_out, rounding_mode="floor")
        rest = index - out_channel * per_out
        in_channel = rest.div(kh * kw, rounding_mode="floor")
        rest = rest - in_channel * kh * kw
        ky = rest.div(kw, rounding_mode="floor")
        bounds = torch.arange(co + 1, device=index.device) * per_out
        counts_t = torch.bincount(in_channel, minlength=ci)
        return cls(
            shape=(co, per_out),
            kernel=(kh, kw),
            index=index,
            rowptr=torch.searchsorted(index, bounds),
            out_channel=out_channel,
            in_channel=in_channel,
            ky=ky,
            kx=rest - ky * kw,
            rowptr_t=torch.cat([counts_t.new_zeros(1), counts_t.cumsum(0)]),
            perm_t=torch.sort(in_channel, stable=True).indices,
        )

    def offsets(self, kind: str, *dims: int) -> torch.Tensor:
        """Per-nonzero element offsets into a packed buffer, cached per ``(kind, dims)``.

        ``input`` (dims: padded height, width, tile, dilation): where each nonzero reads its
        input plane, by output channel. ``grad`` (dims: the padded output gradient's height and
        width, tile, dilation, padding top and left, gradient padding top and left): where each
        nonzero reads the output gradient, by input channel. ``scatter_dy`` (dims: output height
        and width, tile) and ``scatter_dx`` (padded width, tile, dilation): the two ends of the
        scatter, by input channel.
        """
        key = (kind, *dims)
        cached = self._offsets.get(key)
        if cached is not None:
            return cached
        if kind == "input":
            hb, wb, t, dh, dw = dims
            offs = ((self.in_channel * hb + self.ky * dh) * wb + self.kx * dw) * t
        elif kind == "grad":
            hq, wq, t, dh, dw, pt, pl, qt, ql = dims
            rows = self.out_channel * hq + pt + qt - self.ky * dh
            offs = (rows * wq + pl + ql - self.kx * dw) * t
            offs = offs.index_select(0, self.perm_t)
        elif kind == "scatter_dy":
            oh, ow, t = dims
            offs = (self.out_channel * (oh * ow * t)).index_select(0, self.perm_t)
        elif kind == "scatter_dx":
            wb, t, dh, dw = dims
            offs = ((self.ky * dh) * wb + self.kx * dw) * t
            offs = offs.index_select(0, self.perm_t)
        else:
            raise ValueError(f"unknown offsets {kind!r}")
        self._offsets[key] = offs = offs.contiguous()
        return offs


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout convolutions keep for ``x``'s outputs and gradients."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Workspace:
    """Packed buffers reused from call to call, one per role (packed input, output, output
    gradient, input gradient).

    A fresh tensor of activation size that malloc maps anew costs a page fault per 4 KiB page on
    first touch, longer than the sparse products themselves (8 MiB: ~8 ms on the benchmark
    machine, against ~3 ms for the forward kernel of a 64-channel 3x3 convolution on 32x32 maps,
    batch 32, at 95% sparsity). Each buffer is used only inside one kernel call,
    so one workspace serves every layer of a model, sized by the largest; calls must not run
    concurrently from several threads.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` in ``role``'s storage (grown when too small)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = self._buffers[role] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


def _pack(
    k: ConvKernels, x: torch.Tensor, hb: int, wb: int, top: int, left: int, buffer: torch.Tensor
) -> torch.Tensor:
    """``x`` (N, C, H, W), any strides, packed into ``buffer`` (tiles, C, hb, wb, T): pixel
    (top + y, left + x) is ``x[:, :, y, x]``, zeros around it and for missing images."""
    n, c, h, w = x.shape
    nb = buffer.shape[0]
    k.fn("pack", x.dtype)(
        x.data_ptr(), buffer.data_ptr(), n, c, h, w, *x.stride(), nb, hb, wb, top, left,
        _threads(),
    )  # fmt: skip
    return buffer


def _packed_shape(k: ConvKernels, x: torch.Tensor, hb: int, wb: int) -> tuple[int, ...]:
    t = k.tiles[x.dtype]
    return (-(-x.shape[0] // t), x.shape[1], hb, wb, t)


def _unpack(
    k: ConvKernels,
    packed: torch.Tensor,
    n: int,
    h: int,
    w: int,
    top: int,
    left: int,
    layout: torch.memory_format,
) -> torch.Tensor:
    """The (n, C, h, w) window at (top, left) of a packed buffer, as a new tensor in
    ``layout``."""
    nb, c, hs, ws, _ = packed.shape
    out = torch.empty(n, c, h, w, dtype=packed.dtype, device=packed.device)
    out = out.contiguous(memory_format=layout)
    k.fn("unpack", packed.dtype)(
        packed.data_ptr(), out.data_ptr(), n, c, h, w, *out.stride(), nb, hs, ws, top, left,
        _threads(),
    )  # fmt: skip
    return out


def sparse_conv_forward(
    k: ConvKernels,
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    s: ConvStructure,
    g: ConvGeometry,
    ws: Workspace,
) -> torch.Tensor:
    """The convolution of a 4-D ``x`` with the kept ``values`` (``s.index`` order)."""
    n, ci, h, w = x.shape
    (pt, pb, pl, pr), (sh, sw), (dh, dw) = g.padding, g.stride, g.dilation
    oh, ow = g.output_size(h, w, s.kernel)
    hb, wb = h + pt + pb, w + pl + pr
    xb = _pack(k, x, hb, wb, pt, pl, ws.take("x", _packed_shape(k, x, hb, wb), x.dtype))
    nb, t = xb.shape[0], xb.shape[-1]
    yb = ws.take("y", (nb, s.shape[0], oh, ow, t), x.dtype)
    bias = None if bias is None else bias.detach().contiguous()
    k.fn("gather", x.dtype)(
        xb.data_ptr(), yb.data_ptr(), s.rowptr.data_ptr(),
        s.offsets("input", hb, wb, t, dh, dw).data_ptr(), values.data_ptr(), _ptr(bias),
        nb, s.shape[0], oh, ow, sh, sw, wb * t, ci * hb * wb * t, _threads(),
    )  # fmt: skip
    return _unpack(k, yb, n, oh, ow, 0, 0, memory_format(x))


def sparse_conv_backward(
    k: ConvKernels,
    grad_y: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    s: ConvStructure,
    g: ConvGeometry,
    need_input: bool,
    need_weight: bool,
    ws: Workspace,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``grad_x`` (4-D, in ``x``'s memory format) and the weight gradient's kept values (in
    ``s.index`` order)."""
    n, ci, h, w = x.shape
    co, (oh, ow) = s.shape[0], grad_y.shape[2:]
    (pt, pb, pl, pr), (sh, sw), (dh, dw) = g.padding, g.stride, g.dilation
    kh, kw = s.kernel
    hb, wb = h + pt + pb, w + pl + pr
    dtype, threads = grad_y.dtype, _threads()
    gather_grad = need_input and (sh, sw) == (1, 1)
    # At stride 1 the input gradient reads the output gradient with enough zeros around it.
    qt, qb = (max(0, (kh - 1) * dh - pt), max(0, (kh - 1) * dh - pb)) if gather_grad else (0, 0)
    ql, qr = (max(0, (kw - 1) * dw - pl), max(0, (kw - 1) * dw - pr)) if gather_grad else (0, 0)
    hq, wq = oh + qt + qb, ow + ql + qr
    gyb = ws.take("grad_y", _packed_shape(k, grad_y, hq, wq), dtype)
    gyb = _pack(k, grad_y, hq, wq, qt, ql, gyb)
    nb, t = gyb.shape[0], gyb.shape[-1]
    grad_x = None
    values_t = values.index_select(0, s.perm_t) if need_input else None  # kept alive: a pointer
    if gather_grad:
        dxb = ws.take("grad_x", (nb, ci, h, w, t), dtype)
        offs = s.offsets("grad", hq, wq, t, dh, dw, pt, pl, qt, ql)
        k.fn("gather", dtype)(
            gyb.data_ptr(), dxb.data_ptr(), s.rowptr_t.data_ptr(), offs.data_ptr(),
            values_t.data_ptr(), None, nb, ci, h, w, 1, 1, wq * t, co * hq * wq * t, threads,
        )  # fmt: skip
        grad_x = _unpack(k, dxb, n, h, w, 0, 0, memory_format(x))
    elif need_input:
        dxb = ws.take("grad_x", (nb, ci, hb, wb, t), dtype).zero_()
        k.fn("scatter", dtype)(
            gyb.data_ptr(), dxb.data_ptr(), s.rowptr_t.data_ptr(),
            s.offsets("scatter_dy", oh, ow, t).data_ptr(),
            s.offsets("scatter_dx", wb, t, dh, dw).data_ptr(), values_t.data_ptr(), nb, ci,
            oh, ow, sh, sw, co * oh * ow * t, wb * t, hb * wb * t, threads,
        )  # fmt: skip
        grad_x = _unpack(k, dxb, n, h, w, pt, pl, memory_format(x))
    grad_values = None
    if need_weight:
        xb = _pack(k, x, hb, wb, pt, pl, ws.take("x", _packed_shape(k, x, hb, wb), dtype))
        grad_values = torch.empty(s.nnz, dtype=dtype, device=grad_y.device)
        k.fn("grad_weight", dtype)(
            xb.data_ptr(), gyb.data_ptr(), s.rowptr.data_ptr(),
            s.offsets("input", hb, wb, t, dh, dw).data_ptr(), grad_values.data_ptr(), nb, co, oh,
            ow, sh, sw, wb * t, ci * hb * wb * t, (qt * wq + ql) * t, wq * t, hq * wq * t,
            co * hq * wq * t, threads,
        )  # fmt: skip
    return grad_x, grad_values


def dense_weight_grad(
    x: torch.Tensor, weight4: torch.Tensor, grad_y: torch.Tensor, g: ConvGeometry
) -> torch.Tensor:
    """The full dense weight gradient (what the masked dense layer computes before masking)."""
    (pt, pb, pl, pr) = g.padding
    if (pt, pl) != (pb, pr):
        x, padding = F.pad(x, (pl, pr, pt, pb)), [0, 0]
    else:
        padding = [pt, pl]
    return torch.ops.aten.convolution_backward(
        grad_y, x, weight4, None, list(g.stride), padding, list(g.dilation), False, [0, 0], 1,
        [False, True, False],
    )[1]  # fmt: skip


class _SparseConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,  # noqa: ANN001 - autograd's signature
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kernels: ConvKernels,
        structure: ConvStructure,
        geometry: ConvGeometry,
        dense_grad: bool,
        buffer: GradBuffer | None,
        workspace: Workspace,
    ) -> torch.Tensor:
        values = structure.gather(weight)
        y = sparse_conv_forward(kernels, x, values, bias, structure, geometry, workspace)
        ctx.save_for_backward(x, weight)  # x is packed again in the backward
        ctx.values, ctx.kernels, ctx.structure, ctx.geometry = values, kernels, structure, geometry
        ctx.dense_grad, ctx.buffer, ctx.workspace = dense_grad, buffer, workspace
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):  # noqa: ANN001, ANN205 - autograd's signature
        x, weight = ctx.saved_tensors
        s, g = ctx.structure, ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_values = sparse_conv_backward(
            ctx.kernels, grad_y, x, ctx.values, s, g, need_x, need_w and not ctx.dense_grad,
            ctx.workspace,
        )  # fmt: skip
        grad_w = None
        if need_w and ctx.dense_grad:
            grad_w = dense_weight_grad(x, weight.view(s.shape[0], -1, *s.kernel), grad_y, g)
            grad_w = grad_w.view(weight.shape)
        elif need_w:
            if ctx.buffer is not None:
                ctx.buffer.release_if_shared(weight.grad)
                grad_w = ctx.buffer.fill(grad_values, s).view(weight.shape)
            else:
                grad_w = weight.new_zeros(weight.numel()).put_(s.index, grad_values)
                grad_w = grad_w.view(weight.shape)
        grad_b = grad_y.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def sparse_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernels: ConvKernels,
    structure: ConvStructure,
    geometry: ConvGeometry,
    dense_grad: bool = False,
    grad_buffer: GradBuffer | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``F.conv2d``/``F.conv1d`` of ``x`` with ``weight * mask`` (zero padding, groups 1) on
    the compiled kernels, differentiable in all three tensors.

    ``weight``'s gradient is dense with zeros off the mask (in ``grad_buffer``'s reused storage
    when given), or the full dense gradient with ``dense_grad``. ``workspace`` holds the
    packed buffers (pass the same one on every call, see :class:`Workspace`). CPU,
    float32/float64.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"expected a 3-D or 4-D input, got shape {tuple(x.shape)}")
    one_d = x.dim() == 3
    x4 = x.unsqueeze(2) if one_d else x
    fn = _SparseConvFunction.apply
    ws = workspace or Workspace()
    y = fn(x4, weight, bias, kernels, structure, geometry, dense_grad, grad_buffer, ws)
    return y.squeeze(2) if one_d else y
