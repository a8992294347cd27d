"""Progress bars for long steps: on a terminal only, never in CI or under a non-zero rank."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

__all__ = ["progress"]

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, *, hidden: bool = False, **options: Any) -> tqdm:
    """``tqdm(iterable)`` shown only on a terminal (``CI`` set or ``hidden``: never); the bar
    goes once done, so logs and results stay readable."""
    quiet = True if hidden or os.environ.get("CI") else None  # None: tqdm checks for a terminal
    return tqdm(iterable, desc=desc, leave=False, disable=quiet, **options)
