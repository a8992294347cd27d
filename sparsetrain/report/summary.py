"""``Sparsifier.report()``: per-layer sparsity, inference FLOPs and training FLOPs so far.

Training FLOPs follow the 3x-forward convention of :func:`training_flops_per_step`, summed over
the steps actually taken: each module's dense forward FLOPs are scaled by the density its own
masked weights had at each step (the Sparsifier keeps the per-layer sum of densities over steps),
so a method whose masks change over time (gradual pruning, AC/DC's dense phases) is charged for
what it really computed, not for its final masks. Steps that read the dense gradient of the masked
weights (RigL's grow steps, counted by the method's ``dense_gradient_steps``) compute that weight
gradient densely and are charged for it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsetrain import sharding
from sparsetrain.inputs import ExampleInput
from sparsetrain.report.flops import FlopsReport, inference_flops, training_flops_per_step
from sparsetrain.report.sparsity import SparsityReport, sparsity_report

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["Report", "build_report", "summarize"]


@dataclass
class Report:
    """Everything ``sp.report()`` knows: sparsity table, FLOPs when an input shape is known."""

    sparsity: SparsityReport
    flops: FlopsReport | None = None  # forward FLOPs of one example
    steps: int = 0
    batch_size: int | None = None
    training_flops: int | None = None  # all steps so far, sparse-effective
    training_flops_dense: int | None = None  # the same steps with every weight dense
    dense_gradient_steps: int = 0  # steps whose weight gradient was computed densely

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "sparsity": self.sparsity.to_dict(),
            "flops": None if self.flops is None else self.flops.to_dict(),
            "steps": self.steps,
            "batch_size": self.batch_size,
            "training_flops": self.training_flops,
            "training_flops_dense": self.training_flops_dense,
            "dense_gradient_steps": self.dense_gradient_steps,
        }

    def format(self) -> str:
        """The sparsity table, then per-module and total FLOPs."""
        lines = [self.sparsity.format()]
        if self.flops is not None:
            lines += ["", _flops_table(self.flops)]
            lines.append(
                f"inference FLOPs per example: {_human(self.flops.sparse)} sparse vs "
                f"{_human(self.flops.dense)} dense ({self.flops.ratio:.2%})"
            )
        if self.training_flops is not None and self.training_flops_dense:
            ratio = self.training_flops / self.training_flops_dense
            lines.append(
                f"training FLOPs so far ({self.steps:,} steps of batch {self.batch_size}): "
                f"{_human(self.training_flops)} vs {_human(self.training_flops_dense)} dense "
                f"({ratio:.2%})"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _human(flops: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.2f} {unit}FLOPs"
    return f"{flops:.0f} FLOPs"


def _flops_table(flops: FlopsReport) -> str:
    rows = [("module", "dense", "sparse", "ratio")]
    for name, (dense, sparse) in flops.per_module.items():
        rows.append(
            (
                name or "(root)",
                f"{dense:,}",
                f"{sparse:,}",
                f"{sparse / dense:.2%}" if dense else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    out = [
        "  ".join(
            [
                row[0].ljust(widths[0]),
                *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
            ]
        )
        for row in rows
    ]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def _training_flops(
    model: nn.Module,
    flops: FlopsReport,
    density_sum: Mapping[str, float],
    steps: int,
    batch_size: int,
    dense_gradient_steps: int = 0,
) -> tuple[int, int]:
    """(sparse-effective, dense) training FLOPs of ``steps`` steps of ``batch_size`` examples.

    Each of the ``dense_gradient_steps`` adds the dense minus the sparse weight-gradient product
    (one forward's worth, at the current masks: the methods that need it keep their density).
    """
    params = dict(model.named_parameters())
    owned: dict[str, list[str]] = defaultdict(list)
    for name in density_sum:
        owned[name.rpartition(".")[0]].append(name)
    sparse_forward = 0.0
    for module, (dense, sparse) in flops.per_module.items():
        names = owned.get(module)
        if names:  # numel-weighted sum over steps of the module's density
            numel = sum(params[n].numel() for n in names)
            sparse_forward += dense * sum(density_sum[n] * params[n].numel() for n in names) / numel
        else:  # no masked weight of its own: what it costs now, it cost at every step
            sparse_forward += sparse * steps
    dense_forward = flops.dense * steps
    extra = dense_gradient_steps * (flops.dense - flops.sparse) * batch_size
    return (
        training_flops_per_step(dense_forward, round(sparse_forward), batch_size) + extra,
        training_flops_per_step(dense_forward, dense_forward, batch_size),
    )


def build_report(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    targets: Mapping[str, float] | None = None,
    example_input: torch.Tensor | ExampleInput | None = None,
    *,
    density_sum: Mapping[str, float] | None = None,
    steps: int = 0,
    batch_size: int | None = None,
    dense_gradient_steps: int = 0,
    flops_model: nn.Module | None = None,
) -> Report:
    """A :class:`Report` from its pieces (what a checkpoint holds, without a live Sparsifier).

    ``flops_model`` runs the counted forward where ``model`` cannot (a sharded model's stand-in).
    """
    report = Report(
        sparsity_report(model, masks, targets),
        steps=steps,
        batch_size=batch_size,
        dense_gradient_steps=dense_gradient_steps,
    )
    if example_input is None:
        return report
    if isinstance(example_input, torch.Tensor):
        example_input = example_input[:1]
    report.flops = inference_flops(flops_model or model, example_input, masks)
    if density_sum is not None and steps > 0 and batch_size:
        report.training_flops, report.training_flops_dense = _training_flops(
            model, report.flops, density_sum, steps, batch_size, dense_gradient_steps
        )
    return report


class _WholeWeights(nn.Module):
    """Stands for a sharded model in its report: its parameters are the whole weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._whole = {n: sharding.full(p.detach()) for n, p in model.named_parameters()}

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._whole.items())


def summarize(sp: Sparsifier, example_input: ExampleInput | None = None) -> Report:
    """The report of a live Sparsifier (what ``sp.report()`` returns).

    Sharded (FSDP) weights are gathered for the per-layer table, and the FLOPs come from one
    forward of the sharded model: call it on every rank, as every collective."""
    model = sp.model
    if sharding.any_sharded(model.parameters()):
        model = _WholeWeights(model)
    return build_report(
        model,
        sp.full_masks(),
        sp.targets,
        example_input,
        density_sum=sp.mean_density_steps(),
        steps=sp.step,
        batch_size=sp.examples_per_step,
        dense_gradient_steps=int(getattr(sp.method, "dense_gradient_steps", 0)),
        flops_model=sp.model,
    )
