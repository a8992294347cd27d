"""Per-layer sparsities from one target: ``uniform``, ``erk`` and ``global`` magnitude.

Each function maps ``{name: tensor or shape}`` to ``{name: sparsity}``. ERK follows RigL
(https://arxiv.org/abs/1911.11134): density proportional to (sum of dims)/(product of dims), with
layers that would exceed density 1 made dense and the rest re-solved so the kept budget holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError

__all__ = ["DISTRIBUTIONS", "erk", "global_magnitude", "resolve", "uniform"]

DISTRIBUTIONS = ("uniform", "erk", "global")


def uniform(shapes: Mapping[str, torch.Size], sparsity: float) -> dict[str, float]:
    """The same sparsity in every layer."""
    return {name: sparsity for name in shapes}


def erk(shapes: Mapping[str, torch.Size], sparsity: float, power: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel sparsities keeping ``(1 - sparsity) * sum(numel)`` weights in total.

    ``power`` scales the raw ERK score (1 = ERK, 0 = uniform).
    """
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / numels[name]) ** power for name, shape in shapes.items()}
    budget = (1.0 - sparsity) * sum(numels.values())
    dense: set[str] = set()
    while True:
        free = [name for name in shapes if name not in dense]
        remaining = budget - sum(numels[name] for name in dense)
        denominator = sum(raw[name] * numels[name] for name in free)
        eps = remaining / denominator if denominator > 0 else 0.0
        overflow = {name for name in free if eps * raw[name] > 1.0}
        if not overflow:
            break
        dense |= overflow
    return {name: 0.0 if name in dense else max(0.0, 1.0 - eps * raw[name]) for name in shapes}


def global_magnitude(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """Per-layer sparsities implied by one magnitude top-k over all ``weights``."""
    total = sum(w.numel() for w in weights.values())
    masks = mask_ops.global_topk(
        {n: w.abs() for n, w in weights.items()}, mask_ops.n_keep(total, sparsity)
    )
    return {name: 1.0 - float(m.sum()) / m.numel() for name, m in masks.items()}


def resolve(
    distribution: str,
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    erk_power: float = 1.0,
) -> dict[str, float]:
    """Per-layer target sparsities of ``weights`` under the named distribution."""
    shapes = {name: w.shape for name, w in weights.items()}
    if distribution == "uniform":
        return uniform(shapes, sparsity)
    if distribution == "erk":
        return erk(shapes, sparsity, erk_power)
    if distribution == "global":
        return global_magnitude(weights, sparsity)
    raise ConfigError(
        f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}"
    )
