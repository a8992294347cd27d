"""Static sparsity: one random mask drawn from the distribution (uniform or ERK), never changed.

The usual control for dynamic methods (e.g. RigL, https://arxiv.org/abs/1911.11134, Sec. 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsetrain.methods.base import Method, sparse_aware_init
from sparsetrain.methods.registry import register_method

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier


@register_method("static")
class Static(Method):
    """Random fixed mask; ``sparse_init`` rescales surviving weights by 1/sqrt(density)."""

    def __init__(self, *, sparse_init: bool = False, **common) -> None:
        super().__init__(**common)
        self.sparse_init = bool(sparse_init)

    def init_masks(self, sp: Sparsifier) -> None:
        super().init_masks(sp)
        if self.sparse_init:
            sparse_aware_init(sp)
