"""RigL: Rigging the Lottery (Evci et al. 2020, https://arxiv.org/abs/1911.11134).

SET with one change: grow where the dense gradient is largest. Every ``update_every`` steps until
``end`` (75% of training by default) each layer drops the f(t) = alpha/2 (1 + cos(pi t / end))
fraction of its active weights with the smallest magnitude and grows as many inactive positions
with the largest |gradient of the loss w.r.t. the masked weight|. That dense gradient is kept
as backward produces it on the update steps only (``sp.dense_grad``: summed over accumulation
micro-batches, averaged over ranks), so it costs no extra backward pass.
As in the reference, the optimizer update of a mask-update step is skipped by default.

The first layer: the reference keeps it dense under the uniform distribution (``first_layer_sparsity
= 0`` on ImageNet, ``prune_first_layer=False`` on CIFAR) and sparse under ERK ("ERK applies to all
layers", except in its 99% model). ``dense_first_layer`` defaults to exactly that: dense with
``distribution: uniform`` (the other layers then share the sparsity among themselves), sparse with
ERK, the default distribution, which gives a small first layer a high density by itself.
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
    paper) or ``constant``; ``dense_first_layer`` (default: dense under uniform only, as the
    reference) gives the first sparse weight an all-ones mask that updates never change.
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
        dense_first_layer: bool | None = None,
        **common,
    ) -> None:
        super().__init__(**common)
        if dense_first_layer is None:
            dense_first_layer = self.distribution == "uniform"
        self.dense_first_layer = bool(dense_first_layer)
        self.configure_updates(
            fraction=alpha, schedule=drop_schedule, every=update_every, end=end, unit=unit
        )
        self.skip_update_step = bool(skip_update_step)

    def init_masks(self, sp: Sparsifier) -> None:
        """The distribution's random masks; the first layer all ones if it stays dense."""
        first = next(iter(sp.params), None)
        if self.dense_first_layer and first is not None and len(sp.params) > 1:
            self.layer_sparsity = {first: 0.0, **self.layer_sparsity}
        super().init_masks(sp)

    def grow_score(self, sp: Sparsifier, name: str, t: int) -> torch.Tensor | None:
        """|dense gradient| of step ``t``; a weight without a gradient keeps its mask."""
        grad = sp.dense_grad(name)
        if grad is None:
            log.debug("rigl step %d: %s has no gradient, mask left unchanged", t, name)
            return None
        return grad.detach().abs()
