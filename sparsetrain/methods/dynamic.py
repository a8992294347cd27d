"""Drop-and-grow dynamic sparse training: the part SET and RigL share.

At every update step each layer drops the ``f(t)`` fraction of its active weights with the
smallest magnitude and grows as many inactive positions with the highest *grow score*; the methods
differ only in that score (random for SET, |dense gradient| for RigL). A position dropped in the
same update may be grown again: it then keeps its value and optimizer state. Newly grown weights
and their optimizer state start at 0 (the :class:`~sparsetrain.masks.Sparsifier` does that), and
each layer's active count stays constant. Not registered itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError
from sparsetrain.methods.base import Method
from sparsetrain.schedules import Constant, Cosine, Every

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["DROP_SCHEDULES", "DynamicSparse"]

log = logging.getLogger(__name__)

DROP_SCHEDULES = ("constant", "cosine")


class DynamicSparse(Method):
    """Magnitude drop + :meth:`grow_score` grow on an :class:`~sparsetrain.schedules.Every` grid.

    Subclasses call :meth:`configure_updates` from ``__init__`` and override :meth:`grow_score`
    (and :meth:`drop` for another drop rule). With ``uses_gradient`` the update runs in
    ``before_step``, where ``sp.dense_grad`` holds the step's dense gradient w.r.t. the masked
    weight (no second backward); otherwise it runs after the optimizer step.
    """

    default_distribution: ClassVar[str] = "erk"
    uses_gradient: ClassVar[bool] = False

    def __init__(self, **common) -> None:
        super().__init__(**common)
        self.skip_update_step = False
        # Update steps that read a dense gradient (RigL): training-FLOP accounting counts them.
        self.dense_gradient_steps = 0

    def configure_updates(
        self, *, fraction: float, schedule: str, every: int, end: float | None, unit: str
    ) -> None:
        """Set the drop-fraction schedule and the update steps (every ``every`` steps to ``end``,
        and before the run's last step when ``total_steps`` is known)."""
        if not 0.0 < float(fraction) <= 1.0:
            raise ConfigError(f"{self.name}: drop fraction must be in (0, 1], got {fraction!r}")
        stop = None if end is None else self.steps_from(end, unit)
        if stop is not None and (stop < 1 or (self.total_steps and stop > self.total_steps)):
            raise ConfigError(
                f"{self.name}: end is step {stop}, outside the run's steps 1..{self.total_steps}"
            )
        if schedule == "constant":
            self.drop_fraction = Constant(float(fraction))
        elif schedule == "cosine":
            if stop is None:
                raise ConfigError(f"{self.name}: the cosine drop schedule needs an end")
            self.drop_fraction = Cosine(float(fraction), stop)
        else:
            raise ConfigError(
                f"{self.name}: unknown drop_schedule {schedule!r}; "
                f"choose one of {', '.join(DROP_SCHEDULES)}"
            )
        # Never rewire after the run's last step: weights grown there would stay 0 in the trained
        # model (the original SET leaves the last epoch's connectivity alone).
        last = stop if not self.total_steps else min(stop or self.total_steps, self.total_steps - 1)
        self.updates = Every(every, 0, last)

    def is_update_step(self, t: int) -> bool:
        """True on the update grid while the drop fraction is still positive."""
        return self.updates(t) and self.drop_fraction(t) > 0.0

    # ------------------------------------------------------------------ hooks
    def before_step(self, sp: Sparsifier, t: int) -> bool:
        if not (self.uses_gradient and self.is_update_step(t)):
            return False
        self.update_masks(sp, t)
        self.dense_gradient_steps += 1
        return self.skip_update_step

    def after_step(self, sp: Sparsifier, t: int) -> None:
        if not self.uses_gradient and self.is_update_step(t):
            self.update_masks(sp, t)

    def needs_dense_grad(self, t: int) -> bool:
        return self.uses_gradient and self.is_update_step(t)

    def state_dict(self) -> dict[str, Any]:
        return {"dense_gradient_steps": self.dense_gradient_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense_gradient_steps = int(state.get("dense_gradient_steps", 0))

    # ---------------------------------------------------------------- policy
    def drop(self, weight: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
        """The mask left after dropping: the ``fraction`` of active weights with smallest |w|."""
        n = mask_ops.n_drop(int(mask.sum()), fraction)
        return mask_ops.drop_lowest(weight.detach().abs(), mask, n)

    def grow_score(self, sp: Sparsifier, name: str, t: int) -> torch.Tensor | None:
        """Score of every position of ``name`` (higher grows first); None leaves the layer as is."""
        raise NotImplementedError

    def update_masks(self, sp: Sparsifier, t: int) -> None:
        """Drop and regrow in every layer; the per-layer active count is unchanged."""
        fraction = self.drop_fraction(t)
        new_masks, changed = {}, 0
        for name in sp.params:
            mask = sp.mask(name)
            active = int(mask.sum())
            if active in (0, mask.numel()):
                continue  # nothing to rewire
            score = self.grow_score(sp, name, t)
            if score is None:
                continue
            kept = self.drop(sp.weight(name), mask, fraction)
            new = mask_ops.grow_highest(score, kept, active - int(kept.sum()))
            changed += int((new & ~mask).sum())
            new_masks[name] = new
        sp.set_masks(new_masks)
        log.debug(
            "%s step %d: drop fraction %.4f, %d weights regrown", self.name, t, fraction, changed
        )
