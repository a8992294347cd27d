"""Run configuration: YAML file -> validated, frozen dataclasses, with ``--set a.b=value`` overrides.

Every key has a default (the dataclass field), so an empty file is the default run. Unknown keys
are errors naming the full dotted key and the closest valid one: a typo must not silently train
the wrong thing. The three ``options`` mappings (model, data, method) accept any key here; their
owners (model builder, dataset, method) reject unknown ones by name when the run is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsetrain.errors import ConfigError
from sparsetrain.typecheck import conform

__all__ = [
    "Config",
    "DataConfig",
    "LRScheduleConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SparsityConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_yaml",
    "resolve",
    "save_config",
]

OPTIMIZERS = ("sgd", "adamw")
LOGGERS = ("tensorboard",)  # sinks for the step and epoch records besides the JSON lines files
STRATEGIES = ("ddp", "fsdp")  # torchrun: replicated weights, or sharded (FSDP2 fully_shard)
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small_cnn"  # a name from sparsetrain.models.list_models()
    width: float = 1.0  # multiplies every hidden width
    options: dict[str, Any] = field(default_factory=dict)  # the builder's own keywords


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"  # a name from sparsetrain.data.list_datasets()
    dir: str | None = None  # None: the dataset's default location
    options: dict[str, Any] = field(default_factory=dict)  # e.g. synthetic: {num_samples: 512}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    seed: int = 0
    out: str | None = None  # run directory; None: runs/<method>-<model>-<name or timestamp>
    name: str | None = None
    eval_every: int = 1  # epochs between test evaluations (the last epoch is always evaluated)
    device: str = "cpu"  # cpu, cuda, cuda:N
    num_workers: int = 0  # DataLoader workers; the data is in memory, so 0 is usually fastest
    log_every: int = 10  # steps between step records (steps.jsonl) and loss log lines; 0: none
    save_every: int = 0  # optimizer steps between checkpoints; 0: at the end of every epoch
    keep: int = 2  # checkpoints kept in <out>/checkpoints (an old one goes once a new one is whole)
    skip_nonfinite: bool = False  # skip the update of a batch whose loss is inf/nan, not stop
    check_masks_every: int = 0  # torchrun: steps between cross-rank mask hash checks; 0: at the end
    loggers: list[str] = field(default_factory=list)  # beside the JSON lines files: tensorboard
    strategy: str = "ddp"  # torchrun: ddp (every rank holds the model) or fsdp (sharded)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # sgd or adamw
    lr: float = 0.05
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 5.0e-4
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    fused: bool = False  # one fused kernel per step (saves SGD's weight-decay temporary)


@dataclass(frozen=True)
class LRScheduleConfig:
    name: str = "cosine"  # cosine (to 0), step (x gamma at each milestone) or constant
    warmup_epochs: float = 0.0  # linear warm-up from lr / warmup_steps, then the schedule
    milestones: tuple[float, ...] = ()  # step only: epochs at which the lr is multiplied by gamma
    gamma: float = 0.1  # step only


@dataclass(frozen=True)
class SparsityConfig:
    method: str = "acdc"  # a name from sparsetrain.list_methods()
    sparsity: float | list[float] = 0.9  # fraction of zeros in [0, 1); a list for AST
    distribution: str | None = None  # uniform, erk or global; None: the method's default
    dense: list[str] = field(default_factory=list)  # parameter-name globs kept dense
    include: list[str] | None = None  # parameter-name globs made sparse instead of ndim >= 2
    dense_first: bool = False  # keep the first sparse parameter dense
    dense_last: bool = False  # keep the last sparse parameter dense
    erk_power: float = 1.0
    min_density: float = 0.01  # no layer keeps fewer than this fraction of its weights
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # {name glob: sparsity}
    seed: int | None = None  # mask seed; None: train.seed
    kernels: str = "dense"  # dense, sparse or auto: Linear and conv layers on sparse kernels
    options: dict[str, Any] = field(default_factory=dict)  # method options (sparsetrain methods)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples) that ``config_from_dict`` reads back."""
        return _plain(dataclasses.asdict(self))


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)
_FREE = {"model.options", "data.options", "sparsity.options", "sparsity.layer_sparsity"}  # mappings with any keys


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _valid_keys() -> list[str]:
    keys = []
    for section, cls in _SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, [*_SECTIONS, *_valid_keys()], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _check_keys(raw: Mapping[str, Any], where: str) -> None:
    for section, body in raw.items():
        if section not in _SECTIONS:
            raise _unknown_key(str(section), where)
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"config section {section!r}{where} must be a mapping, got {body!r}")
        names = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        for key in body:
            if key not in names:
                raise _unknown_key(f"{section}.{key}", where)


def _section(section: str, body: Mapping[str, Any] | None) -> Any:
    cls = _SECTIONS[section]
    hints = typing.get_type_hints(cls)
    values = {
        k: conform(v, hints[k], f"config key '{section}.{k}'", none="null")
        for k, v in (body or {}).items()
    }
    return cls(**values)


# -------------------------------------------------------------- validation
def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown {value!r}{hint}; choose one of {', '.join(choices)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config key {key!r} must be {bound}, got {value!r}")


def _validate(config: Config) -> None:
    from sparsetrain.data import dataset_info, list_datasets
    from sparsetrain.distributions import DISTRIBUTIONS
    from sparsetrain.kernels import KERNEL_MODES
    from sparsetrain.methods import check_options, check_sparsity_count, list_methods
    from sparsetrain.models import list_models

    _choice("model.name", config.model.name, list_models())
    _choice("data.name", config.data.name, list_datasets())
    dataset_info(config.data.name, **config.data.options)  # rejects unknown data options
    _choice("sparsity.method", config.sparsity.method, list_methods())
    _choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
    _choice("lr_schedule.name", config.lr_schedule.name, SCHEDULES)
    if config.sparsity.distribution is not None:
        _choice("sparsity.distribution", config.sparsity.distribution, DISTRIBUTIONS)
    _choice("sparsity.kernels", config.sparsity.kernels, KERNEL_MODES)
    _choice("train.strategy", config.train.strategy, STRATEGIES)
    if config.train.strategy == "fsdp":
        from sparsetrain.train.fsdp import sharded_config_problem

        if problem := sharded_config_problem(config.sparsity.kernels, config.sparsity.options):
            raise ConfigError(problem)

    t = config.train
    _positive("model.width", config.model.width)
    for key in ("epochs", "batch_size", "eval_every"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("num_workers", "log_every", "save_every", "check_masks_every"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    _positive("train.keep", t.keep)
    for logger in t.loggers:
        _choice("train.loggers", logger, LOGGERS)
    if t.device != "cpu" and t.device != "cuda" and not t.device.startswith("cuda:"):
        raise ConfigError(f"train.device must be cpu, cuda or cuda:N, got {t.device!r}")

    o = config.optimizer
    _positive("optimizer.lr", o.lr)
    for key in ("momentum", "weight_decay"):
        _positive(f"optimizer.{key}", getattr(o, key), allow_zero=True)
    if o.nesterov and (o.name != "sgd" or o.momentum == 0):
        raise ConfigError("optimizer.nesterov needs optimizer.name sgd with momentum > 0")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optimizer.betas must lie in [0, 1), got {list(o.betas)}")

    s = config.lr_schedule
    _positive("lr_schedule.warmup_epochs", s.warmup_epochs, allow_zero=True)
    if s.warmup_epochs >= t.epochs:
        raise ConfigError(
            f"lr_schedule.warmup_epochs ({s.warmup_epochs}) must be less than train.epochs "
            f"({t.epochs})"
        )
    _positive("lr_schedule.gamma", s.gamma)
    if s.name == "step" and not s.milestones:
        raise ConfigError("lr_schedule.milestones (epochs) must be given for the step schedule")
    if list(s.milestones) != sorted(s.milestones) or any(m <= 0 for m in s.milestones):
        raise ConfigError(f"lr_schedule.milestones must be increasing and > 0, got {s.milestones}")

    sp = config.sparsity
    levels = sp.sparsity if isinstance(sp.sparsity, list) else [sp.sparsity]
    if not levels:
        raise ConfigError("sparsity.sparsity list is empty")
    for level in levels:
        if not 0.0 <= level < 1.0:
            raise ConfigError(f"sparsity.sparsity must lie in [0, 1), got {level}")
    check_sparsity_count(sp.method, sp.sparsity, "sparsity.sparsity")
    check_options(sp.method, sp.options, prefix="sparsity.options.", none="null")


# ------------------------------------------------------------------ public
def config_from_dict(raw: Mapping[str, Any] | None, where: str = "") -> Config:
    """Build and validate a :class:`Config` from a nested mapping (missing keys take defaults).

    ``where`` (e.g. ``" in run.yaml"``) is appended to error messages to say where a key came from.
    """
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections{where}, got {raw!r}")
    _check_keys(raw, where)
    config = Config(**{name: _section(name, raw.get(name)) for name in _SECTIONS})
    _validate(config)
    return config


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); people write numbers that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that ``1e-3``, ``5E4`` and ``1.0e3`` are numbers too."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. optimizer.lr=0.1), got {item!r}")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({error})") from None
    return key.strip().split("."), value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=value`` of ``overrides`` set (values parsed as YAML).

    ``sparsity.options.name=value`` sets one method option; other keys must name a config field.
    """
    out = _plain(dict(raw))
    for item in overrides:
        path, value = _parse_override(item)
        dotted = ".".join(path)
        if len(path) == 1 and path[0] in _SECTIONS:
            raise ConfigError(f"--set {item!r}: {path[0]!r} is a section; set one of its keys")
        if path[0] not in _SECTIONS:
            raise _unknown_key(dotted, " (from --set)")
        if len(path) >= 2:
            _check_keys({path[0]: {path[1]: None}}, " (from --set)")
        free = ".".join(path[:2]) in _FREE
        if len(path) < 2 or (len(path) > 2 and not free) or (free and len(path) > 3):
            raise _unknown_key(dotted, " (from --set)")
        node = out
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(path[: depth + 1])
                raise ConfigError(f"--set {dotted}: {prefix!r} is not a mapping")
            node = child
        node[path[-1]] = value
    return out


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and start is not None:
            problem += f" ({context} started at line {start.line + 1})"
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (None: all defaults) and apply ``--set`` style ``overrides``."""
    raw: Any = {}
    where = ""
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path) or {}
        where = f" in {path}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: a config must be a mapping of sections, got {raw!r}")
        _check_keys(raw, where)
    if overrides:
        raw = apply_overrides(raw, overrides)
        where = f"{where} (or --set)" if where else " (from --set)"
    return config_from_dict(raw, where)


def resolve(config: Config, now: float | None = None) -> Config:
    """Fill in what the defaults leave open, so the saved config says exactly what ran.

    ``sparsity.seed`` <- ``train.seed``; ``sparsity.distribution`` <- the method's default;
    ``train.out`` <- ``runs/<method>-<model>-<train.name or a timestamp>``.
    """
    from sparsetrain.methods import get_method

    sp = config.sparsity
    seed = config.train.seed if sp.seed is None else sp.seed
    distribution = sp.distribution or get_method(sp.method).default_distribution
    out = config.train.out
    if out is None:
        tag = config.train.name or time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        out = str(Path("runs") / f"{sp.method}-{config.model.name}-{tag}")
    return dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, out=out),
        sparsity=dataclasses.replace(sp, seed=seed, distribution=distribution),
    )


def save_config(config: Config, path: str | Path) -> Path:
    """Write ``config`` as YAML (the sections in their usual order)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path
