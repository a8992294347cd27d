"""The policy side: a method decides masks, the :class:`~sparsetrain.masks.Sparsifier` enforces them.

A method receives the 1-based index ``t`` of the optimizer step explicitly (no hidden counters
tied to the optimizer) and acts through a few hooks:

* :meth:`Method.init_masks` once, before training;
* :meth:`Method.before_step` with the gradients of step ``t`` (already masked; on steps where
  :meth:`Method.needs_dense_grad` is True, ``sp.dense_grad(name)`` gives the unmasked ones);
  returning True skips that optimizer update (RigL does this on mask-update steps). A mask it
  replaces applies to that step's gradient at once;
* :meth:`Method.after_step` after step ``t`` (weights already masked): scheduled mask updates.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from sparsetrain import distributions, mask_ops
from sparsetrain.errors import ConfigError
from sparsetrain.export import export_model, synthesize_input

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier

__all__ = ["Method", "TrainingRun"]

log = logging.getLogger(__name__)


class TrainingRun(Protocol):
    """What a training loop offers a method's optional ``after_training(run)`` hook.

    A method that yields extra models (AC/DC's dense twin, AST's sub-networks) asks the loop for
    what it needs through this, never by importing a loop: ``sparsetrain train``'s loop
    implements it (:class:`sparsetrain.train.context.TrainContext`), and so can any other. The hook
    returns a mapping of JSON-ready results.
    """

    @property
    def model(self) -> nn.Module:
        """The trained model."""

    @property
    def sparsifier(self) -> Sparsifier:
        """The run's sparsifier."""

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """Test loss and accuracy of ``model``."""

    def branch_model(self) -> nn.Module:
        """A model to train a branch in, whose weights the caller loads: a copy of the trained
        model (built afresh, and sharded alike, when its weights are sharded)."""

    def train_dense_branch(
        self, model: nn.Module, optimizer_state: dict[str, Any] | None, step: int, name: str
    ) -> tuple[tuple[float, float], Path | None]:
        """Train ``model`` with every mask off from the run's step ``step`` to its end, on the
        batches and learning rates the run used there, starting from ``optimizer_state``; return
        its test loss and accuracy and where it was saved (``<name>.pt``, None if not saved)."""


class Method:
    """Base class of every sparse-training method; subclasses register with ``@register_method``.

    Subclass options are keyword-only arguments of ``__init__`` after ``**common``, each with a
    type hint: before the method is built, unknown names are rejected with the list of valid ones
    and every value is checked against its hint (:func:`~sparsetrain.methods.build_method`). A
    method with sub-networks (one that defines ``use_subnet``) takes a list of sparsities, one
    per sub-network; every other method takes one.
    """

    name: ClassVar[str] = ""
    default_distribution: ClassVar[str] = "uniform"
    needs_total_steps: ClassVar[bool] = False

    def __init__(
        self,
        *,
        sparsity: float | list[float],
        total_steps: int | None,
        steps_per_epoch: int | None,
        distribution: str | None,
        seed: int = 0,
        erk_power: float = 1.0,
        min_density: float = 0.0,
        layer_sparsity: dict[str, float] | None = None,
    ) -> None:
        for key, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
            if value is not None and value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        self.sparsity = sparsity
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.distribution = distribution or self.default_distribution
        if self.distribution not in distributions.DISTRIBUTIONS:
            raise ConfigError(
                f"unknown distribution {self.distribution!r}; "
                f"choose one of {', '.join(distributions.DISTRIBUTIONS)}"
            )
        self.seed = int(seed)
        self.erk_power = float(erk_power)
        self.min_density = float(min_density)
        self.layer_sparsity = dict(layer_sparsity or {})  # exact per-layer overrides, by name
        self._floor_warned: set[str] = set()
        if self.needs_total_steps and not total_steps:
            raise ConfigError(
                f"method {self.name!r} needs total_steps (its schedule spans training)"
            )

    @classmethod
    def prepare_model(cls, model: nn.Module, *, sparsity: float | list[float], **options) -> None:
        """Change the model's structure as the method needs, before it is wrapped or sharded
        (FSDP2 cannot copy or replace a sharded layer); ``sparsity`` and ``options`` are the
        method's. Most methods need nothing."""

    # ------------------------------------------------------------------ hooks
    def init_masks(self, sp: Sparsifier) -> None:
        """Draw random masks at the per-layer targets of the distribution (static sparsity)."""
        sp.targets = self.layer_targets(sp, float(self.sparsity))
        masks = {
            name: mask_ops.random_mask(
                p.shape,
                mask_ops.n_keep(p.numel(), sp.targets[name]),
                mask_ops.generator_for(self.seed, name, 0),
            )
            for name, p in sp.params.items()
        }
        sp.set_masks(masks)

    def before_step(self, sp: Sparsifier, t: int) -> bool:
        """Called with step ``t``'s masked gradients; return True to skip its optimizer update."""
        return False

    def after_step(self, sp: Sparsifier, t: int) -> None:
        """Called after optimizer step ``t`` (1-based) with the weights already masked."""

    def needs_dense_grad(self, t: int) -> bool:
        """True when step ``t`` reads gradients outside the mask (``sp.dense_grad``): they are
        then kept as backward produces them, and sparse kernels compute them densely."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Method state needed to resume exactly (schedules, thresholds, counters)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    def export(self, sp: Sparsifier, format: str = "dense", **options: Any) -> nn.Module:
        """The trained model with masks baked in, in ``format`` (:func:`export_model`): by default
        plain, loading strictly into the model class; checked on a batch shaped like the inputs
        seen in training unless ``example_input`` is given."""
        if options.get("example_input") is None and sp.example_input is not None:
            options["example_input"] = synthesize_input(sp.model, like=sp.example_input)
        return export_model(sp.baked_copy(), sp.masks, format, **options)

    # --------------------------------------------------------------- helpers
    def layer_targets(self, sp: Sparsifier, sparsity: float) -> dict[str, float]:
        """Per-layer target sparsities of this method's distribution, floor and overrides."""
        weights = self.distribution_inputs(sp, list(sp.params))
        targets = distributions.resolve(
            self.distribution,
            weights,
            sparsity,
            erk_power=self.erk_power,
            min_density=self.min_density,
            overrides=self.layer_sparsity,
        )
        self.warn_floored(sp, targets)
        return targets

    def distribution_inputs(self, sp: Sparsifier, names: list[str]) -> dict[str, torch.Tensor]:
        """What the distribution reads of each weight: whole weights for the ``global`` one (it
        ranks magnitudes; gathered under FSDP), the parameters for the others (shapes only)."""
        if self.distribution == "global":
            return {name: sp.weight(name) for name in names}
        return {name: sp.params[name].detach() for name in names}

    def global_masks(
        self, sp: Sparsifier, scores: dict[str, torch.Tensor], sparsity: float, scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """One top-k of ``scores`` over all layers with this method's floor and overrides
        (override sparsities multiplied by ``scale``, for a ramp on its way to them)."""
        overrides = {n: s * scale for n, s in self.layer_sparsity.items() if n in scores}
        masks = distributions.global_masks(
            scores, sparsity, min_density=self.min_density, overrides=overrides
        )
        self.warn_floored(sp, {n: 1.0 - float(m.sum()) / m.numel() for n, m in masks.items()})
        return masks

    def warn_floored(self, sp: Sparsifier, sparsities: dict[str, float]) -> None:
        """One warning per layer whose sparsity the density floor holds back."""
        numels = {name: p.numel() for name, p in sp.params.items()}
        held = [
            n
            for n in distributions.floored_layers(sparsities, numels, self.min_density)
            if n not in self.layer_sparsity and n not in self._floor_warned
        ]
        if held:
            self._floor_warned.update(held)
            log.warning(
                "%s: %s held at the density floor (min_density=%g); the overall sparsity may fall "
                "short of the target (min_density=0 removes the floor)",
                self.name,
                ", ".join(held),
                self.min_density,
            )

    def epoch_of(self, t: int) -> float:
        """Fractional epoch at the end of step ``t``."""
        if not self.steps_per_epoch:
            raise ConfigError(
                f"method {self.name!r} needs steps_per_epoch for its epoch-based schedule"
            )
        return t / self.steps_per_epoch

    def steps_from(self, value: float | int, unit: str) -> int:
        """Convert a length given in ``epochs``, ``steps`` or ``fraction`` of training to steps."""
        if unit == "steps":
            return int(value)
        if unit == "epochs":
            if not self.steps_per_epoch:
                raise ConfigError(f"method {self.name!r}: lengths in epochs need steps_per_epoch")
            return int(round(value * self.steps_per_epoch))
        if unit == "fraction":
            if not self.total_steps:
                raise ConfigError(f"method {self.name!r}: lengths as fractions need total_steps")
            return int(round(value * self.total_steps))
        raise ConfigError(f"unknown length unit {unit!r}; use epochs, steps or fraction")


def sparse_aware_init(sp: Sparsifier) -> None:
    """Rescale each sparse weight by 1/sqrt(density): std becomes 1/sqrt(density * fan_in)-like."""
    with torch.no_grad():
        for name, p in sp.params.items():
            density = sp.density(name)
            if 0.0 < density < 1.0:
                p.mul_(1.0 / math.sqrt(density))
