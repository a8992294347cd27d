"""Baking masks into a copy of the model: the reference every other export format is checked
against, and the ``dense`` format itself (a plain ``state_dict`` that loads strictly into the
unmodified model class)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from sparsetrain.errors import ExportError

__all__ = ["bake", "check_masks", "check_baked"]


def check_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Bool masks on the parameters' devices, after checking names and shapes against ``model``."""
    if masks is None:
        return {}
    params = dict(model.named_parameters())
    out = {}
    for name, mask in masks.items():
        if name not in params:
            raise ExportError(f"mask {name!r} names no parameter of the model")
        if mask.shape != params[name].shape:
            raise ExportError(
                f"mask {name!r} has shape {tuple(mask.shape)}, "
                f"the parameter has {tuple(params[name].shape)}"
            )
        out[name] = mask.to(device=params[name].device, dtype=torch.bool)
    return out


def bake(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """Deep copy of ``model`` with every masked-off weight set to zero; the original is untouched."""
    checked = check_masks(model, masks)
    baked = copy.deepcopy(model)
    params = dict(baked.named_parameters())
    with torch.no_grad():
        for name, mask in checked.items():
            params[name].masked_fill_(~mask, 0.0)
    return baked


def check_baked(
    model: nn.Module, exported: nn.Module, masks: Mapping[str, torch.Tensor] | None
) -> None:
    """The dense format's check: same keys as the plain model, zeros everywhere a mask is off.

    Outputs need no comparison here: the baked model *is* the reference the other formats are
    checked against, so its own check is structural.
    """
    expected = set(model.state_dict())
    got = set(exported.state_dict())
    if expected != got:
        diff = sorted(expected ^ got)
        raise ExportError(f"dense export changed the state_dict keys: {diff[:5]}")
    params = dict(exported.named_parameters())
    for name, mask in check_masks(exported, masks).items():
        if params[name].detach().masked_select(~mask).any():
            raise ExportError(f"dense export left non-zero weights outside the mask of {name!r}")
