"""Method registry: ``@register_method`` on a :class:`Method` subclass makes it a named method."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from sparsetrain.errors import ConfigError
from sparsetrain.methods.base import Method

__all__ = ["build_method", "get_method", "list_methods", "method_options", "register_method"]

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator registering a method under ``name``."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def list_methods() -> list[str]:
    """Names of all registered methods, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None


def method_options(cls: type[Method]) -> list[str]:
    """Names of the method-specific options (keyword arguments of ``__init__``)."""
    common = set(inspect.signature(Method.__init__).parameters)
    return [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name not in common and p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def build_method(name: str, common: dict[str, Any], options: dict[str, Any]) -> Method:
    """Instantiate method ``name``; an unknown option is an error listing the valid ones."""
    cls = get_method(name)
    valid = method_options(cls)
    unknown = [key for key in options if key not in valid]
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {name!r}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    return cls(**common, **options)
