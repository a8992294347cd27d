"""Byte-level language-modelling data from a directory of text files: nothing to download.

``data.dir`` is read recursively: every regular file that is UTF-8 text without NUL bytes is one
document (hidden files and directories are skipped, as are binary files). Without ``data.dir`` the
corpus is the running interpreter's standard library source, ``*.py`` under
``sysconfig.get_paths()["stdlib"]`` minus test suites and installed packages: always present,
the same for a given Python version, and about 12 MB in 734 files for CPython 3.11.

Tokens are the documents' bytes (a vocabulary of 256, no vocabulary file), so the loss in bits
is bits per byte. A document goes to validation when a hash of its path relative to the
directory falls below ``val_fraction``: the split holds on every machine and does not move when
files are added or removed. Each split's documents are concatenated in path order. Training
samples are ``max_train_tokens // block_size`` windows of ``block_size + 1`` bytes (inputs and
next-byte targets) at random offsets of the train stream, drawn from ``seed``; validation samples
are evenly spaced windows over the whole validation stream, the same in every run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from pathlib import Path
from typing import Any

import torch

from sparsetrain.data.base import DatasetInfo, check_split, resolve_dir
from sparsetrain.errors import ConfigError, DataError
from sparsetrain.tasks import LANGUAGE_MODEL

__all__ = ["DEFAULTS", "documents", "info", "load", "split_of", "stdlib_dir"]

log = logging.getLogger(__name__)

VOCAB_SIZE = 256  # bytes
DEFAULTS: dict[str, Any] = {
    "block_size": 128,  # tokens per sample (the model's context)
    "max_train_tokens": 1_048_576,  # training tokens per epoch: this many // block_size windows
    "max_val_tokens": 131_072,  # validation tokens (fewer if the validation stream is shorter)
    "val_fraction": 0.1,  # expected fraction of documents in validation
    "seed": 0,  # training window offsets
}
_MINIMUM = {"block_size": 1, "max_train_tokens": 1, "max_val_tokens": 1, "seed": 0}
# Not the standard library's own source: test suites, installed packages, bytecode; also skipped
# are the build configuration (config-*/) and the generated _sysconfigdata_*.py of this build.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HINT = (
    "pass a directory of UTF-8 text files with --data-dir or data.dir "
    "(the default is the Python standard library's source)"
)


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked, so a typo or a bad value fails loudly."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown text dataset option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}"
        )
    merged = {**DEFAULTS, **options}
    for key, minimum in _MINIMUM.items():
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"text dataset option {key} must be an integer >= {minimum}, got {value!r}"
            )
    fraction = merged["val_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ConfigError(f"text dataset option val_fraction must lie in (0, 1), got {fraction!r}")
    return merged


def info(**options: Any) -> DatasetInfo:
    o = _options(options)
    return DatasetInfo("text", 1, o["block_size"], VOCAB_SIZE, task=LANGUAGE_MODEL)


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str, val_fraction: float) -> str:
    """``"test"`` (validation) or ``"train"`` for a document, from a hash of its relative path."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _files(root: Path, default: bool) -> list[str]:
    """Relative paths (``/``-separated, sorted) of the candidate documents under ``root``."""
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and not (default and _skip(d))]
        for name in names:
            path = Path(directory) / name
            if name.startswith(".") or not path.is_file():
                continue
            if default and (path.suffix != ".py" or name.startswith("_sysconfigdata")):
                continue
            found.append(path.relative_to(root).as_posix())
    return sorted(found)


def _skip(directory: str) -> bool:
    """Directories of the standard library that are not its own source."""
    return directory in _STDLIB_SKIP or directory.startswith("config-")


def _text(path: Path) -> bytes | None:
    """The file's bytes if it is UTF-8 text without NUL bytes, else None."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); {HINT}") from e
    if b"\0" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def documents(root: Path, split: str, val_fraction: float, default: bool = False) -> list[bytes]:
    """The text documents of ``split`` under ``root``, in path order (see the module docstring)."""
    paths = _files(root, default)
    if not paths:
        raise DataError(f"text directory {root} holds no files; {HINT}")
    mine = [p for p in paths if split_of(p, val_fraction) == split]
    if not mine:
        raise DataError(
            f"text directory {root}: none of its {len(paths)} files falls in the {split} split "
            f"(val_fraction {val_fraction}); add files or change data.options.val_fraction"
        )
    docs = [d for d in (_text(root / p) for p in mine) if d is not None]
    if not docs:
        raise DataError(
            f"text directory {root}: none of the {len(mine)} files of the {split} split is text "
            f"(UTF-8 without NUL bytes); {HINT}"
        )
    if len(docs) < len(mine):
        log.info("text %s: skipped %d binary files of %d", split, len(mine) - len(docs), len(mine))
    return docs


def _windows(stream: torch.Tensor, starts: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """Inputs ``stream[s : s + block]`` and targets ``stream[s + 1 : s + block + 1]``, int64."""
    rows = stream[starts[:, None] + torch.arange(block + 1)].long()
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def load(
    split: str, data_dir: str | os.PathLike[str] | None = None, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 byte windows ``[N, block_size]`` and their next-byte targets of ``split``."""
    check_split(split)
    o = _options(options)
    root = resolve_dir(data_dir, stdlib_dir(), "text", HINT)
    docs = documents(root, split, o["val_fraction"], default=data_dir is None)
    stream = torch.frombuffer(bytearray(b"".join(docs)), dtype=torch.uint8)
    block = o["block_size"]
    room = len(stream) - block  # windows start at 0 .. room - 1
    if room < 1:
        raise DataError(
            f"text directory {root}: the {split} split has {len(stream)} bytes, fewer than "
            f"block_size + 1 = {block + 1}; {HINT} or lower data.options.block_size"
        )
    if split == "train":
        n = max(1, o["max_train_tokens"] // block)
        generator = torch.Generator().manual_seed(o["seed"])
        starts = torch.randint(0, room, (n,), generator=generator)
    else:
        n = max(1, min(o["max_val_tokens"], room) // block)
        starts = torch.linspace(0, room - 1, n).round().long()
    log.info("text %s: %d documents, %d bytes from %s", split, len(docs), len(stream), root)
    return _windows(stream, starts, block)
