"""Switchable BatchNorm: one BatchNorm per nested sub-network, chosen by an index.

Sub-networks of different sparsity see differently distributed activations, so each keeps its own
running statistics and affine parameters (AST, Yang et al., NeurIPS 2022, after the switchable BN
of slimmable networks). :func:`make_switchable` swaps a model's BatchNorm layers for
:class:`SwitchableBatchNorm` in place; :func:`restore_batchnorms` puts plain layers back, each one
sub-network's copy, so an exported model loads into the unmodified model class.

Under FSDP2 the copies must exist before ``fully_shard``, which shards them with their block and
cannot copy a layer once sharded: call ``AST.prepare_model`` (or :func:`make_switchable`) on the
plain model, shard it, then build the optimizer and ``st.sparsify(..., method="ast")``, which
adopts the layers it finds.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from sparsetrain import sharding
from sparsetrain.errors import ConfigError

__all__ = [
    "BATCHNORMS",
    "SwitchableBatchNorm",
    "make_switchable",
    "restore_batchnorms",
    "set_active",
]

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class SwitchableBatchNorm(nn.Module):
    """``num_subnets`` copies of one BatchNorm layer; ``forward`` runs copy ``active``.

    Copy 0 is the original module, so its parameters stay the ones the optimizer already holds;
    the others start as exact copies. Every copy is in ``state_dict`` (``<name>.copies.<i>.weight``,
    ``<name>.copies.<i>.running_mean``, ...), so one checkpoint holds every sub-network. The active
    index is not: its owner (the AST method) saves and restores it with its own state.

    Only the active copy gets gradients. Train with ``optimizer.zero_grad(set_to_none=True)`` (the
    default) so the inactive copies are skipped by the optimizer instead of decayed, and wrap the
    model in DDP with ``find_unused_parameters=True``.
    """

    leaves_parameters_unused = True  # read by DistributedDataParallel wrapping (train.distributed)

    def __init__(self, bn: nn.Module, num_subnets: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList([bn, *(copy.deepcopy(bn) for _ in range(num_subnets - 1))])
        self.active = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.copies[self.active](x)

    def extra_repr(self) -> str:
        return f"active={self.active}"


def make_switchable(
    model: nn.Module,
    num_subnets: int,
    *,
    share_first: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, SwitchableBatchNorm]:
    """Replace every BatchNorm of ``model`` (but the first with ``share_first``) in place.

    The first BatchNorm in registration order (the stem's, in the usual models) stays one layer
    shared by every sub-network, as in the reference. The new copies' parameters join the
    optimizer: each is appended to the parameter group that holds its original, so it trains with
    the same hyper-parameters and follows any lr scheduler built on those groups, even one made
    before this call (a separate ``add_param_group`` would be missed by such a scheduler).

    A model that already holds :class:`SwitchableBatchNorm` layers (made before sharding) is
    adopted as it is: the layers must have ``num_subnets`` copies, and copies the optimizer does
    not hold yet join it. A sharded BatchNorm that is not switchable yet is refused, since FSDP2
    cannot copy it.

    Returns the switchable modules by fully-qualified name, in model order.
    """
    built = {n: m for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)}
    if built:
        _check_adopted(built, num_subnets)
        if optimizer is not None:
            _join_optimizer(optimizer, built.values())
        return built
    found = [m for m in model.modules() if isinstance(m, BATCHNORMS)]
    replaced = found[1:] if share_first else found
    if sharding.any_sharded(p for bn in replaced for p in bn.parameters()):
        raise ConfigError(
            "ast: the model's BatchNorm layers are already sharded (fully_shard), and FSDP2 cannot "
            "copy a sharded layer for AST's switchable BatchNorm; call "
            "sparsetrain.methods.ast.AST.prepare_model(model, sparsity=...) on the plain model, "
            "then fully_shard it and build the optimizer"
        )
    switch = {id(bn): SwitchableBatchNorm(bn, num_subnets) for bn in replaced}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in switch:
                setattr(parent, name, switch[id(child)])
    if optimizer is not None:
        _join_optimizer(optimizer, switch.values())
    return {n: m for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)}


def _check_adopted(built: dict[str, SwitchableBatchNorm], num_subnets: int) -> None:
    wrong = {n: len(m.copies) for n, m in built.items() if len(m.copies) != num_subnets}
    if wrong:
        raise ConfigError(
            f"ast: {num_subnets} sub-networks, but the model's switchable BatchNorm layers hold "
            f"another number of copies: {wrong}"
        )


def _join_optimizer(optimizer: torch.optim.Optimizer, modules: Iterable[SwitchableBatchNorm]):
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for module in modules:
        originals = list(module.copies[0].parameters())
        for bn in module.copies[1:]:
            for original, param in zip(originals, bn.parameters(), strict=True):
                group = group_of.get(id(original))
                if group is not None and id(param) not in group_of:
                    group["params"].append(param)


def set_active(modules: Iterable[SwitchableBatchNorm], index: int) -> None:
    """Make copy ``index`` the one every module runs."""
    for module in modules:
        module.active = index


def restore_batchnorms(model: nn.Module, index: int) -> nn.Module:
    """Put copy ``index`` of every :class:`SwitchableBatchNorm` of ``model`` back in its place.

    In place; returns ``model``, now with the original module types and state_dict keys.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SwitchableBatchNorm):
                setattr(parent, name, child.copies[index])
    return model
