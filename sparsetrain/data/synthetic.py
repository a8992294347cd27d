"""A small generated image dataset for tests and smoke runs: no files, same samples every time.

Each class has a smooth random prototype image (low-resolution noise upsampled, so convolutions
and MLPs both find structure); a sample is its class prototype plus independent pixel noise. At
the default noise the classes overlap a little (a nearest-class-mean rule gets ~95% on the test
split), so training must do real work yet a tiny model clears chance within an epoch. Prototypes depend only on the seed, so the
train and test splits share one distribution while their samples differ.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sparsetrain.data.base import DatasetInfo, check_split
from sparsetrain.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "num_samples": 1024,  # size of the train split
    "image_size": 12,
    "in_channels": 1,
    "num_classes": 10,
    "seed": 0,
    "noise": 3.0,  # pixel noise std; prototypes have unit pixel std
}
_MINIMUM = {"num_samples": 1, "image_size": 2, "in_channels": 1, "num_classes": 2, "seed": 0}
TEST_FRACTION = 0.25  # the test split has this fraction of `num_samples`
_PROTOTYPE_SIZE = 4  # resolution of the noise that is upsampled into a prototype
_STREAMS = {"prototypes": 0, "train": 1, "test": 2}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked, so a typo or a bad value fails loudly."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown synthetic dataset option(s) {', '.join(unknown)}; "
            f"known: {', '.join(DEFAULTS)}"
        )
    merged = {**DEFAULTS, **options}
    for key, minimum in _MINIMUM.items():
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"synthetic dataset option {key} must be an integer >= {minimum}, got {value!r}"
            )
    noise = merged["noise"]
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0:
        raise ConfigError(f"synthetic dataset option noise must be a number >= 0, got {noise!r}")
    return merged


def info(**options: Any) -> DatasetInfo:
    o = _options(options)
    return DatasetInfo("synthetic", o["in_channels"], o["image_size"], o["num_classes"])


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream]])


def _prototypes(o: dict[str, Any]) -> torch.Tensor:
    """One smooth image per class [num_classes, C, H, W], each with zero mean and unit std."""
    shape = (o["num_classes"], o["in_channels"], _PROTOTYPE_SIZE, _PROTOTYPE_SIZE)
    coarse = torch.from_numpy(_rng(o["seed"], "prototypes").standard_normal(shape, np.float32))
    size = o["image_size"]
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    flat = smooth.flatten(1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)
    return flat.view_as(smooth)


def load(
    split: str, data_dir: str | os.PathLike[str] | None = None, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 images [N, C, H, W] with about unit variance, and balanced int64 labels [N].

    `data_dir` is accepted for a uniform loader signature and ignored: nothing is read.
    """
    check_split(split)
    o = _options(options)
    n = o["num_samples"] if split == "train" else max(1, round(o["num_samples"] * TEST_FRACTION))
    rng = _rng(o["seed"], split)
    labels = torch.from_numpy(rng.permutation(np.arange(n) % o["num_classes"]).astype(np.int64))
    prototypes = _prototypes(o)
    noise = torch.from_numpy(rng.standard_normal((n, *prototypes.shape[1:]), np.float32))
    images = (prototypes[labels] + o["noise"] * noise) / float(np.sqrt(1.0 + o["noise"] ** 2))
    return images, labels
