"""Reader for the idx file format of MNIST and Fashion-MNIST, raw or gzip-compressed.

Format (big-endian): two zero bytes, a dtype byte (0x08 = unsigned byte), a byte giving the number
of dimensions, one uint32 per dimension, then the data. Every field is checked against the file
size so that a truncated download fails here, naming the file, instead of deep inside training.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from sparsetrain.errors import DataError

IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions: count, rows, columns
LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension: count
_GZIP_MAGIC = b"\x1f\x8b"


def find_idx_file(directories: list[Path], stem: str, hint: str) -> Path:
    """The first of `stem` or `stem.gz` in `directories`, in order."""
    for directory in directories:
        for path in (directory / stem, directory / f"{stem}.gz"):
            if path.is_file():
                return path
    raise DataError(f"{directories[0] / stem}[.gz] not found; {hint}")


def _read_bytes(path: Path, hint: str) -> bytes:
    """File contents, decompressed when they are gzip (detected by content, not by name)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); {hint}") from e
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e}); {hint}") from e


def read_idx(path: Path, magic: int, hint: str) -> np.ndarray:
    """The uint8 array stored in an idx file whose magic number must be `magic`.

    `hint` (how to obtain the data) ends every error message so that it stays one actionable line.
    """
    data = _read_bytes(path, hint)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an idx header; {hint}")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: not an idx file of the expected kind (magic number {found}, "
            f"expected {magic}); {hint}"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header; {hint}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path}: header declares {shape} bytes of data ({expected} bytes in all) but the file "
            f"holds {len(data)} (truncated or corrupt); {hint}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
