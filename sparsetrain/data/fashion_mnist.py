"""Fashion-MNIST and MNIST from their idx files.

The two share file names and format and differ only in normalization constants and in where the
files come from: Fashion-MNIST has a system-wide default (Debian package `dataset-fashion-mnist`),
MNIST must be given a directory. A torchvision download (`<dir>/FashionMNIST/raw`,
`<dir>/MNIST/raw`) is found as well, so existing copies can be reused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsetrain.data.base import (
    DatasetInfo,
    check_labels,
    check_no_options,
    check_split,
    normalize,
    resolve_dir,
)
from sparsetrain.data.idx import IMAGES_MAGIC, LABELS_MAGIC, find_idx_file, read_idx
from sparsetrain.errors import DataError

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxDataset:
    """One idx-format dataset: its shape, normalization and where its files are looked for."""

    spec: DatasetInfo
    title: str
    mean: float
    std: float
    default_dir: Path | None
    torchvision_dir: str
    hint: str

    def info(self, **options: Any) -> DatasetInfo:
        check_no_options(self.spec.name, options)
        return self.spec

    def load(
        self, split: str, data_dir: str | os.PathLike[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float32 images [N, 1, 28, 28] and int64 labels [N] of `split`."""
        check_split(split)
        root = resolve_dir(data_dir, self.default_dir, self.title, self.hint)
        directories = [root, root / self.torchvision_dir / "raw"]
        image_stem, label_stem = _FILES[split]
        image_path = find_idx_file(directories, image_stem, self.hint)
        label_path = find_idx_file(directories, label_stem, self.hint)
        images = read_idx(image_path, IMAGES_MAGIC, self.hint)
        labels = read_idx(label_path, LABELS_MAGIC, self.hint)

        size = self.spec.image_size
        if images.shape[1:] != (size, size):
            raise DataError(
                f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, "
                f"{self.title} images are {size}x{size}; {self.hint}"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} "
                f"labels (mismatched or truncated files); {self.hint}"
            )
        check_labels(labels, self.spec.num_classes, str(label_path), self.hint)
        x = normalize(images[:, None], [self.mean], [self.std])
        return x, torch.from_numpy(labels.astype(np.int64))


_DIR_HINT = "pass a directory holding the four idx files with --data-dir or data.dir"

FASHION_MNIST = IdxDataset(
    spec=DatasetInfo("fashion_mnist", in_channels=1, image_size=28, num_classes=10),
    title="Fashion-MNIST",
    mean=0.2860,  # pixel mean and std of the 60k training images, in [0, 1]
    std=0.3530,
    default_dir=Path("/usr/share/datasets/fashion-mnist"),
    torchvision_dir="FashionMNIST",
    hint=f"run `apt-get install dataset-fashion-mnist` or {_DIR_HINT}",
)

MNIST = IdxDataset(
    spec=DatasetInfo("mnist", in_channels=1, image_size=28, num_classes=10),
    title="MNIST",
    mean=0.1307,
    std=0.3081,
    default_dir=None,
    torchvision_dir="MNIST",
    hint=(
        f"download the MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) and {_DIR_HINT}"
    ),
)
