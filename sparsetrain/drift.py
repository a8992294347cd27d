"""Notice when the weights a sparsifier guards change outside its optimizer's step.

A forgotten hand-off (the training loop steps another optimizer, or a wrapper builds its own) leaves
``sp.step`` at 0 and the masks never updated while the weights train, and nothing would say so.
Every in-place change of a parameter bumps its version counter; the sparsifier records the
counters after each of its own steps and mask changes, and each backward compares them (an integer
comparison per weight). A weight changed outside on several backward passes gets one warning,
naming it, the sparsifier's step, and how much of the weight has left its mask.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from sparsetrain import sharding

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["DriftWatch"]

log = logging.getLogger(__name__)

FOREIGN_UPDATES = 3  # changes seen outside the sparsifier before it warns (one may be an init)


class DriftWatch:
    """Version counters of the guarded weights, and one warning when they move on their own."""

    def __init__(self, sp: Sparsifier) -> None:
        self.sp = sp
        self._versions: dict[str, int] = {}
        self._foreign: dict[str, int] = {}
        self.warned = False

    def settle(self, names: list[str] | None = None) -> None:
        """Record the current versions: the sparsifier itself just changed these weights."""
        params = self.sp.params
        for name in params if names is None else names:
            self._versions[name] = sharding.local(params[name])._version

    def on_backward(self, name: str, param: torch.nn.Parameter) -> None:
        """Compare ``param``'s version with the recorded one; warn once if it keeps moving."""
        if self.warned:
            return
        version = sharding.local(param)._version
        if self._versions.get(name, version) == version:
            return
        self._versions[name] = version
        self._foreign[name] = self._foreign.get(name, 0) + 1
        if self._foreign[name] >= FOREIGN_UPDATES:
            self.warned = True
            log.warning(
                "%s changed outside this sparsifier's optimizer step on %d backward passes "
                "(sparsifier step %d; %s): is the optimizer that steps the one given to "
                "sparsify? Masks are updated and enforced only around that optimizer's step().",
                name,
                self._foreign[name],
                self.sp.step,
                self._drift_text(name),
            )

    def _drift_text(self, name: str) -> str:
        """Nonzeros outside the mask, counted on this rank's shard (no collective: one rank may
        warn alone)."""
        param = sharding.local(self.sp.params[name]).detach()
        off = ~self.sp.float_mask(name).bool()
        n_off = int(off.sum())
        if n_off == 0:
            return "its mask is full"
        live = int(torch.count_nonzero(param[off]))
        return f"{live:,} of its {n_off:,} masked-off weights are nonzero"
