"""Per-layer target vs actual sparsity of a masked model.

Actual sparsity is read from the masks: the mask decides which weights take part in the
computation (a kept weight may be exactly zero by chance). Beside it, each row shows the weights'
own fraction of zeros, so masks that are not being enforced (the optimizer that steps is not the
sparsified one) show as weights denser than their masks instead of hiding behind the mask's number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sparsetrain.errors import ConfigError

__all__ = ["LayerRow", "SparsityReport", "sparsity_report"]


@dataclass
class LayerRow:
    """One sparse parameter: its target and its actual (mask-measured) sparsity."""

    name: str
    shape: tuple[int, ...]
    numel: int
    target: float | None
    actual: float
    active: int
    nonzero: int | None = None  # the weight's nonzero values (masks alone do not say)

    @property
    def weight_zeros(self) -> float | None:
        """Fraction of the weight's values that are exactly zero."""
        return None if self.nonzero is None else _fraction_zero(self.nonzero, self.numel)


@dataclass
class SparsityReport:
    """Per-layer rows plus totals over the sparse parameters and over the whole model."""

    rows: list[LayerRow]
    sparse_params: int
    sparse_active: int
    total_params: int
    total_active: int
    sparse_nonzero: int | None = None  # nonzero values of the sparse weights

    @property
    def weight_sparsity(self) -> float | None:
        """Fraction of exactly-zero values among the sparse weights (what the weights say)."""
        if self.sparse_nonzero is None:
            return None
        return _fraction_zero(self.sparse_nonzero, self.sparse_params)

    @property
    def unenforced(self) -> bool:
        """True when the weights hold nonzeros where their masks are off."""
        return self.sparse_nonzero is not None and self.sparse_nonzero > self.sparse_active

    @property
    def sparsity(self) -> float:
        """Fraction of masked-off weights among the sparse parameters."""
        return _fraction_zero(self.sparse_active, self.sparse_params)

    @property
    def overall_sparsity(self) -> float:
        """Fraction of masked-off weights among all parameters (dense ones count fully active)."""
        return _fraction_zero(self.total_active, self.total_params)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: rows as dicts (shapes as lists) and every total."""
        layers = [
            {**asdict(row), "shape": list(row.shape), "weight_zeros": row.weight_zeros}
            for row in self.rows
        ]
        return {
            "layers": layers,
            "sparse_params": self.sparse_params,
            "sparse_active": self.sparse_active,
            "sparsity": self.sparsity,
            "total_params": self.total_params,
            "total_active": self.total_active,
            "overall_sparsity": self.overall_sparsity,
            "sparse_nonzero": self.sparse_nonzero,
            "weight_sparsity": self.weight_sparsity,
        }

    def format(self) -> str:
        """An aligned text table, one line per layer, then one totals line per scope."""
        header = ("layer", "shape", "params", "active", "target", "actual", "weights 0")
        body = [
            (
                row.name,
                "x".join(map(str, row.shape)) or "scalar",
                f"{row.numel:,}",
                f"{row.active:,}",
                "-" if row.target is None else f"{row.target:.2%}",
                f"{row.actual:.2%}",
                "-" if row.weight_zeros is None else f"{row.weight_zeros:.2%}",
            )
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            name, *numbers = cells
            right = [cell.rjust(width) for cell, width in zip(numbers, widths[1:], strict=True)]
            return "  ".join([name.ljust(widths[0]), *right]).rstrip()

        rule = "-" * len(line(header))
        totals = [
            f"sparse params: {self.sparse_active:,} / {self.sparse_params:,} active,"
            f" sparsity {self.sparsity:.2%}",
            f"all params:    {self.total_active:,} / {self.total_params:,} active,"
            f" sparsity {self.overall_sparsity:.2%}",
        ]
        if self.weight_sparsity is not None:
            totals.append(f"sparse weights: {self.weight_sparsity:.2%} of their values are zero")
        if self.unenforced:
            totals.append(
                "WARNING: the weights hold nonzeros outside their masks: the masks are not being "
                "enforced (is the optimizer that steps the one given to sparsify?)"
            )
        return "\n".join([line(header), rule, *map(line, body), rule, *totals])


def _fraction_zero(active: int, total: int) -> float:
    return 1.0 - active / total if total else 0.0


def sparsity_report(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    targets: Mapping[str, float] | None = None,
) -> SparsityReport:
    """Measure each mask of ``model`` against its target sparsity.

    ``masks`` and ``targets`` are keyed by fully-qualified parameter name; rows follow the model's
    parameter order. A mask must match its parameter's shape; a target needs a mask.
    """
    targets = dict(targets or {})
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [name for name in masks if name not in params]
    if unknown:
        raise ConfigError(f"masks name no parameter of the model: {', '.join(unknown)}")
    untargeted = [name for name in targets if name not in masks]
    if untargeted:
        raise ConfigError(f"targets given for parameters without a mask: {', '.join(untargeted)}")

    rows = []
    masked_tensors: dict[int, str] = {}
    for name, param in params.items():
        if name not in masks:
            continue
        first = masked_tensors.setdefault(id(param), name)
        if first != name:
            raise ConfigError(f"{first!r} and {name!r} are one tied tensor; mask it under one name")
        mask = masks[name]
        if mask.shape != param.shape:
            raise ConfigError(
                f"mask of {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}"
            )
        active = int(torch.count_nonzero(mask))
        numel = param.numel()
        nonzero = int(torch.count_nonzero(param.detach()))
        target = targets.get(name)
        rows.append(
            LayerRow(
                name=name,
                shape=tuple(param.shape),
                numel=numel,
                target=None if target is None else float(target),
                actual=_fraction_zero(active, numel),
                active=active,
                nonzero=nonzero,
            )
        )

    sparse_params = sum(row.numel for row in rows)
    sparse_active = sum(row.active for row in rows)
    # Tied parameters are one tensor: count each once, as model.parameters() does.
    total_params = sum(p.numel() for p in model.parameters())
    return SparsityReport(
        rows=rows,
        sparse_params=sparse_params,
        sparse_active=sparse_active,
        total_params=total_params,
        total_active=total_params - sparse_params + sparse_active,
        sparse_nonzero=sum(row.nonzero for row in rows),
    )
