"""One sub-network out of an AST checkpoint, read from the saved dicts alone.

Tools (``sparsetrain eval|report|export --subnet``) get a checkpoint shaped as a plain run's
without rebuilding the method: the model state_dict has the unmodified model's keys (that
sub-network's BatchNorm copies) with its masks baked into the weights, and the sparsifier state
carries its masks and targets.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sparsetrain.errors import ConfigError

__all__ = ["subnet_checkpoint", "subnet_index"]


def subnet_index(which: int | float, sparsities: Sequence[float]) -> int:
    """Index of a sub-network given by index (int) or by its sparsity (float)."""
    if isinstance(which, numbers.Integral) and not isinstance(which, bool):
        if 0 <= int(which) < len(sparsities):
            return int(which)
    elif isinstance(which, numbers.Real) and not isinstance(which, bool):
        for i, s in enumerate(sparsities):
            if math.isclose(float(which), s, abs_tol=1e-6):
                return i
    raise ConfigError(
        f"ast: unknown sub-network {which!r}; give an index below {len(sparsities)} "
        f"or one of the sparsities {list(sparsities)}"
    )


def subnet_checkpoint(checkpoint: Mapping[str, Any], subnet: int | float | None) -> dict[str, Any]:
    """One sub-network of an AST checkpoint (``model`` + ``sparsifier`` state), shaped as a plain
    run's: its ``model`` state_dict loads strict into the unmodified model (that sub-network's
    BatchNorm copies, its masks baked in) and its sparsifier masks and targets are that
    sub-network's. Works on the saved dicts alone, so tools need not rebuild the method.
    """
    state = checkpoint["sparsifier"]
    if state.get("method") != "ast":
        raise ConfigError(
            f"sub-networks need an AST checkpoint; this one is {state.get('method')!r}"
        )
    method = state["method_state"]
    if subnet is None:
        raise ConfigError(
            f"this AST checkpoint holds {len(method['sparsities'])} sub-networks (sparsity "
            f"{method['sparsities']}); choose one (--subnet) by index or sparsity"
        )
    i = subnet_index(subnet, method["sparsities"])
    heads = [f"{name}.copies." for name in method["switchable_bn"]]
    model: dict[str, torch.Tensor] = {}
    for key, value in checkpoint["model"].items():
        head = next((h for h in heads if key.startswith(h)), None)
        if head is None:
            model[key] = value
            continue
        index, _, rest = key[len(head) :].partition(".")
        if int(index) == i:
            model[head[: -len("copies.")] + rest] = value
    masks = {name: stack[i].clone() for name, stack in method["stack"].items()}
    for name, mask in masks.items():
        dense = torch.where(state["masks"][name], checkpoint["model"][name], state["shadow"][name])
        model[name] = dense * mask
    sparsifier = {**state, "masks": masks, "targets": dict(method["goals"][i])}
    return {**checkpoint, "model": model, "sparsifier": sparsifier}
