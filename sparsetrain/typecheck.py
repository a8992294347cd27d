"""Values checked against type hints: one rule for config keys, ``sparsify`` arguments and method
options alike.

Values come from YAML files, ``--set`` and keyword arguments. A wrong one must be an error naming
the key, the value and what is expected, not a bare ``ValueError`` raised deep inside a method.
Integers are accepted for floats and integral floats for integers; lists for tuples; a bool is
never a number, a string never a list.
"""

from __future__ import annotations

import collections.abc
import math
import numbers
import types
import typing
from typing import Any

from sparsetrain.errors import ConfigError

__all__ = ["conform", "describe"]

_SEQUENCES = (list, tuple, collections.abc.Sequence)
_NOUNS = {bool: "a boolean", int: "an integer", float: "a finite number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


class _Mismatch(Exception):
    """The value does not fit the hint (turned into a ConfigError by :func:`conform`)."""


def conform(value: Any, hint: Any, what: str, none: str = "None") -> Any:
    """``value`` in the form ``hint`` declares (ints to floats, lists to tuples where declared).

    Raises ConfigError ``"<what> must be <describe(hint)>, got <value>"``; ``none`` is how the
    message writes None (``null`` for YAML keys).
    """
    try:
        return _conform(value, hint)
    except _Mismatch:
        raise ConfigError(f"{what} must be {describe(hint, none)}, got {value!r}") from None


def describe(hint: Any, none: str = "None") -> str:
    """What ``hint`` accepts, in words: ``float | None`` -> "a finite number or None"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        words = [describe(a, none) for a in args if a is not type(None)]
        return " or ".join(words + ([none] if type(None) in args else []))
    if origin in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"a list of {len(args)} {_plural(args[0])}"
            return f"a list of {len(args)} values ({', '.join(describe(a, none) for a in args)})"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping of names"
    if hint is Any:
        return "any value"
    return _NOUNS.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_plural(a) for a in args if a is not type(None))
    if origin in _SEQUENCES:
        return f"lists of {_plural(args[0])}" if args else "lists"
    return _PLURALS.get(hint, "values")


def _conform(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return _union(value, args)
    if origin in _SEQUENCES or hint in (list, tuple):
        return _sequence(value, origin or hint, args)
    if origin is dict or hint is dict:
        if not isinstance(value, collections.abc.Mapping) or not all(
            isinstance(k, str) for k in value
        ):
            raise _Mismatch
        return dict(value)
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Mismatch
        if not math.isfinite(value):
            raise _Mismatch
        return float(value)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _Mismatch
        return int(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _Mismatch
    return value


def _union(value: Any, args: tuple[Any, ...]) -> Any:
    if value is None and type(None) in args:
        return None
    for arg in (a for a in args if a is not type(None)):
        try:
            return _conform(value, arg)
        except _Mismatch:
            continue
    raise _Mismatch


def _sequence(value: Any, origin: Any, args: tuple[Any, ...]) -> Any:
    if not isinstance(value, list | tuple):
        raise _Mismatch
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_conform(v, a) for v, a in zip(value, args, strict=True))
    items = [_conform(v, args[0] if args else Any) for v in value]
    if origin is tuple:
        return tuple(items)
    if origin is list:
        return items
    return type(value)(items)  # an abstract Sequence keeps the caller's list or tuple
