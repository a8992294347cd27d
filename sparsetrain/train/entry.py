"""``sparsetrain train``'s entry: the training loop, or a method that trains its own copies.

P-GaP (``gap`` with ``parallel: true``) trains one model copy per group and merges them, which
is not one model through one loop; it has its own runner (:mod:`sparsetrain.train.parallel_gap`).
The choice is made here, so the loop itself knows no method.
"""

from __future__ import annotations

from pathlib import Path

from sparsetrain.errors import ConfigError
from sparsetrain.train import loop
from sparsetrain.train.config import Config, resolve
from sparsetrain.train.resume import ResumePoint

__all__ = ["train"]


def _parallel_gap(config: Config) -> bool:
    return config.sparsity.method == "gap" and bool(config.sparsity.options.get("parallel"))


def train(
    config: Config | None = None,
    *,
    resume: str | Path | ResumePoint | None = None,
    overwrite: bool = False,
) -> loop.RunResult:
    """Train ``config`` (or continue ``resume``) with the loop or the method's own runner; the
    arguments are those of :func:`sparsetrain.train.loop.train`."""
    if config is not None and _parallel_gap(resolve(config)):
        if resume is not None:
            raise ConfigError("P-GaP runs cannot be resumed; start them again")
        from sparsetrain.train.parallel_gap import run_pgap

        return run_pgap(resolve(config), overwrite=overwrite)
    return loop.train(config, resume=resume, overwrite=overwrite)
