"""Partitions of the sparse layers into the groups that GaP grows and prunes one at a time.

A *layer* is the module that owns a sparse weight (a ``Linear``, a ``Conv2d``, an attention block
owning ``in_proj_weight``). GaP grows and prunes whole layers, so a layer's sparse weights always
go to the same group, and P-GaP's merge takes every parameter and buffer of a layer (its bias,
say) from the worker that grew it (:func:`layer_state_keys`).

A norm module (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm) normalises what the layer
before it computes, so its affine parameters and running statistics go with that layer: a norm
belongs to the nearest module before it in ``model.named_modules()`` order that owns parameters
and is not a norm (:func:`norm_owners`; small_cnn's ``features.0`` conv takes the BatchNorm after
the pool, a ResNet block's ``conv1`` takes ``bn1``). Averaging a BatchNorm over workers while its
conv came from one worker would normalise that conv with statistics of other weights. A norm whose
preceding layer is dense or in no group, or that comes before any layer, belongs to no group.
In a pre-activation network (``wrn``) a block's first norm normalises the previous block's sum
and goes with the previous block's last registered layer (its shortcut conv where it has one).

Two ways to partition:

* by count (the default, ``groups=kappa``): split the layers, in module order, into ``kappa``
  contiguous groups of about equal sparse parameter count. The GaP reference groups consecutive
  whole Transformer layers by hand; its rule for ResNet-50 is not public, so equal parameter
  count is our choice.
* by name: one list of globs per group, matched against the sparse parameter names and their
  layers' names (``"layer1.*"``, ``"fc1"``). A glob that matches nothing, or a layer claimed by two
  groups, is an error naming it. Layers that no group claims stay sparse at their ratio and are
  never grown.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparsetrain.errors import ConfigError

__all__ = [
    "Partition",
    "by_count",
    "by_globs",
    "layer_of",
    "layer_state_keys",
    "make_partition",
    "norm_owners",
]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


@dataclass(frozen=True)
class Partition:
    """Sparse parameter names per group (in module order) and the names in no group."""

    groups: tuple[tuple[str, ...], ...]
    ungrouped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.groups)

    def describe(self, sizes: Mapping[str, int] | None = None) -> str:
        """One line per group (layers and, with ``sizes``, parameter counts), for logs."""
        lines = []
        for index, names in enumerate(self.groups):
            layers = ", ".join(dict.fromkeys(layer_of(n) or "<root>" for n in names))
            count = f" ({sum(sizes[n] for n in names):,} weights)" if sizes else ""
            lines.append(f"group {index}{count}: {layers}")
        if self.ungrouped:
            lines.append(f"in no group (never grown): {', '.join(self.ungrouped)}")
        return "\n".join(lines)


def layer_of(name: str) -> str:
    """The owning module's name of parameter ``name`` (``""`` for the root module)."""
    return name.rpartition(".")[0]


def _layers(names: Iterable[str]) -> dict[str, list[str]]:
    """Layer name -> its sparse parameter names, layers in order of first appearance."""
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(layer_of(name), []).append(name)
    return layers


def by_count(params: Mapping[str, torch.Tensor], groups: int) -> Partition:
    """``groups`` contiguous groups of whole layers with about equal parameter counts.

    Cut ``j`` goes after the layer whose running count is nearest to ``j/groups`` of the total,
    leaving at least one layer for every group (ties go to the earlier cut).
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"GaP groups must be a positive integer, got {groups!r}")
    layers = _layers(params)
    if groups > len(layers):
        raise ConfigError(
            f"cannot split {len(layers)} sparse layers into {groups} groups; use at most "
            f"{len(layers)} groups"
        )
    sizes = [sum(params[n].numel() for n in names) for names in layers.values()]
    running = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    total = running[-1]
    cuts, previous = [], 0
    for j in range(1, groups):
        lowest, highest = previous + 1, len(sizes) - (groups - j)  # cut after `cut` layers
        target = j * total / groups
        cut = min(range(lowest, highest + 1), key=lambda c: abs(running[c - 1] - target))
        cuts.append(cut)
        previous = cut
    bounds = [0, *cuts, len(sizes)]
    names = list(layers.values())
    return Partition(
        tuple(
            tuple(n for layer in names[a:b] for n in layer) for a, b in itertools.pairwise(bounds)
        )
    )


def by_globs(
    params: Mapping[str, torch.Tensor], patterns: Sequence[Sequence[str] | str]
) -> Partition:
    """Groups named by globs over sparse parameter and layer names (a string is a 1-glob group)."""
    if isinstance(patterns, str) or not patterns:
        raise ConfigError(
            f"GaP partition must be a non-empty list of groups (each a list of name globs), "
            f"got {patterns!r}"
        )
    layers = _layers(params)
    owner: dict[str, int] = {}
    for index, group in enumerate(patterns):
        globs = [group] if isinstance(group, str) else list(group)
        if not globs or not all(isinstance(g, str) for g in globs):
            raise ConfigError(
                f"GaP partition group {index} must be a list of name globs, got {group!r}"
            )
        for glob in globs:
            hits = [
                layer
                for layer, names in layers.items()
                if fnmatch.fnmatchcase(layer, glob) or fnmatch.filter(names, glob)
            ]
            if not hits:
                raise ConfigError(
                    f"GaP partition glob {glob!r} (group {index}) matches no sparse layer; "
                    f"sparse parameters: {', '.join(params)}"
                )
            for layer in hits:
                if owner.get(layer, index) != index:
                    raise ConfigError(
                        f"layer {layer or '<root>'!r} is in GaP partition groups {owner[layer]} "
                        f"and {index}; a layer may be in one group only"
                    )
                owner[layer] = index
    groups = tuple(
        tuple(n for layer, names in layers.items() if owner.get(layer) == index for n in names)
        for index in range(len(patterns))
    )
    ungrouped = tuple(n for layer, names in layers.items() if layer not in owner for n in names)
    return Partition(groups, ungrouped)


def make_partition(
    params: Mapping[str, torch.Tensor],
    groups: int | None = None,
    partition: Sequence[Sequence[str] | str] | None = None,
) -> Partition:
    """:func:`by_globs` when ``partition`` is given, else :func:`by_count` with ``groups``."""
    if partition is not None:
        if groups is not None and groups != len(partition):
            raise ConfigError(
                f"GaP groups={groups} disagrees with the {len(partition)} groups of partition"
            )
        return by_globs(params, partition)
    if groups is None:
        raise ConfigError("GaP needs groups (a count) or partition (lists of name globs)")
    return by_count(params, groups)


def norm_owners(model: nn.Module) -> dict[str, str]:
    """Norm module name -> the layer whose output it normalises (see the module docstring).

    The owner is the nearest earlier module in ``named_modules()`` order with parameters of its own
    that is not a norm, so a norm after a dense layer stays with that dense layer rather than
    jumping back to an earlier sparse one. Norms before any such module are left out.
    """
    owners: dict[str, str] = {}
    previous: str | None = None
    for name, module in model.named_modules():
        if isinstance(module, _NORMS):
            if previous is not None:
                owners[name] = previous
        elif next(module.parameters(recurse=False), None) is not None:
            previous = name
    return owners


def layer_state_keys(model: nn.Module, names: Iterable[str]) -> list[str]:
    """``state_dict`` keys of every parameter and buffer of the layers owning ``names``, and of
    the norms that follow them (:func:`norm_owners`).

    These travel with the group in P-GaP's merge: a grown conv's bias, and the BatchNorm that
    normalises it, belong to the worker that grew the conv. Non-persistent buffers are not in
    ``state_dict`` and are skipped.
    """
    persistent = set(model.state_dict())
    layers = list(dict.fromkeys(layer_of(n) for n in names))
    owned = set(layers)
    norms = [norm for norm, owner in norm_owners(model).items() if owner in owned]
    keys: list[str] = []
    for layer in [*layers, *norms]:
        module = model.get_submodule(layer)
        prefix = f"{layer}." if layer else ""
        for local, _ in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            key = prefix + local
            if key in persistent and key not in keys:
                keys.append(key)
    return keys
