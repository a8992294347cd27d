"""Pieces every dataset shares: its description, split names, directory lookup and normalization.

Kept apart from the loaders so that a model builder can learn a dataset's shape without reading a
single file, and so that every loader reports problems in the same words.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsetrain.errors import ConfigError, DataError
from sparsetrain.tasks import CLASSIFICATION, LANGUAGE_MODEL

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """The shape of a dataset's samples: what a model needs to be built for it.

    Images are ``[in_channels, image_size, image_size]`` with ``num_classes`` labels. Token
    sequences (task ``language_model``) are ``image_size`` tokens long (the model's context), with
    a vocabulary of ``num_classes`` tokens and ``in_channels`` 1, so that every model builder takes
    the same four keywords.
    """

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    task: str = CLASSIFICATION  # see sparsetrain.tasks

    def example_input(
        self, batch_size: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A batch of the samples' shape and dtype, to count FLOPs or time a model: zeros, or
        drawn from ``generator`` (normal pixels, uniform tokens)."""
        if self.task == LANGUAGE_MODEL:
            shape = (batch_size, self.image_size)
            if generator is None:
                return torch.zeros(shape, dtype=torch.long)
            return torch.randint(0, self.num_classes, shape, generator=generator)
        shape = (batch_size, self.in_channels, self.image_size, self.image_size)
        return torch.zeros(shape) if generator is None else torch.randn(shape, generator=generator)


def check_split(split: str) -> None:
    """Reject a split name early: a typo must not silently load the wrong data."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")


def check_no_options(name: str, options: Mapping[str, Any]) -> None:
    """File-backed datasets take no options; an unexpected one is most likely a misplaced key."""
    if options:
        raise ConfigError(f"dataset {name!r} takes no options, got: {', '.join(sorted(options))}")


def resolve_dir(
    data_dir: str | os.PathLike[str] | None, default: Path | None, title: str, hint: str
) -> Path:
    """The directory to read `title` from: the user's, else the default, which must exist."""
    if data_dir is None:
        if default is None:
            raise DataError(f"{title} has no default location; {hint}")
        path = default
    else:
        path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"{title} directory {path} not found; {hint}")
    return path


def check_labels(labels: np.ndarray, num_classes: int, where: str, hint: str) -> None:
    """Out-of-range labels would surface much later as an obscure cross-entropy index error."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: labels must lie in 0..{num_classes - 1}, "
            f"found {labels.min()}..{labels.max()} (corrupt file); {hint}"
        )


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> float32 with per-channel mean/std given for the [0, 1] range.

    One vectorized pass (no per-sample transform) keeps a 60k-image load well under a second.
    """
    out = torch.from_numpy(images.astype(np.float32))
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)]).view(1, -1, 1, 1)
    return out.mul_(scale).sub_(shift)
