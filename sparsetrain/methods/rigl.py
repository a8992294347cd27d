"""RigL: Rigging the Lottery (Evci et al. 2020, https://arxiv.org/abs/1911.11134).

SET with one change: grow where the dense gradient is largest. Every ``update_every`` steps until
``end`` (75% of training by default) each layer drops the f(t) = alpha/2 (1 + cos(pi t / end))
fraction of its active weights with the smallest magnitude and grows as many inactive positions
with the largest |gradient of the loss w.r.t. the masked weight|. That dense gradient is kept
as backward produces it on the update steps only (``sp.dense_grad``: summed over accumulation
micro-batches, averaged over ranks), so it costs no extra backward pass.
As in the reference, the optimizer update of a mask-update step is skipped by default.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from sparsetrain.methods.dynamic import DynamicSparse
from sparsetrain.methods.registry import register_method

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

log = logging.getLogger(__name__)


@register_method("rigl")
class RigL(DynamicSparse):
    """Magnitude drop, |dense gradient| grow; ``dense_gradient_steps`` counts the update steps.

    ``end`` is in ``unit`` (fraction of training by default); ``drop_schedule`` is ``cosine`` (the
    paper) or ``constant``.
    """

    uses_gradient = True

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        update_every: int = 100,
        end: float = 0.75,
        unit: str = "fraction",
        drop_schedule: str = "cosine",
        skip_update_step: bool = True,
        **common,
    ) -> None:
        super().__init__(**common)
        self.configure_updates(
            fraction=alpha, schedule=drop_schedule, every=update_every, end=end, unit=unit
        )
        self.skip_update_step = bool(skip_update_step)

    def grow_score(self, sp: Sparsifier, name: str, t: int) -> torch.Tensor | None:
        """|dense gradient| of step ``t``; a weight without a gradient keeps its mask."""
        grad = sp.dense_grad(name)
        if grad is None:
            log.debug("rigl step %d: %s has no gradient, mask left unchanged", t, name)
            return None
        return grad.detach().abs()
