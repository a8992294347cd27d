"""Name -> builder registry, so configs and the CLI can name a model instead of importing it.

Every builder is called with the same four keywords (``in_channels``, ``num_classes``,
``image_size``, ``width``) plus its own options; ``build_model`` checks names and options up front
so a typo in a config fails with the valid choices instead of training the wrong network. Each
model is registered for a task (:mod:`sparsetrain.tasks`), so that an image classifier is never
paired with text, nor a language model with images.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable

from torch import nn

from sparsetrain.errors import ConfigError
from sparsetrain.tasks import CLASSIFICATION, check_task

__all__ = ["build_model", "list_models", "model_task", "register_model", "scale_width"]

Builder = Callable[..., nn.Module]

_COMMON = ("in_channels", "num_classes", "image_size", "width")
_REGISTRY: dict[str, Builder] = {}
_TASKS: dict[str, str] = {}


def register_model(name: str, task: str = CLASSIFICATION) -> Callable[[Builder], Builder]:
    """Decorator adding a builder under ``name`` for ``task``; the builder must take the four
    common keywords."""
    check_task(task)

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ConfigError(f"model {name!r} is already registered")
        params = inspect.signature(builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        missing = [key for key in _COMMON if key not in params]
        if missing and not takes_any:
            raise TypeError(f"model builder {name!r} must accept keyword(s) {', '.join(missing)}")
        _REGISTRY[name] = builder
        _TASKS[name] = task
        return builder

    return decorator


def list_models(task: str | None = None) -> list[str]:
    """Names accepted by ``build_model`` (those for ``task`` only, if given), sorted."""
    return sorted(name for name in _REGISTRY if task is None or _TASKS[name] == task)


def model_task(name: str) -> str:
    """The task model ``name`` is built for (``classification`` unless registered otherwise)."""
    _builder(name)  # an unknown name fails with the valid choices
    return _TASKS[name]


def scale_width(channels: int, width: float) -> int:
    """Scale a hidden width by ``width``, rounding half up and never below one unit."""
    return max(1, math.floor(channels * width + 0.5))


def _check_common(in_channels: int, num_classes: int, image_size: int, width: float) -> None:
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model {key} must be a positive integer, got {value!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"model image_size must be a positive integer, got {image_size!r}")
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0 < width < math.inf:
        raise ConfigError(f"model width must be a positive finite number, got {width!r}")


def _builder(name: str) -> Builder:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown model {name!r}{hint}; valid choices: {', '.join(list_models())}"
        ) from None


def build_model(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    width: float = 1.0,
    **kwargs: object,
) -> nn.Module:
    """Build the registered model ``name`` for inputs of shape ``[in_channels, image_size,
    image_size]``; ``width`` multiplies every hidden width so a thin dense baseline can match a
    sparse model's parameter count. Extra keywords are the model's own options."""
    builder = _builder(name)
    _check_common(in_channels, num_classes, image_size, width)
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = [key for key in params if key not in _COMMON]
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            valid = ", ".join(options) if options else "none"
            raise ConfigError(
                f"model {name!r} got unexpected option(s) {', '.join(unknown)}; "
                f"valid options: {valid} (plus {', '.join(_COMMON)})"
            )
    return builder(
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        width=float(width),
        **kwargs,
    )
