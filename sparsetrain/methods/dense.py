"""Dense baseline: no weight is masked; the reference for accuracy and step time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparsetrain.errors import ConfigError
from sparsetrain.methods.base import Method
from sparsetrain.methods.registry import register_method

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier


@register_method("dense")
class Dense(Method):
    """Train every weight; masks stay all ones, so the sparsifier does no work per step."""

    def __init__(self, **common) -> None:
        super().__init__(**common)
        if float(self.sparsity) != 0.0:
            raise ConfigError(
                f"method 'dense' trains no sparse weights; sparsity must be 0, got {self.sparsity}"
            )

    def init_masks(self, sp: Sparsifier) -> None:
        sp.targets = dict.fromkeys(sp.params, 0.0)
