"""One example of a model's inputs, positional and keyword, kept to count FLOPs and check exports.

Hugging Face-style models are called with keywords (``model(input_ids=..., attention_mask=...)``),
so a forward pre-hook that looked only at positional tensors saw nothing. Tensors whose first
dimension is the batch are cut to one example; the first positional tensor is kept as zeros (its
values do not change the count), keyword tensors keep their values (an attention mask of zeros is
not a typical input); plain values (flags, numbers, strings) are kept as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ExampleInput"]

_PLAIN = (bool, int, float, str, type(None))


@dataclass
class ExampleInput:
    """Positional and keyword inputs of one forward, cut to a batch of one."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None

    @classmethod
    def capture(cls, args: tuple, kwargs: Mapping[str, Any]) -> ExampleInput | None:
        """The inputs of a forward call, or None when no tensor with a batch dimension is among
        them."""
        tensors = [t for t in (*args, *kwargs.values()) if _batched(t)]
        if not tensors:
            return None
        batch = tensors[0].shape[0]
        kept_args = []
        for i, value in enumerate(args):
            if not _batched(value) and not isinstance(value, _PLAIN):
                break  # an input we cannot reproduce: keep the ones before it
            kept_args.append(_one(value, batch, zeros=i == 0))
        kept = {
            key: _one(value, batch, zeros=False)
            for key, value in kwargs.items()
            if _batched(value) or isinstance(value, _PLAIN)
        }
        return cls(tuple(kept_args), kept, batch)

    def first_tensor(self) -> torch.Tensor | None:
        """The first positional input when it is a tensor (what single-input code expects)."""
        return self.args[0] if self.args and isinstance(self.args[0], torch.Tensor) else None

    def to(self, device: torch.device) -> ExampleInput:
        """A copy with every tensor on ``device``."""

        def move(v: Any) -> Any:
            return v.to(device) if isinstance(v, torch.Tensor) else v

        args = tuple(move(v) for v in self.args)
        return ExampleInput(args, {k: move(v) for k, v in self.kwargs.items()}, self.batch_size)

    def __call__(self, model: nn.Module) -> Any:
        """Run ``model`` on these inputs."""
        return model(*self.args, **self.kwargs)


def _batched(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _one(value: Any, batch: int, zeros: bool) -> Any:
    if not _batched(value) or value.shape[0] != batch:
        return value.detach().clone() if isinstance(value, torch.Tensor) else value
    first = value.detach()[:1]
    return torch.zeros_like(first) if zeros else first.clone()
