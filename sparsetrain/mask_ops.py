"""Pure mask arithmetic shared by every method.

One rounding rule (:func:`n_keep`) and one exact, deterministic top-k (:func:`topk_mask`) so that
"90% sparse" means exactly the same number of zeros in every method, on every rank and every run.
Ties are broken by the lower flat index, which ``torch.topk`` does not promise.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import torch

from sparsetrain.errors import ConfigError

__all__ = [
    "check_sparsity",
    "drop_lowest",
    "drop_signed",
    "floor_count",
    "generator_for",
    "global_topk",
    "grow_highest",
    "n_drop",
    "n_keep",
    "nm_mask",
    "random_mask",
    "topk_mask",
]


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Return ``sparsity`` as a float if it lies in [0, 1), else raise a :class:`ConfigError`."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise ConfigError(f"{what} must be in [0, 1), got {sparsity!r}")
    return value


def n_keep(numel: int, sparsity: float) -> int:
    """Number of weights kept in a tensor of ``numel`` elements at ``sparsity``.

    Round half up of ``(1 - sparsity) * numel``; the small epsilon absorbs float error such as
    ``(1 - 0.9) * 100 = 9.999999999999998``.
    """
    keep = math.floor((1.0 - sparsity) * numel + 0.5 + 1e-9)
    return max(0, min(numel, keep))


def n_drop(active: int, fraction: float) -> int:
    """Number of the ``active`` weights a drop/grow update replaces at drop ``fraction``.

    Floor, as in RigL's reference (``int(n_ones * drop_fraction)``): an update never replaces more
    than the asked fraction, and a fraction of 0 changes nothing.
    """
    return max(0, min(int(active), math.floor(fraction * active + 1e-9)))


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of ``score``; ties go to the lower flat index."""
    flat = score.detach().reshape(-1)
    numel = flat.numel()
    k = max(0, min(int(k), numel))
    out = torch.zeros(numel, dtype=torch.bool, device=flat.device)
    if k == 0:
        return out.view_as(score)
    if k == numel:
        return out.fill_(True).view_as(score)
    kth = _kth_largest(flat, k)
    above = flat > kth
    out |= above
    missing = k - int(torch.count_nonzero(above))
    if missing > 0:
        tied = torch.nonzero(flat == kth).flatten()[:missing]
        out[tied] = True
    return out.view_as(score)


_SAMPLE = 1 << 16  # strided sample that brackets the k-th value of a large tensor


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of ``flat`` (0-d tensor), exactly as ``torch.topk`` finds it.

    ``torch.topk`` on 16.8M elements takes ~0.5 s on one CPU thread. For large tensors a strided
    sample brackets the answer in a narrow band ``[lo, hi]`` and two counts prove it lies there
    (fewer than ``k`` values above ``hi``, at least ``k`` at or above ``lo``); the answer is then
    the top-k of the band alone. Any NaN (which ``torch.topk`` ranks highest), or a band the
    counts do not confirm (a sample that misses the structure of the data), takes the full top-k.
    """
    numel = flat.numel()
    if numel <= 4 * _SAMPLE or bool(flat.isnan().any()):
        return torch.topk(flat, k, sorted=False).values.min()
    sample = flat[:: numel // _SAMPLE]
    m = sample.numel()
    rank = k * m / numel  # expected rank of the answer in the sample, counted from the top
    margin = 6.0 * math.sqrt(rank * (1.0 - rank / m)) + 16.0
    ordered = torch.sort(sample, descending=True).values
    hi_rank, lo_rank = math.floor(rank - margin), math.ceil(rank + margin)
    hi = ordered[hi_rank - 1].item() if hi_rank >= 1 else math.inf
    lo = ordered[lo_rank - 1].item() if lo_rank <= m else -math.inf
    above = flat > hi
    n_above = int(torch.count_nonzero(above))
    in_band = flat >= lo
    if not n_above < k <= int(torch.count_nonzero(in_band)):
        return torch.topk(flat, k, sorted=False).values.min()
    band = flat[in_band.logical_and_(above.logical_not_())]
    return torch.topk(band, k - n_above, sorted=False).values.min()


def _top_among(score: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_mask(where(candidates, score, -inf), k)`` for ``k`` <= the candidate count.

    Where candidates are few (the active weights of a sparse layer), the top-k runs on their
    scores alone and is scattered back: candidates are indexed in increasing flat order, so the
    lower-index tie-break is the same. A candidate scored -inf or NaN would compete with the
    non-candidates in the full form, so those inputs take the full form.
    """
    flat_mask = candidates.reshape(-1)
    count = int(torch.count_nonzero(flat_mask))
    if 2 * count < flat_mask.numel():
        index = flat_mask.nonzero().squeeze(1)
        sub = score.detach().reshape(-1).index_select(0, index).float()
        if bool((sub > -math.inf).all()):
            out = torch.zeros(flat_mask.numel(), dtype=torch.bool, device=flat_mask.device)
            out[index[topk_mask(sub, k)]] = True
            return out.view(candidates.shape)
    masked = torch.where(
        candidates, score.detach().float(), torch.tensor(-math.inf, device=candidates.device)
    )
    return topk_mask(masked, k)


def drop_lowest(score: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Deactivate the ``n`` active positions of ``mask`` with the smallest ``score``."""
    active = int(torch.count_nonzero(mask))
    n = max(0, min(int(n), active))
    return _top_among(score, mask, active - n)


def drop_signed(weight: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """SET's original drop: the ``fraction`` of active weights closest to 0 *within each sign*.

    Mocanu et al. (2018) remove the smallest positive and the largest negative weights, counted
    separately on the two halves, so a layer whose weights drift to one sign still rewires both.
    Active exact zeros count with the positives (they are the smallest of them). Each side drops
    :func:`n_drop` of its own count; ties go as in :func:`drop_lowest`.
    """
    w = weight.detach()
    positive = mask & (w >= 0)
    negative = mask & (w < 0)
    kept_pos = drop_lowest(w, positive, n_drop(int(positive.sum()), fraction))
    kept_neg = drop_lowest(-w, negative, n_drop(int(negative.sum()), fraction))
    return kept_pos | kept_neg


def grow_highest(score: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Activate the ``n`` inactive positions of ``mask`` with the largest ``score``.

    Active positions are never chosen again, so the result has exactly ``mask.sum() + n`` ones
    (``n`` is clipped to the number of free positions).
    """
    free = mask.numel() - int(torch.count_nonzero(mask))
    n = max(0, min(int(n), free))
    return mask | _top_among(score, ~mask, n)


def random_mask(shape: torch.Size, keep: int, generator: torch.Generator) -> torch.Tensor:
    """Bool mask with exactly ``keep`` ones at uniformly random positions."""
    numel = math.prod(shape)
    perm = torch.randperm(numel, generator=generator)
    out = torch.zeros(numel, dtype=torch.bool)
    out[perm[:keep]] = True
    return out.view(shape)


def generator_for(seed: int, name: str, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name, step).

    Every process derives the same stream for the same tensor and step, so random mask choices
    agree across ranks without communication, and a resumed run repeats them exactly.
    """
    mixed = (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 7919 + int(step)) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def global_topk(
    scores: Mapping[str, torch.Tensor], k: int, floors: Mapping[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """One exact top-k over several tensors; returns a bool mask per name.

    ``floors`` gives a minimum count per name: each tensor first keeps its own ``floor`` highest
    entries (never more than it has above ``-inf``), then the rest of ``k`` is chosen over all.
    The total stays exactly ``max(k, sum of floors)``.
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    if floors:
        reserved = []
        for n in names:
            score = scores[n].detach().reshape(-1).float()
            count = min(int(floors.get(n, 0)), int((score > -math.inf).sum()))
            reserved.append(topk_mask(score, count))
        floor_mask = torch.cat(reserved)
        keep = grow_highest(flat, floor_mask, int(k) - int(floor_mask.sum()))
    else:
        keep = topk_mask(flat, k)
    out, offset = {}, 0
    for name in names:
        numel = scores[name].numel()
        out[name] = keep[offset : offset + numel].view_as(scores[name])
        offset += numel
    return out


def floor_count(numel: int, min_density: float) -> int:
    """Fewest weights a tensor of ``numel`` keeps under a density floor (one at least, if any)."""
    if min_density <= 0.0 or numel == 0:
        return 0
    return max(1, n_keep(numel, 1.0 - min_density))


def _channels_last_view(t: torch.Tensor) -> torch.Tensor:
    """Move the input-channel dim (dim 1) last: (out, in, *k) -> (out, *k, in)."""
    return t.movedim(1, -1) if t.dim() > 2 else t


def nm_mask(score: torch.Tensor, n: int, m: int, name: str = "tensor") -> torch.Tensor:
    """N:M mask: in every group of ``m`` consecutive input channels keep the ``n`` largest scores.

    Input channels are dim 1 of a Linear (out, in) or conv (out, in, kh, kw) weight; conv weights
    are viewed as (out, kh, kw, in) as in the 2:4 kernels. Ties go to the lower channel index.
    """
    if not 0 < n <= m:
        raise ConfigError(f"N:M needs 0 < N <= M, got {n}:{m}")
    if score.dim() < 2:
        raise ConfigError(
            f"N:M masks need a weight with >= 2 dims; {name} has shape {tuple(score.shape)}"
        )
    in_channels = score.shape[1]
    if in_channels % m != 0:
        raise ConfigError(
            f"{name}: input size {in_channels} is not a multiple of M={m}; "
            "keep this layer dense or choose another M"
        )
    view = _channels_last_view(score.detach().float())
    groups = view.reshape(-1, m)
    # Stable sort: among equal scores the lower channel index wins.
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    keep = keep.view(view.shape)
    return keep.movedim(-1, 1) if score.dim() > 2 else keep
