"""The ``semi-structured`` format: 2:4 Linear weights on NVIDIA sparse tensor cores.

``torch.sparse.to_sparse_semi_structured`` stores two values of every group of four consecutive
input channels plus metadata, and runs ``F.linear`` on cuSPARSELt/CUTLASS. It exists on CUDA only
(it raises on CPU in torch 2.13), accepts 2-D weights whose sides are multiples of a per-dtype
block (e.g. 32x64 for float16 on CUTLASS; layers that do not fit stay dense), and only models trained with 2:4 masks fit it. Convolutions and
Linear layers of unsupported shape stay dense and are reported as such.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from sparsetrain.errors import ExportError
from sparsetrain.export.sparse_cpu import LayerDecision

__all__ = ["check_two_four", "to_semi_structured"]

log = logging.getLogger(__name__)


def check_two_four(name: str, mask: torch.Tensor) -> None:
    """Raise ExportError unless every group of 4 consecutive input channels keeps at most 2."""
    if mask.dim() < 2:
        raise ExportError(f"{name}: 2:4 sparsity needs a weight with >= 2 dims")
    in_channels = mask.shape[1]
    if in_channels % 4:
        raise ExportError(
            f"{name}: input size {in_channels} is not a multiple of 4, so it cannot be 2:4 sparse"
        )
    channels_last = mask.movedim(1, -1) if mask.dim() > 2 else mask
    counts = channels_last.reshape(-1, 4).sum(dim=1)
    bad = int((counts > 2).sum())
    if bad:
        raise ExportError(
            f"{name}: mask is not 2:4 ({bad} of {counts.numel()} groups of 4 input channels keep "
            "more than 2); train with 2:4 masks or export with another format"
        )


def to_semi_structured(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Convert ``model`` (already baked, modified in place) to ``dtype`` on a CUDA ``device`` with
    its 2:4-masked Linear weights in semi-structured form; decisions in ``model.export_decisions``.

    Every masked Linear weight must be 2:4 (checked first, so the message is the same on any
    machine); masked convolutions stay dense.
    """
    modules = dict(model.named_modules())
    linears = {}
    for pname in masks:
        owner, _, leaf = pname.rpartition(".")
        if leaf == "weight" and type(modules.get(owner)) is nn.Linear:
            check_two_four(pname, masks[pname])
            linears[owner] = modules[owner]
    if not linears:
        raise ExportError("semi-structured export needs at least one 2:4-masked Linear layer")
    if not torch.cuda.is_available():
        raise ExportError(
            "semi-structured 2:4 export needs a CUDA GPU (torch's to_sparse_semi_structured has "
            "no CPU kernel); use format 'sparse-cpu' on CPU"
        )
    from torch.sparse import to_sparse_semi_structured

    model.to(device=device or "cuda", dtype=dtype)
    decisions: dict[str, LayerDecision] = {}
    for pname in masks:
        owner = pname.rpartition(".")[0]
        module = modules.get(owner)
        if module is None or owner in decisions:
            continue
        density = float(masks[pname].float().mean())
        if owner in linears:
            try:  # the kernels' shape/dtype rules differ by backend: let torch decide
                sparse = to_sparse_semi_structured(module.weight.detach().contiguous())
            except RuntimeError as exc:
                reason = str(exc).splitlines()[0]
                decision = LayerDecision(owner, "Linear", density, "dense", reason)
            else:
                module.weight = nn.Parameter(sparse, requires_grad=False)
                decision = LayerDecision(owner, "Linear", density, "sparse", "2:4 kernel")
        else:
            reason = f"no 2:4 kernel for {type(module).__name__}"
            decision = LayerDecision(owner, type(module).__name__, density, "dense", reason)
        decisions[owner] = decision
        log.info("%s: %s (%s)", owner, decision.choice, decision.reason)
    model.export_decisions = decisions
    return model
