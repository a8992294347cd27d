"""Per-layer sparsities from one target: ``uniform``, ``erk`` and ``global`` magnitude.

Each function maps ``{name: tensor or shape}`` to ``{name: sparsity}``. ERK follows RigL
(https://arxiv.org/abs/1911.11134): density proportional to (sum of dims)/(product of dims), with
layers that would exceed density 1 made dense and the rest re-solved so the kept budget holds.

Two controls apply to every distribution (jaxpruner's ``custom_sparsity_map`` and Intel Neural
Compressor's per-op ratios offer the same):

* ``min_density``: a per-layer floor, no layer keeps fewer than :func:`~sparsetrain.mask_ops.
  floor_count` of its weights (1% by default in :func:`sparsetrain.sparsify`). A global top-k
  over layers of very different scales would otherwise empty a whole layer (a 10-way
  classifier, an attention projection left with 5 of 16,384 weights). ERK re-solves the other
  layers so the budget holds; a global top-k takes the floors first and the rest by magnitude.
* ``overrides``: ``{name: sparsity}`` for chosen layers, which get exactly that sparsity; the
  other layers follow the distribution at the target sparsity among themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError

__all__ = [
    "DISTRIBUTIONS",
    "erk",
    "floored_layers",
    "global_magnitude",
    "global_masks",
    "resolve",
    "uniform",
]

DISTRIBUTIONS = ("uniform", "erk", "global")


def _floor_sparsity(numel: int, min_density: float) -> float:
    """The highest sparsity the floor allows a tensor of ``numel`` weights."""
    return 1.0 - mask_ops.floor_count(numel, min_density) / numel if numel else 0.0


def uniform(
    shapes: Mapping[str, torch.Size], sparsity: float, min_density: float = 0.0
) -> dict[str, float]:
    """The same sparsity in every layer (capped by the floor)."""
    return {
        name: min(sparsity, _floor_sparsity(math.prod(shape), min_density))
        for name, shape in shapes.items()
    }


def erk(
    shapes: Mapping[str, torch.Size],
    sparsity: float,
    power: float = 1.0,
    min_density: float = 0.0,
) -> dict[str, float]:
    """Erdos-Renyi-Kernel sparsities keeping ``(1 - sparsity) * sum(numel)`` weights in total.

    ``power`` scales the raw ERK score (1 = ERK, 0 = uniform). Layers whose share would exceed
    density 1 are made dense, layers whose share would fall below the floor are held at it, and
    the others are re-solved for the budget that is left.
    """
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    floors = {name: mask_ops.floor_count(n, min_density) for name, n in numels.items()}
    raw = {name: (sum(shape) / numels[name]) ** power for name, shape in shapes.items()}
    budget = (1.0 - sparsity) * sum(numels.values())
    dense: set[str] = set()
    floored: set[str] = set()
    while True:
        free = [name for name in shapes if name not in dense | floored]
        remaining = (
            budget
            - sum(numels[name] for name in dense)
            - sum(floors[name] for name in floored)
        )
        denominator = sum(raw[name] * numels[name] for name in free)
        eps = remaining / denominator if denominator > 0 else 0.0
        overflow = {name for name in free if eps * raw[name] > 1.0}
        if overflow:
            dense |= overflow
            continue
        under = {name for name in free if eps * raw[name] * numels[name] < floors[name]}
        if not under:
            break
        floored |= under

    def sparsity_of(name: str) -> float:
        if name in dense:
            return 0.0
        if name in floored:
            return _floor_sparsity(numels[name], min_density)
        return max(0.0, 1.0 - eps * raw[name])

    return {name: sparsity_of(name) for name in shapes}


def global_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    min_density: float = 0.0,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks of one top-k of ``scores`` over all layers, at ``sparsity`` of their total size.

    Layers in ``overrides`` take their own top-k at their own sparsity instead; the floor holds
    for the others. Scores of ``-inf`` are never kept unless a floor or override needs them.
    """
    overrides = dict(overrides or {})
    masks = {
        name: mask_ops.topk_mask(score, mask_ops.n_keep(score.numel(), overrides[name]))
        for name, score in scores.items()
        if name in overrides
    }
    pooled = {name: score for name, score in scores.items() if name not in overrides}
    if pooled:
        total = sum(score.numel() for score in pooled.values())
        floors = {n: mask_ops.floor_count(s.numel(), min_density) for n, s in pooled.items()}
        masks.update(mask_ops.global_topk(pooled, mask_ops.n_keep(total, sparsity), floors))
    return {name: masks[name] for name in scores}


def global_magnitude(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    min_density: float = 0.0,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer sparsities implied by one magnitude top-k over all ``weights``."""
    masks = global_masks(
        {n: w.abs() for n, w in weights.items()},
        sparsity,
        min_density=min_density,
        overrides=overrides,
    )
    return {name: 1.0 - float(m.sum()) / m.numel() for name, m in masks.items()}


def floored_layers(
    sparsities: Mapping[str, float], numels: Mapping[str, int], min_density: float
) -> list[str]:
    """The layers whose sparsity is held at the floor (nothing when there is no floor)."""
    if min_density <= 0.0:
        return []
    return [
        name
        for name, s in sparsities.items()
        if numels[name] and s > 0.0 and s >= _floor_sparsity(numels[name], min_density) - 1e-12
    ]


def resolve(
    distribution: str,
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    erk_power: float = 1.0,
    min_density: float = 0.0,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer target sparsities of ``weights`` under the named distribution."""
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(
            f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}"
        )
    overrides = dict(overrides or {})
    if distribution == "global":
        return global_magnitude(weights, sparsity, min_density=min_density, overrides=overrides)
    shapes = {name: w.shape for name, w in weights.items() if name not in overrides}
    if distribution == "uniform":
        out = uniform(shapes, sparsity, min_density)
    else:
        out = erk(shapes, sparsity, erk_power, min_density)
    out.update({name: overrides[name] for name in weights if name in overrides})
    return {name: out[name] for name in weights}
