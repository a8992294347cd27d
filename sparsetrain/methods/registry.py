"""Method registry: ``@register_method`` on a :class:`Method` subclass makes it a named method.

A method's options are the keyword-only arguments of its ``__init__``, and their type hints are
the contract: :func:`build_method` checks every option (and every common argument, against
:class:`Method`'s own signature) before the method sees it, so a wrong value is one
:class:`ConfigError` naming the option, the value and the type expected, for every method alike.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from sparsetrain.errors import ConfigError
from sparsetrain.methods.base import Method
from sparsetrain.typecheck import conform

__all__ = [
    "build_method",
    "check_method",
    "check_options",
    "check_sparsity_count",
    "get_method",
    "list_methods",
    "method_options",
    "option_types",
    "register_method",
    "takes_sparsity_list",
]

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
    return list(option_types(cls))


@functools.cache
def _signature_types(init: Callable[..., None]) -> dict[str, Any]:
    """Type hint of every keyword-only argument of ``init`` (Any where none is given)."""
    hints = typing.get_type_hints(init)
    return {
        p.name: hints.get(p.name, Any)
        for p in inspect.signature(init).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def option_types(cls: type[Method]) -> dict[str, Any]:
    """The declared type of each of ``cls``'s options, read from its ``__init__`` signature."""
    common = _signature_types(Method.__init__)
    return {k: v for k, v in _signature_types(cls.__init__).items() if k not in common}


def takes_sparsity_list(cls: type[Method]) -> bool:
    """Methods with sub-networks (they define ``use_subnet``) take one sparsity for each."""
    return callable(getattr(cls, "use_subnet", None))


def check_sparsity_count(name: str, sparsity: Any, what: str = "sparsity") -> None:
    """Refuse a list of sparsities for a method that trains one network."""
    if isinstance(sparsity, list | tuple) and not takes_sparsity_list(get_method(name)):
        nested = [n for n, cls in _METHODS.items() if takes_sparsity_list(cls)]
        raise ConfigError(
            f"{what}: method {name!r} takes one sparsity in [0, 1), got the list "
            f"{list(sparsity)} (one per sub-network is for {', '.join(nested) or 'none'})"
        )


def check_options(
    name: str, options: Mapping[str, Any], prefix: str = "", none: str = "None"
) -> dict[str, Any]:
    """``options`` of method ``name`` checked against their declared types (and converted as
    :func:`sparsetrain.typecheck.conform` does); an unknown name is an error with the closest
    valid one. ``prefix`` (e.g. ``"sparsity.options."``) and ``none`` shape the messages."""
    types = option_types(get_method(name))
    for option in options:
        if option not in types:
            close = difflib.get_close_matches(str(option), list(types), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown option '{prefix}{option}' for method {name!r}{hint}; "
                f"valid options: {', '.join(types) or 'none'}"
            )
    return {
        option: conform(value, types[option], f"option '{prefix}{option}' of method {name!r}", none)
        for option, value in options.items()
    }


def check_method(
    name: str, common: Mapping[str, Any], options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(common, options)`` of method ``name`` checked against their declared types, without
    building the method: what can be known before a model and the run's length exist (a training
    integration checks its arguments at construction with it). Values that depend on the run's
    length (schedules against ``total_steps``) are checked when the method is built."""
    get_method(name)
    types = _signature_types(Method.__init__)
    common = {key: conform(value, types.get(key, Any), key) for key, value in common.items()}
    check_sparsity_count(name, common.get("sparsity"))
    return common, check_options(name, options)


def build_method(name: str, common: dict[str, Any], options: dict[str, Any]) -> Method:
    """Instantiate method ``name`` once its common arguments and options have been checked."""
    common, options = check_method(name, common, options)
    return get_method(name)(**common, **options)
