"""The comparison grid: which runs ``sparsetrain compare`` makes, each named by a stable key.

A grid file holds the shared training setup (``base``: the sections of a ``sparsetrain train``
config) and the axes: ``models``, ``sparsities``, ``seeds`` and ``variants``. A model may give its
own ``seeds`` or ``sparsities`` (replacing the grid's for it) and ``set`` overrides. A variant
is a method with its options, optional ``set`` overrides of ``sparsity.*`` keys (e.g.
``sparsity.dense_last=true``) and a ``kind``:

``sparse``  one run per sparsity (static, GMP, SET, RigL, DSR, AC/DC, GaP, ...)
``dense``   one run per model and seed, sparsity 0 (the dense baseline)
``thin``    a dense model narrowed to the sparse model's parameter count, one per sparsity
``multi``   one run for all of the variant's own ``sparsities`` (AST's nested sub-networks)

An optional ``quick`` section replaces any of the axes and adds ``set`` overrides for a smoke run.
Cells differ only in what the axes name: model, data, epochs, optimizer and lr schedule are the
same for every method of a model.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsetrain.errors import ConfigError
from sparsetrain.train.config import Config, apply_overrides, config_from_dict, parse_yaml

__all__ = ["KINDS", "Cell", "Grid", "Variant", "expand", "load_grid", "grid_from_dict"]

KINDS = ("sparse", "dense", "thin", "multi")
_TOP_KEYS = {"base", "models", "sparsities", "seeds", "variants", "quick"}
_QUICK_KEYS = {"models", "sparsities", "seeds", "variants", "set"}
_VARIANT_KEYS = {"method", "kind", "distribution", "options", "sparsities", "set"}
_MODEL_KEYS = {"seeds", "sparsities", "set"}


@dataclass(frozen=True)
class Variant:
    """One method setting of the grid (a table row)."""

    name: str
    method: str
    kind: str = "sparse"
    distribution: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    sparsities: tuple[float, ...] = ()  # multi only: the sub-networks of the single run
    overrides: tuple[str, ...] = ()  # sparsity.* keys of this variant (e.g. dense_last=true)


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    model: str
    variant: Variant
    sparsity: float | tuple[float, ...]  # 0.0 for dense, the tuple for multi
    seed: int
    overrides: tuple[str, ...] = ()  # the model's --set overrides, then the command line's

    @property
    def key(self) -> str:
        """Stable identity (model, variant, sparsity, seed): what resuming matches on."""
        levels = self.sparsity if isinstance(self.sparsity, tuple) else (self.sparsity,)
        tag = "+".join(f"{s:g}" for s in levels)
        return f"{self.model}/{self.variant.name}/{tag}/seed{self.seed}"


@dataclass(frozen=True)
class Grid:
    """A parsed grid file: the shared setup and the axes."""

    base: dict[str, Any]
    models: dict[str, dict[str, Any]]  # name -> {"seeds", "sparsities": tuple | None, "set"}
    sparsities: tuple[float, ...]
    seeds: tuple[int, ...]
    variants: tuple[Variant, ...]
    overrides: tuple[str, ...] = ()  # quick and command-line --set, applied to every cell

    def config_for(self, cell: Cell, out: str | Path) -> Config:
        """The validated ``sparsetrain train`` config of ``cell`` writing to ``out``."""
        raw = apply_overrides(self.base, [*cell.overrides]) if cell.overrides else dict(self.base)
        raw = copy.deepcopy(raw)
        v = cell.variant
        raw.setdefault("model", {})["name"] = cell.model
        raw.setdefault("train", {}).update(seed=cell.seed, out=str(out))
        sparsity = list(cell.sparsity) if isinstance(cell.sparsity, tuple) else cell.sparsity
        raw["sparsity"] = {
            **(raw.get("sparsity") or {}),
            "method": v.method,
            "sparsity": 0.0 if v.kind in ("dense", "thin") else sparsity,
            "distribution": v.distribution,
            "options": dict(v.options),
        }
        if v.overrides:
            raw = apply_overrides(raw, list(v.overrides))
        return config_from_dict(raw, f" in compare cell {cell.key}")

    def setup_id(self, cell: Cell) -> str:
        """Fingerprint of what every cell of ``cell.model`` shares (data, epochs, optimizer, ...).

        Stored with each result, so a re-run with another setup cannot mix into the same table.
        Only values that differ from the defaults count: a config key added later, at its
        default, leaves the fingerprint of existing results unchanged.
        """
        config, default = self.config_for(cell, "-").to_dict(), Config().to_dict()
        ignore = {"train": {"seed", "out", "name", "device"}, "model": {"width"}}
        shared = {
            section: {
                k: v
                for k, v in config[section].items()
                if k not in ignore.get(section, ()) and v != default[section].get(k)
            }
            for section in ("model", "data", "train", "optimizer", "lr_schedule")
        }
        text = json.dumps(shared, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_keys(body: Any, allowed: set[str], where: str) -> Mapping[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {body!r}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(str, unknown))} in {where}; "
            f"valid: {', '.join(sorted(allowed))}"
        )
    return body


def _levels(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of sparsities, got {value!r}")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 < s < 1.0:
            raise ConfigError(f"{where}: every sparsity must lie in (0, 1), got {s!r}")
    return tuple(float(s) for s in value)


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of integers, got {value!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in value):
        raise ConfigError(f"{where} must be a list of integers, got {value!r}")
    return tuple(value)


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of KEY=VALUE strings, got {value!r}")
    return tuple(value)


def _variant(name: str, body: Any) -> Variant:
    where = f"variants.{name}"
    body = _check_keys(body, _VARIANT_KEYS, where)
    if "method" not in body:
        raise ConfigError(f"{where} needs a method")
    kind = body.get("kind", "sparse")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: unknown {kind!r}; choose one of {', '.join(KINDS)}")
    if (kind == "multi") != ("sparsities" in body):
        raise ConfigError(f"{where}: sparsities are given exactly for kind multi")
    options = body.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}.options must be a mapping, got {options!r}")
    overrides = _overrides(body.get("set"), f"{where}.set")
    outside = [o for o in overrides if not o.startswith("sparsity.")]
    if outside:  # the rest of the setup is shared by every row of a model
        raise ConfigError(f"{where}.set may change only sparsity.* keys, not {', '.join(outside)}")
    return Variant(
        name=name,
        method=str(body["method"]),
        kind=kind,
        distribution=body.get("distribution"),
        options=dict(options),
        sparsities=_levels(body["sparsities"], f"{where}.sparsities") if kind == "multi" else (),
        overrides=overrides,
    )


def _models(value: Any, where: str) -> dict[str, dict[str, Any]]:
    if isinstance(value, list):
        value = dict.fromkeys(value)
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where} must name at least one model, got {value!r}")
    models = {}
    for name, body in value.items():
        body = _check_keys(body, _MODEL_KEYS, f"{where}.{name}")
        seeds, levels = body.get("seeds"), body.get("sparsities")
        models[str(name)] = {
            "seeds": None if seeds is None else _seeds(seeds, f"{where}.{name}.seeds"),
            "sparsities": None if levels is None else _levels(levels, f"{where}.{name}.sparsities"),
            "set": _overrides(body.get("set"), f"{where}.{name}.set"),
        }
    return models


def _pick(variants: tuple[Variant, ...], names: Sequence[str], where: str) -> tuple[Variant, ...]:
    known = {v.name: v for v in variants}
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(
            f"{where} names unknown variant(s): {', '.join(missing)}; "
            f"the grid has {', '.join(known)}"
        )
    return tuple(known[n] for n in names)


def grid_from_dict(
    raw: Mapping[str, Any],
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    variants: Sequence[str] | None = None,
) -> Grid:
    """Parse a grid mapping; ``quick`` applies its ``quick`` section, ``overrides`` every cell,
    ``variants`` keeps only the rows named (in that order)."""
    raw = _check_keys(raw, _TOP_KEYS, "the compare grid")
    base = raw.get("base") or {}
    if not isinstance(base, Mapping):
        raise ConfigError(f"base must be a mapping of config sections, got {base!r}")
    config_from_dict(base, " in the compare grid's base")  # every key checked up front
    variants_raw = _check_keys(raw.get("variants"), set(raw.get("variants") or {}), "variants")
    if not variants_raw:
        raise ConfigError("the compare grid needs at least one variant")
    rows = tuple(_variant(str(n), b) for n, b in variants_raw.items())
    models, extra = raw.get("models"), ()
    sparsities, seeds = raw.get("sparsities"), raw.get("seeds")
    if quick:
        q = _check_keys(raw.get("quick"), _QUICK_KEYS, "quick")
        models, sparsities = q.get("models", models), q.get("sparsities", sparsities)
        seeds, extra = q.get("seeds", seeds), _overrides(q.get("set"), "quick.set")
        if "variants" in q:
            rows = _pick(rows, q["variants"], "quick.variants")
    if variants is not None:
        rows = _pick(rows, variants, "--variants")
    grid = Grid(
        base=dict(base),
        models=_models(models, "models"),
        sparsities=_levels(sparsities, "sparsities"),
        seeds=_seeds(seeds, "seeds"),
        variants=rows,
        overrides=(*extra, *overrides),
    )
    for cell in expand(grid):  # every cell's config is valid before anything trains
        grid.config_for(cell, "-")
    return grid


def load_grid(
    path: str | Path,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    variants: Sequence[str] | None = None,
) -> Grid:
    """Read a grid YAML file (see the module docstring and :func:`grid_from_dict`)."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"compare grid {path} not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a compare grid must be a mapping, got {raw!r}")
    if quick and not raw.get("quick"):
        raise ConfigError(f"{path} has no quick section for --quick")
    return grid_from_dict(raw, quick=quick, overrides=overrides, variants=variants)


def expand(grid: Grid) -> list[Cell]:
    """Every cell, model by model, then seed, variant and sparsity (the order they run in)."""
    cells = []
    for model, setup in grid.models.items():
        overrides = (*setup["set"], *grid.overrides)
        for seed in setup["seeds"] or grid.seeds:
            for v in grid.variants:
                if v.kind == "dense":
                    levels: list[float | tuple[float, ...]] = [0.0]
                elif v.kind == "multi":
                    levels = [v.sparsities]
                else:
                    levels = list(setup["sparsities"] or grid.sparsities)
                cells += [Cell(model, v, s, seed, overrides) for s in levels]
    return cells
