"""The YAML configs shipped with sparsetrain: one per method, the default run and the grids.

They are package data, so an installed sparsetrain has them; ``configs/`` at the repository root
is a link to this directory, not a copy. ``sparsetrain train rigl`` names one of them.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from sparsetrain.errors import ConfigError

__all__ = ["CONFIG_DIR", "find_config", "list_configs"]

CONFIG_DIR = Path(__file__).resolve().parent


def list_configs() -> list[str]:
    """Names of the shipped configs (``rigl``, ``compare``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` itself if it is a file, else the shipped config of that
    name (``rigl`` or ``rigl.yaml``); an error lists the shipped names when neither exists."""
    path = Path(name_or_path)
    if path.is_file() or len(path.parts) > 1:
        return path  # a path: a missing file is the loader's error, naming the path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    names = list_configs()
    close = difflib.get_close_matches(path.stem, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"no config file {str(name_or_path)!r} and no shipped config of that name{hint}; "
        f"shipped: {', '.join(names)}"
    )
