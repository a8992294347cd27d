"""CIFAR-10 from the "python version" pickle batches, in a directory the user provides.

The batches are pickles, and a plain `pickle.load` runs whatever code a file names. Only the few
numpy constructors that the real batches use are allowed, so a tampered file fails with a
DataError instead of executing anything.
"""

from __future__ import annotations

import io
import os
import pickle
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
from sparsetrain.errors import DataError

INFO = DatasetInfo("cifar10", in_channels=3, image_size=32, num_classes=10)
MEAN = (0.4914, 0.4822, 0.4465)  # per-channel pixel mean and std of the 50k training images
STD = (0.2470, 0.2435, 0.2616)
HINT = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it and pass the "
    "directory with --data-dir or data.dir"
)
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_SUBDIR = "cifar-10-batches-py"
_PIXELS = 3 * 32 * 32
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def info(**options: Any) -> DatasetInfo:
    check_no_options(INFO.name, options)
    return INFO


def _batch_path(root: Path, name: str) -> Path:
    for path in (root / name, root / _SUBDIR / name):
        if path.is_file():
            return path
    raise DataError(f"{root / name} not found (nor in {root / _SUBDIR}); {HINT}")


def _field(batch: dict, key: str, path: Path) -> Any:
    """A batch field; keys are bytes in the original (Python 2) files, str in re-saved ones."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path}: not a CIFAR-10 batch (no {key!r} entry); {HINT}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 3, 32, 32] and labels [N] of one batch file, validated."""
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); {HINT}") from e
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DataError(f"{path}: corrupt CIFAR-10 batch ({type(e).__name__}: {e}); {HINT}") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}); {HINT}")
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, "labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(
            f"{path}: 'data' must be uint8 of shape [N, {_PIXELS}], "
            f"got {data.dtype} {list(data.shape)}; {HINT}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: {len(data)} images but labels of shape {list(labels.shape)} "
            f"and type {labels.dtype}; {HINT}"
        )
    check_labels(labels, INFO.num_classes, str(path), HINT)
    return data.reshape(-1, 3, 32, 32), labels


def load(split: str, data_dir: str | os.PathLike[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized float32 images [N, 3, 32, 32] and int64 labels [N] of `split`."""
    check_split(split)
    root = resolve_dir(data_dir, None, "CIFAR-10", HINT)
    parts = [_read_batch(_batch_path(root, name)) for name in _BATCHES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return normalize(images, MEAN, STD), torch.from_numpy(labels.astype(np.int64))
