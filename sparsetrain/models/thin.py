"""Thin dense baselines: the width at which a dense model has as many parameters as a sparse one.

DSR (Mostafa & Wang 2019, Table 2) compares sparse networks with "thin dense" ones, the same
architecture narrowed until its parameter count equals the sparse model's number of non-zeros.
Models are built on the ``meta`` device, so searching costs no memory and no initialisation time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError
from sparsetrain.models.registry import build_model
from sparsetrain.select import select_parameters

__all__ = ["parameter_count", "sparse_active_count", "thin_width_for"]

log = logging.getLogger(__name__)

_BISECTIONS = 50


def _build(model_name: str, width: float, model_kwargs: dict[str, Any]) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(model_name, width=width, **model_kwargs)


def parameter_count(model_name: str, *, width: float = 1.0, **model_kwargs: Any) -> int:
    """Number of parameters of dense ``model_name`` at ``width`` (built on the meta device)."""
    return sum(p.numel() for p in _build(model_name, width, model_kwargs).parameters())


def sparse_active_count(
    model_name: str,
    sparsity: float,
    *,
    exclude: Sequence[str] = (),
    dense_first: bool = False,
    dense_last: bool = False,
    width: float = 1.0,
    **model_kwargs: Any,
) -> int:
    """Parameters left in ``model_name`` when its sparse weights (the default layer selection,
    minus ``exclude`` / first / last) keep ``n_keep(numel, sparsity)`` each; dense ones all count.
    """
    sparsity = mask_ops.check_sparsity(sparsity)
    model = _build(model_name, width, model_kwargs)
    sparse = select_parameters(
        model, exclude=exclude, dense_first=dense_first, dense_last=dense_last
    )
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(p.numel() - mask_ops.n_keep(p.numel(), sparsity) for p in sparse.values())
    return total - zeros


def thin_width_for(
    model_name: str,
    sparsity: float,
    *,
    exclude: Sequence[str] = (),
    dense_first: bool = False,
    dense_last: bool = False,
    width: float = 1.0,
    **model_kwargs: Any,
) -> float:
    """Width multiplier at which dense ``model_name`` has as many parameters as the sparse model.

    The sparse model is ``model_name`` at ``width`` with the given layer selection at
    ``sparsity`` (see :func:`sparse_active_count`). Widths are rounded to whole channels by the
    builders, so the parameter count is a step function of the width: the search bisects for the
    step boundary, returns the closer of the two neighbouring counts (the smaller on a tie), and
    shortens the width to the fewest decimals that give the same count. The match is logged.
    """
    target = sparse_active_count(
        model_name,
        sparsity,
        exclude=exclude,
        dense_first=dense_first,
        dense_last=dense_last,
        width=width,
        **model_kwargs,
    )

    def count(w: float) -> int:
        return parameter_count(model_name, width=w, **model_kwargs)

    lo, hi = width * 1e-6, float(width)
    if count(hi) <= target:
        return hi
    if count(lo) > target:
        raise ConfigError(
            f"no width makes dense {model_name} as small as {target} parameters (the thinnest "
            f"has {count(lo)}); use a lower sparsity"
        )
    for _ in range(_BISECTIONS):  # invariant: count(lo) <= target < count(hi)
        mid = (lo + hi) / 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    best, matched = (lo, count(lo)) if target - count(lo) <= count(hi) - target else (hi, count(hi))
    for digits in range(2, 8):
        short = round(best, digits)
        if short > 0 and count(short) == matched:
            best = short
            break
    log.info(
        "thin %s: width %g has %d parameters; sparse model at sparsity %g has %d active (%+.2f%%)",
        model_name,
        best,
        matched,
        sparsity,
        target,
        100.0 * (matched - target) / target,
    )
    return best
