"""Registered sparse-training methods; every module in this package registers its own."""

import importlib
import pkgutil

from sparsetrain.methods.base import Method
from sparsetrain.methods.registry import (
    build_method,
    check_options,
    check_sparsity_count,
    get_method,
    list_methods,
    method_options,
    option_types,
    register_method,
)

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in {"base", "registry"}:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Method",
    "build_method",
    "check_options",
    "check_sparsity_count",
    "get_method",
    "list_methods",
    "method_options",
    "option_types",
    "register_method",
]
