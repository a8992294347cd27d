"""SET: Sparse Evolutionary Training (Mocanu et al. 2018, https://doi.org/10.1038/s41467-018-04316-3).

Every update drops the ``zeta`` fraction of each layer's active weights closest to zero and
regrows as many at uniformly random empty positions, at 0. By default the drop is by magnitude
and the update runs every ``update_every`` steps, as SET is used in later work (e.g. RigL's
baseline); ``signed=True`` drops the smallest positive and the largest negative weights
separately and ``per_epoch=True`` updates once per epoch, as in the original.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError
from sparsetrain.methods.dynamic import DynamicSparse
from sparsetrain.methods.registry import register_method

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier


@register_method("set")
class SET(DynamicSparse):
    """Magnitude (or sign-separated) drop, random grow; ``end=None`` rewires until training ends
    (never at the last step, as in the original).

    ``end`` is in ``unit`` (fraction of training by default); ``drop_schedule`` is ``constant``
    (the original) or ``cosine`` (decaying ``zeta`` to 0 at ``end``, as RigL does).
    """

    def __init__(
        self,
        *,
        zeta: float = 0.3,
        update_every: int = 100,
        per_epoch: bool = False,
        signed: bool = False,
        drop_schedule: str = "constant",
        end: float | None = None,
        unit: str = "fraction",
        **common,
    ) -> None:
        super().__init__(**common)
        if per_epoch and not self.steps_per_epoch:
            raise ConfigError("set: per_epoch updates need steps_per_epoch")
        self.signed = bool(signed)
        every = self.steps_per_epoch if per_epoch else update_every
        self.configure_updates(
            fraction=zeta, schedule=drop_schedule, every=every, end=end, unit=unit
        )

    def drop(self, weight: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
        if self.signed:
            return mask_ops.drop_signed(weight, mask, fraction)
        return super().drop(weight, mask, fraction)

    def grow_score(self, sp: Sparsifier, name: str, t: int) -> torch.Tensor:
        """Uniform random scores, seeded from (seed, name, step): the same on every rank."""
        param = sp.params[name]
        generator = mask_ops.generator_for(self.seed, name, t)
        return torch.rand(param.shape, generator=generator).to(param.device)
