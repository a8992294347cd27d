"""Checking an export: the exported model must compute what the masked model computes.

The error is measured relative to the output scale (the largest absolute reference output), so
the same tolerance fits logits of any magnitude. Float32 kernels that only reorder sums (CSR vs
dense matmul) stay far below 1e-4 of the scale; half-precision exports get 1e-2.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sparsetrain.errors import ExportError

__all__ = ["default_tolerance", "output_error", "synthesize_input", "verify_export"]

log = logging.getLogger(__name__)

_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 1e-2}
_VERIFY_BATCH = 8


def default_tolerance(dtype: torch.dtype) -> float:
    """Allowed max error over output scale: 1e-4 for float32/64, 1e-2 for half precision."""
    return _TOLERANCE.get(dtype, 1e-4)


def synthesize_input(
    model: nn.Module,
    like: torch.Tensor | None = None,
    *,
    batch_size: int = _VERIFY_BATCH,
    seed: int = 0,
) -> torch.Tensor:
    """A seeded random batch for checking ``model``.

    With ``like`` (e.g. one captured input) the batch has its feature shape and dtype; integer
    inputs such as token ids are repeated as they are, since random ids may be out of range.
    Without it, the shape comes from the first layer when that is a Linear (a convolution's input
    size cannot be inferred, so pass ``example_input``).
    """
    if like is not None:
        if not like.is_floating_point():
            reps = (batch_size // max(1, like.shape[0]) + 1,) + (1,) * (like.dim() - 1)
            return like.repeat(reps)[:batch_size]
        g = torch.Generator().manual_seed(seed)
        shape = (batch_size, *like.shape[1:])
        return torch.randn(shape, generator=g, dtype=torch.float32).to(like.dtype)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            g = torch.Generator().manual_seed(seed)
            dtype = module.weight.dtype
            return torch.randn(batch_size, module.in_features, generator=g).to(dtype)
        if isinstance(module, nn.modules.conv._ConvNd):
            raise ExportError(
                f"cannot infer an input size for the first layer {name!r} "
                f"({type(module).__name__}); pass example_input (one batch) to check the export"
            )
    raise ExportError("the model has no Linear or Conv layer; pass example_input to check it")


def _flatten(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for key in sorted(out) for t in _flatten(out[key])]
    if isinstance(out, Sequence) and not isinstance(out, str):
        return [t for item in out for t in _flatten(item)]
    return []


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), None


def _run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    device, dtype = _device_dtype(model)
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() and dtype else x.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            outs = _flatten(model(x))
    finally:
        model.train(was_training)
    return [o.detach().to("cpu", torch.float64) for o in outs]


def output_error(reference: nn.Module, exported: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max absolute difference, output scale) between the two models' eval-mode outputs on x."""
    ref, out = _run(reference, x), _run(exported, x)
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out, strict=True)):
        raise ExportError(
            f"exported model returns outputs of shapes {[tuple(o.shape) for o in out]}, "
            f"the masked model {[tuple(r.shape) for r in ref]}"
        )
    if not ref:
        raise ExportError("the model returns no tensor; cannot check the export")
    err = max(
        float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(ref, out, strict=True)
    )
    scale = max(float(a.abs().max()) if a.numel() else 0.0 for a in ref)
    return err, scale if scale > 0 else 1.0


def verify_export(
    reference: nn.Module,
    exported: nn.Module,
    example_input: torch.Tensor,
    *,
    tolerance: float | None = None,
    fmt: str = "export",
) -> float:
    """Raise ExportError unless ``exported`` matches ``reference`` within ``tolerance`` of the
    output scale on ``example_input``; return the relative error found."""
    if tolerance is None:
        _, dtype = _device_dtype(exported)
        tolerance = default_tolerance(dtype or torch.float32)
    err, scale = output_error(reference, exported, example_input)
    rel = err / scale
    if not rel <= tolerance:  # also catches NaN
        raise ExportError(
            f"{fmt} export does not reproduce the masked model: max error {err:.3g} is "
            f"{rel:.3g} of the output scale {scale:.3g} (tolerance {tolerance:g})"
        )
    log.info(
        "%s export checked: max error %.3g of output scale (tolerance %g)", fmt, rel, tolerance
    )
    return rel
