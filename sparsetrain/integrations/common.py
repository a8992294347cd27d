"""What the framework adapters share: building the sparsifier, resuming it, what they log.

A framework that resumes a run loads the model's weights and the optimizer's state from its
checkpoint *before* any callback runs, while :func:`sparsetrain.sparsify` draws masks and writes
them into the weights and the optimizer state. Resuming therefore builds the sparsifier as a new
run would, puts back the weights and optimizer state the framework had loaded (kept aside on the
CPU for that moment), then loads the saved sparsifier state: masks, step and method state, the
same order the project's own resume uses (sparsifier, then weights and optimizer). Before the
state is loaded, the loaded weights must be zero wherever the saved masks are off: a sparsifier
state from another checkpoint is refused instead of silently zeroing the weights to fit it.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn

import sparsetrain as st
from sparsetrain.api import check_sparsify_arguments
from sparsetrain.errors import CheckpointError

__all__ = ["SparsityRun", "log_values", "require"]

log = logging.getLogger(__name__)

STATE_KIND = "sparsetrain.integration-state"


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise one ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the {module!r} package, which is not installed: "
            f"pip install 'sparsetrain[{extra}]'"
        ) from error


def steps_per_epoch(batches: Any, accumulation: int) -> int | None:
    """Optimizer steps in one pass over ``batches`` (a data loader or a count), the last
    incomplete accumulation window included, as the Trainer and Lightning count them; None
    when the loader has no length (an iterable dataset: epochs mean nothing there)."""
    try:
        count = batches if isinstance(batches, int | float) else len(batches)
    except TypeError:
        return None
    if not math.isfinite(count):
        return None
    return max(1, math.ceil(int(count) / max(1, accumulation)))


class _Snapshot:
    """The model's tensors and the optimizer's state, kept on the CPU by tensor identity (so a
    method that renames or wraps modules while it sets up, AST's switchable BatchNorm, does not
    lose them) and put back in place."""

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        tensors = [*model.parameters(), *model.buffers()]
        self.tensors = [(t, t.detach().to("cpu", copy=True)) for t in tensors]
        self.state = [
            (p, {k: _cpu(v) for k, v in s.items()}) for p, s in list(optimizer.state.items())
        ]

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for tensor, saved in self.tensors:
                tensor.copy_(saved)
        for param, saved in self.state:
            optimizer.state[param] = {k: _back(v) for k, v in saved.items()}


class _Kept:
    """An optimizer-state tensor kept on the CPU, with the device it goes back to."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.device = tensor.device
        self.tensor = tensor.detach().to("cpu", copy=True)


def _cpu(value: Any) -> Any:
    return _Kept(value) if isinstance(value, torch.Tensor) else value


def _back(value: Any) -> Any:
    return value.tensor.to(value.device) if isinstance(value, _Kept) else value


def check_weights_fit(model: nn.Module, masks: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse a sparsifier state whose masks are off where the loaded weights are nonzero."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = params.get(name)
        if param is None or param.shape != mask.shape:
            continue  # Sparsifier.load_state_dict names the mismatch
        off = ~mask.to(device=param.device, dtype=torch.bool)
        if bool(torch.count_nonzero(param.detach()[off])):
            raise CheckpointError(
                f"{where}: the saved masks do not fit the loaded weights ({name} is nonzero where "
                "its saved mask is off): the sparsifier state is not this checkpoint's"
            )


class SparsityRun:
    """One training run's sparsifier as an adapter drives it: ``sparsify`` keywords checked at
    construction, the run's length filled in from the framework, state for its checkpoints."""

    def __init__(self, sparsify_kwargs: Mapping[str, Any]) -> None:
        self.kwargs = check_sparsify_arguments(**sparsify_kwargs)
        self.sparsifier: st.Sparsifier | None = None
        self.start_step = 0  # the framework's step at which this sparsifier began
        self.plan: dict[str, Any] = {}

    def _plan(self, total_steps: int | None, per_epoch: int | None) -> dict[str, Any]:
        plan = dict(self.kwargs)
        plan.setdefault("total_steps", total_steps)
        plan.setdefault("steps_per_epoch", per_epoch)
        return plan

    def _close(self) -> None:
        if self.sparsifier is not None:
            self.sparsifier.detach()  # a new run on the same optimizer
            self.sparsifier = None

    def start(
        self,
        model: nn.Module,
        optimizer: Any,
        total_steps: int | None,
        per_epoch: int | None,
        start_step: int = 0,
    ) -> st.Sparsifier:
        """A new sparsifier over ``total_steps`` optimizer steps from the framework's step
        ``start_step`` (0, or where a checkpoint without sparsifier state left off)."""
        self._close()
        self.plan = self._plan(total_steps, per_epoch)
        self.start_step = start_step
        self.sparsifier = st.sparsify(model, optimizer, **self.plan)
        log.info(
            "sparsifying with %s at %.2f%% sparsity over %s optimizer steps",
            self.plan.get("method", "static"),
            100 * self.sparsifier.sparsity,
            self.plan["total_steps"],
        )
        return self.sparsifier

    def resume(
        self,
        model: nn.Module,
        optimizer: Any,
        state: Mapping[str, Any],
        global_step: int,
        total_steps: int | None,
        per_epoch: int | None,
        where: str,
    ) -> st.Sparsifier:
        """The sparsifier of ``state`` (from :meth:`state`) continued at ``global_step``, over
        weights and optimizer state the framework has already loaded."""
        if state.get("kind") != STATE_KIND:
            raise CheckpointError(f"{where} holds no sparsetrain integration state")
        if int(state["global_step"]) != global_step:
            raise CheckpointError(
                f"{where}: the sparsifier state was saved at step {state['global_step']}, the "
                f"run resumes at step {global_step}"
            )
        start = int(state.get("start_step", 0))
        remaining = None if total_steps is None else total_steps - start
        saved = state.get("total_steps")
        if "total_steps" not in self.kwargs and saved is not None and saved != remaining:
            log.warning(
                "%s: the run was planned over %s steps and now over %s; the method's schedule "
                "follows the new length from here",
                where,
                saved,
                remaining,
            )
        snapshot = _Snapshot(model, optimizer)
        self.start(model, optimizer, remaining, per_epoch, start)
        assert self.sparsifier is not None
        snapshot.restore(self.sparsifier.optimizer)
        check_weights_fit(model, state["sparsifier"]["masks"], where)
        self.sparsifier.load_state_dict(state["sparsifier"])
        log.info("%s: sparsifier resumed at its step %d", where, self.sparsifier.step)
        return self.sparsifier

    def state(self, global_step: int) -> dict[str, Any]:
        """What a checkpoint of the framework's step ``global_step`` needs to resume exactly."""
        if self.sparsifier is None:
            raise CheckpointError("there is no sparsifier to save before training has begun")
        return {
            "kind": STATE_KIND,
            "sparsifier": self.sparsifier.state_dict(),
            "global_step": int(global_step),
            "start_step": self.start_step,
            "total_steps": self.plan.get("total_steps"),
            "steps_per_epoch": self.plan.get("steps_per_epoch"),
        }


def log_values(sp: st.Sparsifier, layers: bool = True) -> dict[str, float]:
    """Scalars for a framework's logger: sparsity by masks and by the weights' zeros, over the
    sparse layers (``sparsity/masks``, ``sparsity/weights``) and the whole model
    (``sparsity/all_params``), per layer when ``layers``, and FLOPs once a training batch
    has been seen (per example for inference, all steps so far for training)."""
    report = sp.report()
    table = report.sparsity
    values = {"sparsity/masks": table.sparsity, "sparsity/all_params": table.overall_sparsity}
    if table.weight_sparsity is not None:
        values["sparsity/weights"] = table.weight_sparsity
    if layers:
        for row in table.rows:
            values[f"sparsity/masks/{row.name}"] = row.actual
            if row.weight_zeros is not None:
                values[f"sparsity/weights/{row.name}"] = row.weight_zeros
    if report.flops is not None:
        values["flops/inference_sparse"] = float(report.flops.sparse)
        values["flops/inference_dense"] = float(report.flops.dense)
        values["flops/inference_ratio"] = report.flops.ratio
    if report.training_flops is not None and report.training_flops_dense:
        values["flops/training"] = float(report.training_flops)
        values["flops/training_dense"] = float(report.training_flops_dense)
    return values
