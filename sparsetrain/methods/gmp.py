"""GMP: gradual magnitude pruning (Zhu & Gupta 2017, https://arxiv.org/abs/1710.01878).

Training starts dense. From ``start`` to ``end`` the sparsity follows the cubic ramp
s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3; every ``frequency`` steps (and always at ``end``,
so the target is reached exactly there) the smallest-magnitude active weights are pruned down to
s_t. Pruned weights never return and the masks are frozen after ``end``.

Step semantics: the update at step ``t`` runs after optimizer step ``t`` and prunes to the ramp's
value at ``t``; the first update is at ``start`` itself (s_i there, so nothing is pruned when
s_i = 0, as in torch.ao's ``CubicSL``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError
from sparsetrain.methods.base import Method
from sparsetrain.methods.registry import register_method
from sparsetrain.schedules import Cubic, Every

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

log = logging.getLogger(__name__)

SCOPES = ("layer", "global")


@register_method("gmp")
class GMP(Method):
    """Cubic magnitude pruning from dense; ``scope`` prunes per layer or with one global top-k.

    ``layer``: each layer follows the cubic ramp to its own final target from the distribution
    (uniform is the paper's setting); ``global``: one magnitude top-k over all sparse weights at
    the ramp's overall sparsity. ``start``/``end`` are in ``unit`` (fraction of training by
    default), ``frequency`` in optimizer steps.
    """

    def __init__(
        self,
        *,
        initial_sparsity: float = 0.0,
        start: float = 0.1,
        end: float = 0.75,
        unit: str = "fraction",
        frequency: int = 100,
        scope: str = "layer",
        **common,
    ) -> None:
        super().__init__(**common)
        if scope not in SCOPES:
            raise ConfigError(f"gmp: unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
        final = mask_ops.check_sparsity(self.sparsity)
        initial = mask_ops.check_sparsity(initial_sparsity, "gmp initial_sparsity")
        if initial > final:
            raise ConfigError(
                f"gmp: initial_sparsity {initial} is above the final sparsity {final}"
            )
        first, last = self.steps_from(start, unit), self.steps_from(end, unit)
        if not 0 <= first < last:
            raise ConfigError(f"gmp: end (step {last}) must come after start (step {first}) >= 0")
        if self.total_steps and last > self.total_steps:
            raise ConfigError(
                f"gmp: end ({last} steps) is after the last training step ({self.total_steps})"
            )
        self.scope = scope
        self.ramp = Cubic(initial, final, first, last)
        self.updates = Every(int(frequency), first, last)

    def is_update_step(self, t: int) -> bool:
        """Update on the ``frequency`` grid from ``start``, and always at ``end``."""
        return self.updates(t) or t == self.ramp.end

    def init_masks(self, sp: Sparsifier) -> None:
        """Dense masks; the targets shown in reports are the final per-layer sparsities."""
        sp.set_masks({name: torch.ones_like(p, dtype=torch.bool) for name, p in sp.params.items()})
        if self.scope == "global":
            masks = self.global_masks(
                sp, {name: sp.weight(name).abs() for name in sp.params}, self.ramp.final
            )
            sp.targets = {n: 1.0 - float(m.sum()) / m.numel() for n, m in masks.items()}
        else:
            sp.targets = self.layer_targets(sp, self.ramp.final)
        self._set_layer_ramps(sp.targets)

    def _set_layer_ramps(self, finals: dict[str, float]) -> None:
        """One cubic ramp per layer, towards that layer's own final target.

        A layer whose final target is below ``initial_sparsity`` (e.g. one ERK keeps dense) starts
        and stays at its final target, so no layer ever has to grow back.
        """
        self.final_targets = dict(finals)
        self.layer_ramps = {
            name: Cubic(min(self.ramp.initial, final), final, self.ramp.start, self.ramp.end)
            for name, final in finals.items()
        }

    def after_step(self, sp: Sparsifier, t: int) -> None:
        if not self.is_update_step(t):
            return
        if self.scope == "global":
            masks = self._prune_global(sp, self.ramp(t))
            if t == self.ramp.end:  # the achieved split is the global method's per-layer target
                sp.targets = {n: 1.0 - float(m.sum()) / m.numel() for n, m in masks.items()}
        else:
            masks = self._prune_layers(sp, t)
        sp.set_masks(masks)
        log.debug("gmp step %d: sparsity %.4f", t, sp.sparsity)

    def state_dict(self) -> dict[str, Any]:
        # The final targets can depend on the initial weights (distribution "global").
        return {"final_targets": dict(self.final_targets)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "final_targets" in state:
            self._set_layer_ramps(state["final_targets"])

    def _prune_layers(self, sp: Sparsifier, t: int) -> dict[str, torch.Tensor]:
        masks = {}
        for name, p in sp.params.items():
            mask = sp.mask(name)
            keep = mask_ops.n_keep(p.numel(), self.layer_ramps[name](t))
            excess = int(mask.sum()) - keep
            if excess > 0:
                masks[name] = mask_ops.drop_lowest(sp.weight(name).abs(), mask, excess)
        return masks

    def _prune_global(self, sp: Sparsifier, sparsity: float) -> dict[str, torch.Tensor]:
        # Pruned positions score -inf so a weight that is active and exactly 0 never loses its
        # place to a pruned one: pruned weights never return.
        scores = {
            name: torch.where(sp.mask(name), sp.weight(name).abs(), float("-inf"))
            for name in sp.params
        }
        scale = sparsity / self.ramp.final if self.ramp.final > 0 else 1.0
        return self.global_masks(sp, scores, sparsity, scale=scale)
