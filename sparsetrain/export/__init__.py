"""Export a trained sparse model to a format that is smaller or really runs faster.

Formats (``export_model(model, masks, format)``):

* ``dense``: masks baked in; a plain ``state_dict`` that loads strictly into the model class.
* ``compressed``: a lossless file of kept values plus a packed bitmask (0.13x of dense at 90%
  sparsity, fp32); read back with :func:`load_compressed`.
* ``sparse-cpu``: Linear layers on CSR kernels where timing at the export batch size shows a
  win (:class:`SparseLinear`); saved with :func:`save_sparse_cpu`, read with
  :func:`load_sparse_cpu`.
* ``semi-structured``: 2:4-masked Linear layers on NVIDIA sparse tensor cores (CUDA only).

Every export is checked before it is returned: ``dense`` structurally (the baked model is the
reference), ``compressed`` by a bit-exact round trip through the file, and the kernel formats by
comparing outputs with the masked model on a batch (:mod:`sparsetrain.export.verify`). A failed
check raises :class:`~sparsetrain.errors.ExportError`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparsetrain.errors import ConfigError, ExportError
from sparsetrain.export.compressed import load_compressed, save_compressed
from sparsetrain.export.dense import bake, check_baked, check_masks
from sparsetrain.export.semi_structured import check_two_four, to_semi_structured
from sparsetrain.export.sparse_cpu import (
    LayerDecision,
    SparseLinear,
    load_sparse_cpu,
    save_sparse_cpu,
    to_sparse_cpu,
)
from sparsetrain.export.verify import synthesize_input, verify_export

__all__ = [
    "FORMATS",
    "LayerDecision",
    "SparseLinear",
    "bake",
    "check_two_four",
    "export_model",
    "load_compressed",
    "load_sparse_cpu",
    "save_compressed",
    "save_sparse_cpu",
    "synthesize_input",
    "verify_export",
]

log = logging.getLogger(__name__)

# Format name -> the options only it accepts (on top of example_input, path, tolerance).
FORMATS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "compressed": (),
    "sparse-cpu": ("batch_size", "min_speedup", "rounds"),
    "semi-structured": ("dtype", "device"),
}


def _check_options(fmt: str, options: Mapping[str, Any]) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    unknown = sorted(set(options) - set(FORMATS[fmt]))
    if unknown:
        valid = ", ".join((*FORMATS[fmt], "example_input", "path", "tolerance"))
        raise ConfigError(
            f"export format {fmt!r} takes no option(s) {', '.join(unknown)}; valid: {valid}"
        )


def _check_lossless(reference: nn.Module, loaded: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in reference.state_dict().items():
        if name not in loaded or not torch.equal(tensor.cpu(), loaded[name]):
            raise ExportError(f"compressed round trip changed tensor {name!r}")


def _pattern_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks read from the zeros of an already-baked model (weights with at least one zero)."""
    return {
        name: p.detach() != 0
        for name, p in model.named_parameters()
        if p.dim() >= 2 and not bool(p.detach().all())
    }


def export_model(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    format: str = "dense",
    *,
    example_input: torch.Tensor | None = None,
    path: str | os.PathLike | None = None,
    tolerance: float | None = None,
    **options: Any,
) -> nn.Module:
    """Export ``model`` with ``masks`` baked in to ``format``, checked; ``model`` is untouched.

    Args:
        model: the trained model (any ``nn.Module``).
        masks: bool masks by fully-qualified parameter name (``sp.masks``); None when the
            model's weights are already zero where they should be.
        format: one of :data:`FORMATS`.
        example_input: a batch to compare outputs on; synthesized from the first Linear layer
            when omitted (convolutional models need it).
        path: where to write the export (required for ``compressed``; not available for
            ``semi-structured``, whose tensors live in GPU memory).
        tolerance: allowed max output error over the output scale (default 1e-4 for float32,
            1e-2 for half precision).
        **options: format options: ``sparse-cpu`` takes ``batch_size`` (64), ``min_speedup``
            (1.1) and ``rounds`` (5); ``semi-structured`` takes ``dtype`` (float16) and ``device``.

    Returns:
        The model as the export runs it: the baked model (``dense``), the model loaded back from
        the file (``compressed``), or the model with sparse kernels, whose per-layer choices are in
        ``export_decisions`` (``sparse-cpu``, ``semi-structured``).
    """
    _check_options(format, options)
    check_masks(model, masks)
    reference = bake(model, masks)
    if format == "dense":
        check_baked(model, reference, masks)
        if path is not None:
            torch.save(reference.state_dict(), path)
        return reference
    if format == "compressed":
        if path is None:
            raise ConfigError("the compressed format writes a file: pass path=")
        save_compressed(reference, None, path)
        loaded = load_compressed(path)
        _check_lossless(reference, loaded)
        exported = copy.deepcopy(reference)
        exported.load_state_dict(loaded, strict=True)
        return exported
    if format == "semi-structured" and path is not None:
        raise ConfigError(
            "semi-structured weights live in GPU memory and cannot be saved; save the dense "
            "export and run export_model(..., 'semi-structured') on the GPU machine"
        )
    if example_input is None:
        example_input = synthesize_input(reference)
    if format == "sparse-cpu":
        exported = to_sparse_cpu(copy.deepcopy(reference), **options)
    else:
        pattern = check_masks(reference, masks) if masks else _pattern_masks(reference)
        exported = to_semi_structured(copy.deepcopy(reference), pattern, **options)
    verify_export(reference, exported, example_input, tolerance=tolerance, fmt=format)
    if path is not None:
        save_sparse_cpu(exported, path)
        log.info("wrote sparse-cpu export to %s", os.fspath(path))
    return exported
