"""Checkpoint files: one versioned dict per save, written atomically and verified on load.

On disk a checkpoint is a one-line JSON header followed by the ``torch.save`` payload::

    sparsetrain-checkpoint {"version": 1, "size": 123456, "sha256": "..."}\\n<payload bytes>

The header's hash covers the payload, so a truncated or corrupted file is refused before anything
is unpickled, and loading never returns a half-read state. The payload is read with
``weights_only=True``: it holds only tensors and plain Python values (the RNG states included).
Files are written to a temporary file in the target directory, flushed, fsynced and then renamed
over the target (and the directory fsynced), so a crash mid-save leaves the previous file intact.

During training, :func:`save_rotating` writes ``<run dir>/checkpoints/step-<step>.pt`` and deletes
the oldest beyond ``keep`` only once the new one is complete. A training checkpoint
(:func:`state_checkpoint`) holds everything a resume needs: model, sparsifier (masks, targets,
the method's schedules, counters and thresholds), optimizer, lr scheduler, epoch, step, the
position inside the epoch with its partial metric sums, every RNG state, the sampler's state and
the resolved config.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsetrain.errors import CheckpointError
from sparsetrain.train import distributed, fsdp

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT",
    "VERSION",
    "capture_rng",
    "checkpoint_step",
    "list_checkpoints",
    "load_checkpoint",
    "remove_temporaries",
    "restore_rng",
    "save_checkpoint",
    "save_rotating",
    "state_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT = "sparsetrain-checkpoint"
VERSION = 1
_MAGIC = FORMAT.encode() + b" "
_MAX_HEADER = 4096
CHECKPOINT_DIR = "checkpoints"  # inside a run directory
_STEP_NAME = re.compile(r"step-(\d+)\.pt")
_TEMPORARY = ".*.pt.*.tmp"  # save_checkpoint's temporary files: .<name>.<random>.tmp


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Atomically write ``checkpoint`` (a dict of tensors and plain values) to ``path``.

    ``format`` and ``version`` are set here; everything else is the caller's. Under
    ``torch.distributed`` only rank 0 writes (the others return ``path``), so every rank may call
    it with the same arguments.
    """
    path = Path(path)
    checkpoint = fsdp.save_parts(path, checkpoint, resumable=checkpoint_step(path) is not None)
    if distributed.rank() != 0:
        return path
    payload = {**checkpoint, "format": FORMAT, "version": VERSION}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    header = {"version": VERSION, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # not mkstemp's 0600: runs are shared
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def checkpoint_step(path: Path) -> int | None:
    """The step in a rotating checkpoint's name (``step-00000123.pt`` -> 123), else None."""
    match = _STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's rotating checkpoints, oldest first (temporary files of a torn save excluded)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def remove_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of saves that a kill cut short, in ``run_dir`` and its
    checkpoint folder; returns them. Only for a run (re)starting: no save is under way then."""
    run_dir = Path(run_dir)
    stale = [*run_dir.glob(_TEMPORARY), *(run_dir / CHECKPOINT_DIR).glob(_TEMPORARY)]
    for path in stale:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted save", path)
    return stale


def save_rotating(run_dir: str | Path, checkpoint: dict[str, Any], step: int, keep: int) -> Path:
    """Save ``<run_dir>/checkpoints/step-<step>.pt``; then delete all but the newest ``keep``.

    Older checkpoints are deleted only after the new one is complete on disk, so a crash at any
    moment leaves at least one loadable checkpoint once the first save finished.
    """
    if keep < 1:
        raise CheckpointError(f"keep must be at least 1 checkpoint, got {keep}")
    path = save_checkpoint(Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt", checkpoint)
    if distributed.rank() == 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            fsdp.remove_checkpoint(old)
            log.debug("removed old checkpoint %s", old)
    return path


def capture_rng(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a run draws from, as tensors and plain values (safe to load).

    On CUDA only the current device's generator is saved: each process drives one GPU.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if cuda else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
        "loader": None if loader_generator is None else loader_generator.get_state(),
    }


def restore_rng(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])


def state_checkpoint(state: Any, config: Any, data: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict of a training state (``TrainState``, ``Config``, ``Data`` of the loop).

    ``save_checkpoint`` adds ``format`` and ``version``; ``metrics`` is the last epoch's record.
    ``progress`` says how far into epoch ``epoch`` (completed epochs) training is, with the sums
    behind that epoch's train loss and accuracy; ``sampler`` fixes the data order (see
    :mod:`sparsetrain.train.sampler`).
    """
    progress = getattr(state, "progress", None)
    sampler = getattr(data, "sampler", None)
    return {
        **fsdp.training_parts(state),  # model, sparsifier, optimizer (sharded: saved beside)
        "scheduler": state.scheduler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "elapsed": state.elapsed,
        "progress": None if progress is None else progress.state_dict(),
        "sampler": None
        if sampler is None
        else {"seed": sampler.seed, "epoch": sampler.epoch, "world_size": sampler.world_size},
        "config": config.to_dict(),
        "rng": capture_rng(data.generator),
        "metrics": metrics,
    }
