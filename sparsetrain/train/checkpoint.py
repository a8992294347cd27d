"""Checkpoint files: one versioned dict per save, written atomically and verified on load.

On disk a checkpoint is a one-line JSON header followed by the ``torch.save`` payload::

    sparsetrain-checkpoint {"version": 1, "size": 123456, "sha256": "..."}\\n<payload bytes>

The header's hash covers the payload, so a truncated or corrupted file is refused before anything
is unpickled, and loading never returns a half-read state. The payload is read with
``weights_only=True``: it holds only tensors and plain Python values (the RNG states included).
Files are written to a temporary file in the target directory, flushed, fsynced and then renamed
over the target, so a crash mid-save leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsetrain.errors import CheckpointError

__all__ = [
    "FORMAT",
    "VERSION",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "state_checkpoint",
]

FORMAT = "sparsetrain-checkpoint"
VERSION = 1
_MAGIC = FORMAT.encode() + b" "
_MAX_HEADER = 4096


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Atomically write ``checkpoint`` (a dict of tensors and plain values) to ``path``.

    ``format`` and ``version`` are set here; everything else is the caller's.
    """
    path = Path(path)
    payload = {**checkpoint, "format": FORMAT, "version": VERSION}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    header = {"version": VERSION, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + json.dumps(header).encode() + b"\n")
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_version(version: Any, path: Path) -> None:
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: checkpoint has no valid format version ({version!r})")
    if version > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this sparsetrain "
            f"reads (up to {VERSION}); upgrade sparsetrain"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises CheckpointError naming the file if it is not a sparsetrain checkpoint, was written by a
    newer format version, or its content does not match its hash (truncated or corrupted).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.readline(_MAX_HEADER)
            data = f.read()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}") from None
    if not head.startswith(_MAGIC) or not head.endswith(b"\n"):
        raise CheckpointError(f"{path} is not a sparsetrain checkpoint")
    try:
        header = json.loads(head[len(_MAGIC) :])
        size, digest = int(header["size"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: checkpoint header is corrupt") from None
    _check_version(header.get("version"), path)
    if len(data) != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: payload has {len(data)} bytes, header says {size}"
        )
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupt: its content does not match its sha256 hash")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # a payload that hashes right but does not unpickle
        raise CheckpointError(f"{path}: cannot read checkpoint payload ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sparsetrain checkpoint")
    _check_version(payload.get("version"), path)
    return payload


def capture_rng(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a run draws from, as tensors and plain values (safe to load)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
        "loader": None if loader_generator is None else loader_generator.get_state(),
    }


def restore_rng(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])


def state_checkpoint(state: Any, config: Any, data: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict of a training state (``TrainState``, ``Config``, ``Data`` of the loop).

    ``save_checkpoint`` adds ``format`` and ``version``; ``metrics`` is the last epoch's record.
    """
    return {
        "model": state.model.state_dict(),
        "sparsifier": state.sparsifier.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "config": config.to_dict(),
        "rng": capture_rng(data.generator),
        "metrics": metrics,
    }
