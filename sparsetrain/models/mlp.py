"""Fully-connected classifiers: LeNet-300-100 and a Linear-heavy variant for sparse-kernel timing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sparsetrain.errors import ConfigError
from sparsetrain.models.registry import register_model, scale_width

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, then Linear-ReLU for each hidden size, then a Linear classifier.

    Layers are named ``fc1``, ``fc2``, ... in order, so state_dict keys read like the papers'
    (LeNet-300-100 is ``fc1`` 784x300, ``fc2`` 300x100, ``fc3`` 100x10).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        sizes = [in_features, *hidden, num_classes]
        self.depth = len(sizes) - 1
        for i in range(self.depth):
            self.add_module(f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth):
            x = self.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.depth}")(x)


def _check_hidden(hidden: Sequence[int]) -> list[int]:
    if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence):
        raise ConfigError(f"mlp hidden must be a list of positive integers, got {hidden!r}")
    for size in hidden:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"mlp hidden must be a list of positive integers, got {hidden!r}")
    return list(hidden)


@register_model("mlp")
def mlp(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    width: float,
    hidden: Sequence[int] = (300, 100),
) -> MLP:
    """LeNet-300-100 (LeCun et al. 1998) by default; ``hidden`` overrides the layer sizes."""
    sizes = [scale_width(size, width) for size in _check_hidden(hidden)]
    return MLP(in_channels * image_size * image_size, sizes, num_classes)


@register_model("mlp_4096")
def mlp_4096(*, in_channels: int, num_classes: int, image_size: int, width: float) -> MLP:
    """Two 4096-wide hidden layers: Linear-dominated, where sparse matmul speed-ups show."""
    return mlp(
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        width=width,
        hidden=(4096, 4096),
    )
