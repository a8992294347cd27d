"""``sparsify``: the two lines a user adds to their own training loop."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sparsetrain import distributions, mask_ops, sharding
from sparsetrain.errors import ConfigError
from sparsetrain.kernels import KERNEL_MODES, use_kernels
from sparsetrain.masks import Sparsifier
from sparsetrain.methods import build_method
from sparsetrain.methods.registry import check_method
from sparsetrain.select import check_layer_sparsity, layer_overrides, select_parameters

__all__ = ["check_sparsify_arguments", "sparsify"]


def _check_sparsity(method: str, sparsity: float | Sequence[float] | None) -> float | list[float]:
    if sparsity is None:
        if method == "dense":
            return 0.0
        raise ConfigError(f"method {method!r} needs a sparsity in [0, 1)")
    if isinstance(sparsity, list | tuple):
        if not sparsity:
            raise ConfigError("sparsity list is empty")
        return [mask_ops.check_sparsity(s) for s in sparsity]
    return mask_ops.check_sparsity(sparsity)


def _check_density(value: float) -> float:
    try:
        density = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"min_density must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= density <= 1.0:
        raise ConfigError(f"min_density must be in [0, 1], got {value!r}")
    return density


def _check_materialized(params: dict[str, nn.Parameter]) -> None:
    """Masks are drawn from real weights (magnitudes, shapes on a device): refuse meta tensors."""
    meta = [name for name, p in params.items() if p.is_meta]
    if meta:
        raise ConfigError(
            f"{meta[0]} (and {len(meta) - 1} more) is on the meta device: materialise the model "
            "first (model.to_empty(device=...), then initialise its weights), then call sparsify"
        )


def _dense_alias(exclude: Sequence[str], dense: Sequence[str] | None) -> Sequence[str]:
    """``dense=`` is ``exclude=`` under the config's name; both at once would be ambiguous."""
    if dense is None:
        return exclude
    if exclude:
        raise ConfigError("give the layers kept dense as dense= or as exclude=, not both")
    return dense


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str = "static",
    sparsity: float | Sequence[float] | None = None,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
    distribution: str | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    dense: Sequence[str] | None = None,
    dense_first: bool = False,
    dense_last: bool = False,
    seed: int = 0,
    erk_power: float = 1.0,
    min_density: float = 0.01,
    layer_sparsity: Mapping[str, float] | None = None,
    kernels: str = "dense",
    **options: Any,
) -> Sparsifier:
    """Make ``model`` sparse and keep it so through ``optimizer.step()``; the loop stays the user's.

    Args:
        model: any ``nn.Module``; its modules and parameter names are left unchanged.
        optimizer: the optimizer over the model's parameters; masks are enforced through its
            step hooks (gradients before the step, weights and optimizer state after it).
        method: a name from :func:`sparsetrain.list_methods`.
        sparsity: fraction of zeros over the sparse parameters, in [0, 1) (a list for AST).
        total_steps: optimizer steps in the whole run (needed by scheduled methods).
        steps_per_epoch: optimizer steps per epoch (needed by epoch-based schedules).
        distribution: ``uniform``, ``erk`` or ``global``; None takes the method's default.
        include / exclude / dense_first / dense_last: layer selection (see
            :func:`sparsetrain.select.select_parameters`); ``exclude`` globs stay dense.
        dense: the same as ``exclude``, under the config file's name (``sparsity.dense``);
            giving both is an error.
        seed: seeds every random mask choice together with the tensor name and step.
        min_density: no layer keeps fewer than this fraction of its weights, whatever the
            distribution (a global top-k would otherwise empty small or low-magnitude layers);
            a layer held at the floor is logged as a warning. 0 removes the floor.
        layer_sparsity: ``{name glob: sparsity}``: exact sparsities for chosen layers; the
            others follow the distribution at ``sparsity`` among themselves.
        kernels: ``dense`` (masked dense layers), ``sparse`` (Linear layers train on CSR
            kernels, faster from ~80-90% sparsity on large layers; Conv1d/Conv2d layers on a
            direct sparse convolution compiled on first use, masked dense without a compiler)
            or ``auto`` (each layer on whichever it measures faster); the training mathematics
            is the same in all three (see :mod:`sparsetrain.kernels`).
        **options: method-specific options; unknown names, and values that do not fit the type
            the method declares for them, are errors.

    Returns:
        The :class:`Sparsifier`, with ``masks``, ``report()``, ``state_dict()``, ``export()``.
    """
    sparsity = _check_sparsity(method, sparsity)
    exclude = _dense_alias(exclude, dense)
    if kernels not in KERNEL_MODES:
        raise ConfigError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNEL_MODES)}")
    params = select_parameters(
        model, include=include, exclude=exclude, dense_first=dense_first, dense_last=dense_last
    )
    _check_materialized(params)
    sharding.check_supported(params, method, options, kernels)
    common = dict(
        sparsity=sparsity,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        distribution=distribution,
        seed=seed,
        erk_power=erk_power,
        min_density=_check_density(min_density),
        layer_sparsity=layer_overrides(layer_sparsity, list(params)),
    )
    policy = build_method(method, common, options)
    sp = Sparsifier(model, params, optimizer)
    sp.method = policy
    policy.init_masks(sp)
    use_kernels(sp, kernels)
    return sp


def check_sparsify_arguments(**kwargs: Any) -> dict[str, Any]:
    """Check keyword arguments meant for :func:`sparsify` before a model or optimizer exists.

    A training integration is configured long before its model, optimizer and run length are
    known; checking here makes an unknown method or option, a value of the wrong type or a
    sparsity out of range fail when the integration is built, not when training starts.
    Checks that need the model (layer names) or the run's length (schedules against
    ``total_steps``) are left to :func:`sparsify`. Returns the arguments as given.
    """
    for reserved in ("model", "optimizer"):
        if reserved in kwargs:
            raise ConfigError(
                f"{reserved!r} is not an argument here: it comes from the training loop"
            )
    try:
        bound = inspect.signature(sparsify).bind(None, None, **kwargs)
    except TypeError as error:
        raise ConfigError(f"bad arguments for sparsify: {error}") from None
    bound.apply_defaults()
    args = bound.arguments
    method = args["method"]
    sparsity = _check_sparsity(method, args["sparsity"])
    _dense_alias(args["exclude"], args["dense"])
    if args["kernels"] not in KERNEL_MODES:
        raise ConfigError(
            f"unknown kernels {args['kernels']!r}; choose one of {', '.join(KERNEL_MODES)}"
        )
    if args["distribution"] not in (None, *distributions.DISTRIBUTIONS):
        raise ConfigError(
            f"unknown distribution {args['distribution']!r}; "
            f"choose one of {', '.join(distributions.DISTRIBUTIONS)}"
        )
    common = dict(
        sparsity=sparsity,
        total_steps=args["total_steps"],
        steps_per_epoch=args["steps_per_epoch"],
        distribution=args["distribution"],
        seed=args["seed"],
        erk_power=args["erk_power"],
        min_density=_check_density(args["min_density"]),
    )
    check_layer_sparsity(args["layer_sparsity"])  # the patterns are matched once a model exists
    check_method(method, common, args["options"])
    return dict(kwargs)
