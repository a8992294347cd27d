"""What the engine asks of a method: the small protocol between mechanism and policy.

The :class:`~sparsetrain.masks.Sparsifier` enforces masks and calls these at each optimizer step;
it never imports a method. :class:`sparsetrain.methods.base.Method` implements them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["Policy"]


class Policy(Protocol):
    """A sparse-training method as the engine sees it."""

    name: str

    def before_step(self, sp: Sparsifier, t: int) -> bool:
        """Step ``t``'s gradients are ready (masked); True skips its optimizer update."""

    def after_step(self, sp: Sparsifier, t: int) -> None:
        """Optimizer step ``t`` is done and the weights are masked."""

    def needs_dense_grad(self, t: int) -> bool:
        """Whether step ``t`` reads gradients outside the mask (``sp.dense_grad``)."""

    def export(self, sp: Sparsifier, **options: Any) -> nn.Module:
        """The trained model as a plain module."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the method exactly."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
