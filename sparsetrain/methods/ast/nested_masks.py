"""Mask arithmetic for nested sub-networks: selections confined to a denser sub-network's mask.

Pure functions on bool masks, built on :mod:`sparsetrain.mask_ops`. A *support* is the mask a
result must stay inside (the next denser sub-network's mask when nesting is enforced, all ones
otherwise); every function here returns a subset of its support, so sub-networks computed densest
first are nested by construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sparsetrain import mask_ops

__all__ = ["is_nested", "nm_within", "prune_regrow", "select_within"]


def select_within(
    scores: Mapping[str, torch.Tensor],
    support: Mapping[str, torch.Tensor],
    k: int,
    prefer: Mapping[str, torch.Tensor] | None = None,
    floors: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """One top-``k`` over several tensors, restricted to ``support``.

    Each tensor first keeps its ``floors`` count (within its support), then positions of
    ``prefer`` inside the support are taken (a repair that moves as few positions as possible),
    the rest by highest score. ``k`` is clipped to the support's size, so the result has exactly
    ``min(k, |support|)`` ones (more only where the floors need them).
    """
    ranked = {}
    for name, score in scores.items():
        rank = torch.where(support[name], score.detach().float(), -math.inf)
        if prefer is not None:
            rank = torch.where(prefer[name] & support[name], math.inf, rank)
        ranked[name] = rank
    size = sum(int(s.sum()) for s in support.values())
    return mask_ops.global_topk(ranked, min(int(k), size), floors)


def prune_regrow(
    magnitude: torch.Tensor,
    grow_score: torch.Tensor,
    mask: torch.Tensor,
    support: torch.Tensor,
    fraction: float,
) -> torch.Tensor:
    """Drop the ``fraction`` of ``mask`` with the smallest magnitude, grow as many by grow score.

    Growth picks among the support's positions left after the drop (a just-dropped position may
    return), so the count stays exactly ``mask.sum()``; ``mask`` must lie inside ``support``.
    """
    n = mask_ops.n_drop(int(mask.sum()), fraction)
    if n == 0:
        return mask
    kept = mask_ops.drop_lowest(magnitude, mask, n)
    return mask_ops.grow_highest(grow_score, kept | ~support, n) & support


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """Rows of ``m`` consecutive input channels (conv weights viewed as out, kh, kw, in)."""
    return (t.movedim(1, -1) if t.dim() > 2 else t).reshape(-1, m)


def _ungroup(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() > 2:
        return rows.reshape(like.movedim(1, -1).shape).movedim(-1, 1)
    return rows.reshape(like.shape)


def nm_within(
    magnitude: torch.Tensor,
    support: torch.Tensor,
    n: int,
    m: int,
    sparse_fraction: float,
    name: str = "tensor",
) -> torch.Tensor:
    """N:M mask inside ``support`` with only ``sparse_fraction`` of the M-groups made N:M.

    Sparse groups keep their ``n`` largest magnitudes among the support's positions (every group
    must hold at least ``n`` of them). The groups left dense are those whose N:M pattern would
    remove the most magnitude, chosen among groups lying wholly inside the support; with
    ``sparse_fraction`` 1 every group is exactly N:M.
    """
    pattern = mask_ops.nm_mask(torch.where(support, magnitude.float(), -math.inf), n, m, name)
    rows, inside = _groups(pattern, m), _groups(support, m)
    total = rows.shape[0]
    n_dense = total - mask_ops.n_keep(total, 1.0 - sparse_fraction)
    if n_dense == 0:
        return pattern
    allowed = inside.all(dim=1)
    removed = (_groups(magnitude.float(), m) * (inside & ~rows)).sum(dim=1)
    dense = mask_ops.topk_mask(
        torch.where(allowed, removed, -math.inf), min(n_dense, int(allowed.sum()))
    )
    return _ungroup(rows | dense[:, None], pattern)


def is_nested(inner: Mapping[str, torch.Tensor], outer: Mapping[str, torch.Tensor]) -> bool:
    """True when every mask of ``inner`` lies inside the same-named mask of ``outer``."""
    return all(not bool((mask & ~outer[name]).any()) for name, mask in inner.items())
