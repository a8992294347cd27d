"""Datasets by name: normalized float32 image tensors [N, C, H, W] with int64 labels, or (``text``)
int64 byte sequences [N, T] with their next-byte targets [N, T].

Everything is loaded into memory in one vectorized pass (these datasets are small) and nothing is
cached on disk, so the files stay the single source of truth.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils.data import TensorDataset

from sparsetrain.data import cifar10, synthetic, text
from sparsetrain.data.base import DatasetInfo, check_split
from sparsetrain.data.fashion_mnist import FASHION_MNIST, MNIST
from sparsetrain.errors import ConfigError

__all__ = ["DatasetInfo", "dataset_info", "list_datasets", "load_dataset"]

_log = logging.getLogger(__name__)


class _Dataset(NamedTuple):
    info: Callable[..., DatasetInfo]  # (**options) -> DatasetInfo, validating the options
    load: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (split, data_dir, **options)


_DATASETS: dict[str, _Dataset] = {
    "fashion_mnist": _Dataset(FASHION_MNIST.info, FASHION_MNIST.load),
    "mnist": _Dataset(MNIST.info, MNIST.load),
    "cifar10": _Dataset(cifar10.info, cifar10.load),
    "synthetic": _Dataset(synthetic.info, synthetic.load),
    "text": _Dataset(text.info, text.load),
}


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset` and `dataset_info`."""
    return list(_DATASETS)


def _lookup(name: str) -> _Dataset:
    try:
        return _DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(_DATASETS)}") from None


def dataset_info(name: str, **options: Any) -> DatasetInfo:
    """Shape, classes and task of a dataset, without reading it (to build a model)."""
    _train_subset(options)
    return _lookup(name).info(**options)


def _train_subset(options: dict[str, Any]) -> int | None:
    """Pop and check ``train_subset``, an option of every dataset (short comparison runs)."""
    n = options.pop("train_subset", None)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"dataset option train_subset must be an integer >= 1, got {n!r}")
    return n


def load_dataset(
    name: str, split: str, data_dir: str | os.PathLike[str] | None = None, **options: Any
) -> tuple[TensorDataset, DatasetInfo]:
    """The `split` ("train" or "test") of dataset `name`, fully in memory, with its description.

    `data_dir` overrides the dataset's default location (Fashion-MNIST and text have one; MNIST and
    CIFAR-10 need it). The option ``train_subset: N`` (any dataset) keeps N training examples, the same
    fixed random pick in every run; the test split stays whole. Missing or corrupt files raise
    DataError naming the file and how to obtain the data.
    """
    dataset = _lookup(name)
    check_split(split)
    subset = _train_subset(options)
    info = dataset.info(**options)
    images, labels = dataset.load(split, data_dir, **options)
    if subset is not None and split == "train" and subset < len(images):
        # The same examples for every run and seed: a permutation fixed by seed 0.
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:subset]
        images, labels = images[keep], labels[keep]
    _log.info(
        "loaded %s %s: %d samples of shape %s", name, split, len(images), tuple(images.shape[1:])
    )
    return TensorDataset(images, labels), info
