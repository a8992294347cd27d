"""AC/DC: Alternating Compressed/DeCompressed training (Peste et al., NeurIPS 2021).

https://arxiv.org/abs/2106.12379 ; reference code https://github.com/IST-DASLab/ACDC

A phase machine over dense and sparse training: a dense warm-up, then compressed phases (one-shot
magnitude top-k straight to the target, mask fixed for the phase) alternating with decompressed
phases (every weight trainable again, pruned ones restarting at 0, optimizer state zeroed), then a
longer last dense phase and a final compressed phase that fine-tunes the sparse model.

The run yields a pair: the sparse model at the end, and a dense twin. The twin starts from the
model at the end of the last dense phase (snapshotted, with the optimizer state, when the final
compressed phase begins) and is fine-tuned densely over the final phase's steps on a branch, at
the learning rates the sparse model had in that phase (:meth:`ACDC.after_training`, called by
``sparsetrain train``; in a loop of your own, :func:`sparsetrain.finetune_dense_twin`).
``sp.export(which="dense")`` returns it.

Where this differs from the reference code, and why: phase lengths are the preset's shares of
its 100- or 200-epoch run scaled to ``total_steps`` (the reference fixes them in epochs), and a
phase shorter than one step gets one; the learning rate follows whatever schedule the loop
steps (the reference steps its cosine once per epoch); the global top-k keeps every layer at
least at the sparsifier's ``min_density`` (1% by default; the reference has no floor, so a layer
can lose every weight). The optimizer state is zeroed before the first step of a decompressed
phase, as in the reference (SparseML zeroes it after that step).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsetrain import mask_ops
from sparsetrain.errors import CheckpointError, ConfigError, ExportError
from sparsetrain.methods.base import Method
from sparsetrain.methods.registry import register_method
from sparsetrain.phases import Phase, acdc_phases

if TYPE_CHECKING:
    from sparsetrain.masks import Sparsifier
    from sparsetrain.methods.base import TrainingRun

__all__ = ["ACDC", "SPARSE_KINDS"]

log = logging.getLogger(__name__)

SPARSE_KINDS = frozenset({"compressed", "final_compressed"})


def _parse_nm(nm: Any) -> tuple[int, int] | None:
    """``(2, 4)``, ``[2, 4]`` or ``"2:4"`` -> ``(2, 4)``."""
    if nm is None:
        return None
    parts = nm.split(":") if isinstance(nm, str) else list(nm)
    try:
        n, m = (int(x) for x in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"nm must look like (2, 4) or '2:4', got {nm!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"nm={n}:{m} needs 0 < N < M")
    return n, m


@register_method("acdc")
class ACDC(Method):
    """Alternating compressed/decompressed phases; yields a sparse model and a dense twin.

    Options: the phase layout (see :func:`acdc_phases`); ``reset_state`` zeroes the optimizer
    state of ``all`` parameters (the reference), only the ``sparse`` ones, or ``none`` when a
    decompressed phase begins (never at compression: masked state is zeroed, the rest kept);
    ``nm=(2, 4)`` compresses to N:M patterns along input channels instead of magnitude top-k
    (``nm_skip_incompatible`` keeps layers whose input size is not a multiple of M dense);
    ``dense_twin=False`` skips the snapshot and the twin.
    """

    default_distribution = "global"
    needs_total_steps = True

    def __init__(
        self,
        *,
        preset: str | None = "imagenet",
        warmup: float | None = None,
        compressed: float | None = None,
        decompressed: float | None = None,
        last_dense: float | None = None,
        final_compressed: float | None = None,
        unit: str = "epochs",
        reset_state: str = "all",
        nm: tuple[int, int] | str | None = None,
        nm_skip_incompatible: bool = False,
        dense_twin: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if isinstance(self.sparsity, list | tuple):
            raise ConfigError("acdc takes one sparsity, not a list")
        self.sparsity = mask_ops.check_sparsity(self.sparsity)
        self.phases = acdc_phases(
            int(self.total_steps),
            preset=preset,
            unit=unit,
            steps_per_epoch=self.steps_per_epoch,
            warmup=warmup,
            compressed=compressed,
            decompressed=decompressed,
            last_dense=last_dense,
            final_compressed=final_compressed,
        )
        if reset_state not in ("all", "sparse", "none"):
            raise ConfigError(f"reset_state must be all, sparse or none, got {reset_state!r}")
        self.reset_state = reset_state
        self.nm = _parse_nm(nm)
        if self.nm is not None and abs(self.sparsity - (1 - self.nm[0] / self.nm[1])) > 1e-9:
            n, m = self.nm
            raise ConfigError(
                f"nm={n}:{m} keeps {n} of every {m} weights, i.e. sparsity {1 - n / m:g}; "
                f"set sparsity to {1 - n / m:g} (got {self.sparsity:g})"
            )
        self.nm_skip_incompatible = bool(nm_skip_incompatible)
        self.dense_twin = bool(dense_twin)
        self._nm_layers: set[str] = set()
        self.snapshot: dict[str, Any] | None = None
        self.twin: dict[str, torch.Tensor] | None = None
        self.twin_metrics: dict[str, float] = {}
        self.final_lrs: list[list[float]] = []  # each final-phase step's lr per param group

    # ------------------------------------------------------------------ hooks
    def init_masks(self, sp: Sparsifier) -> None:
        """Set the final targets (for reports) and enter the first phase, usually dense."""
        if self.nm is not None:
            sp.targets = self._nm_targets(sp)
        else:
            sp.targets = self.layer_targets(sp, self.sparsity)
        first = self.phases[0]
        if first.kind in SPARSE_KINDS:
            self._compress(sp)
        else:
            sp.set_masks({name: torch.ones_like(m) for name, m in sp.masks.items()})
        log.info("AC/DC schedule (%s steps):\n%s", self.total_steps, self.describe())

    def after_step(self, sp: Sparsifier, t: int) -> None:
        """Switch phase where one begins: ``t`` steps are done, the next step is the new phase's."""
        if self.snapshot is not None and sp.optimizer is not None:  # step t was a final one
            self.final_lrs.append([float(g["lr"]) for g in sp.optimizer.param_groups])
        phase = self.phases.starting_at(t)
        if phase is None:
            return
        if phase.kind == "final_compressed" and self.dense_twin:
            self._take_snapshot(sp, t)
        if phase.kind in SPARSE_KINDS:
            self._compress(sp)
        else:
            self._decompress(sp)
        log.info(
            "AC/DC step %d: %s phase until step %d, sparsity %.2f%%",
            t,
            phase.kind,
            phase.end_step,
            100 * sp.sparsity,
        )

    # ------------------------------------------------------------ transitions
    def _compress(self, sp: Sparsifier) -> None:
        """One-shot magnitude pruning straight to the target, from the current weights."""
        scores = {name: sp.weight(name).abs() for name in sp.params}
        if self.nm is not None:
            n, m = self.nm
            masks = {
                name: mask_ops.nm_mask(score, n, m, name)
                if name in self._nm_layers
                else torch.ones_like(score, dtype=torch.bool)
                for name, score in scores.items()
            }
        elif self.distribution == "global":
            masks = self.global_masks(sp, scores, self.sparsity)
            sp.targets = {name: 1.0 - float(k.sum()) / k.numel() for name, k in masks.items()}
        else:
            masks = {
                name: mask_ops.topk_mask(score, mask_ops.n_keep(score.numel(), sp.targets[name]))
                for name, score in scores.items()
            }
        sp.set_masks(masks)

    def _decompress(self, sp: Sparsifier) -> None:
        """All masks to ones (pruned weights return at 0) and restart the optimizer state."""
        sp.set_masks({name: torch.ones_like(m) for name, m in sp.masks.items()})
        if self.reset_state == "none" or sp.optimizer is None:
            return
        sp.reset_optimizer_state()
        sparse = {id(p) for p in sp.params.values()}
        for group in sp.optimizer.param_groups:
            for param in group["params"]:
                if self.reset_state == "sparse" and id(param) not in sparse:
                    continue
                _restart_state(sp.optimizer.state.get(param, {}), param, id(param) in sparse)

    def _nm_targets(self, sp: Sparsifier) -> dict[str, float]:
        n, m = self.nm
        bad = {
            name: tuple(p.shape)
            for name, p in sp.params.items()
            if p.dim() < 2 or p.shape[1] % m != 0
        }
        if bad and not self.nm_skip_incompatible:
            listed = ", ".join(f"{name} {shape}" for name, shape in bad.items())
            raise ConfigError(
                f"nm={n}:{m} needs each sparse weight's input size (dim 1) to be a multiple of "
                f"{m}; incompatible: {listed}. Exclude them or set nm_skip_incompatible=True"
            )
        if bad:
            log.warning("AC/DC %d:%d keeps incompatible layers dense: %s", n, m, ", ".join(bad))
        self._nm_layers = set(sp.params) - set(bad)
        return {name: (1 - n / m if name in self._nm_layers else 0.0) for name in sp.params}

    # -------------------------------------------------------------- the pair
    def _take_snapshot(self, sp: Sparsifier, step: int) -> None:
        """Keep the end of the last dense phase (weights, buffers, optimizer state) for the twin."""
        self.snapshot = {
            "step": step,
            "model": {k: v.detach().clone() for k, v in sp.model.state_dict().items()},
            "optimizer": None if sp.optimizer is None else copy.deepcopy(sp.optimizer.state_dict()),
        }
        log.info("AC/DC step %d: kept the dense model for the dense twin", step)

    @property
    def final_phase(self) -> Phase:
        """The final compressed phase: the steps over which the dense twin is fine-tuned."""
        return self.phases[-1]

    def export(self, sp: Sparsifier, which: str = "sparse", **options: Any) -> nn.Module:
        """``which="sparse"``: the sparse model (``options`` as for every method); ``"dense"``:
        the dense twin, a plain module.

        Before the twin is fine-tuned, ``"dense"`` returns the end of the last dense phase with a
        warning; before that phase ends there is no dense model of the pair yet.
        """
        if which == "sparse":
            return super().export(sp, **options)
        if which != "dense":
            raise ConfigError(f"export which= must be 'sparse' or 'dense', got {which!r}")
        if options:
            raise ConfigError(
                f"export options {', '.join(options)} apply to the sparse model; the dense twin "
                "has no masks and exports as a plain module"
            )
        if self.twin is not None:
            state = self.twin
        elif self.snapshot is not None:
            log.warning(
                "the dense twin has not been fine-tuned; exporting the dense model at step %d "
                "(end of the last dense phase) instead",
                self.snapshot["step"],
            )
            state = self.snapshot["model"]
        else:
            raise ExportError(
                "no dense model of the AC/DC pair yet: it is kept when the final compressed "
                f"phase starts at step {self.final_phase.start_step} (training is at step "
                f"{sp.step}{'' if self.dense_twin else ', and dense_twin=False'})"
            )
        model = sp.baked_copy()
        model.load_state_dict(state)
        return model

    def set_twin(
        self, state: dict[str, torch.Tensor], metrics: dict[str, float] | None = None
    ) -> None:
        """Record the fine-tuned dense twin (its model ``state_dict``); the snapshot is released."""
        self.twin = {k: v.detach().clone() for k, v in state.items()}
        self.twin_metrics = dict(metrics or {})
        self.snapshot = None

    def after_training(self, run: TrainingRun) -> dict[str, float]:
        """Fine-tune the dense twin over the final phase's steps; save ``dense_twin.pt``.

        The twin branches off at the snapshot: its weights, buffers and optimizer state, and the
        lr schedule at the same step, so it sees the learning rates the sparse model saw in its
        final phase. It trains with every mask off (method ``dense``). Returns both models' test
        loss and accuracy.
        """
        if self.twin is not None:  # already fine-tuned (a finished run resumed)
            return dict(self.twin_metrics)
        if self.snapshot is None:
            if self.dense_twin:
                log.warning("AC/DC: no dense snapshot (the final phase never began); no twin")
            return {}
        sparse_loss, sparse_acc = run.evaluate(run.model)
        twin = run.branch_model()
        twin.load_state_dict(self.snapshot["model"])
        (twin_loss, twin_acc), path = run.train_dense_branch(
            twin, self.snapshot["optimizer"], int(self.snapshot["step"]), "dense_twin"
        )
        metrics = {
            "sparse_test_loss": sparse_loss,
            "sparse_test_acc": sparse_acc,
            "dense_twin_test_loss": twin_loss,
            "dense_twin_test_acc": twin_acc,
        }
        self.set_twin(twin.state_dict(), metrics)
        log.info(
            "AC/DC pair: sparse %.2f%% (sparsity %.2f%%), dense twin %.2f%% -> %s",
            100 * sparse_acc,
            100 * run.sparsifier.sparsity,
            100 * twin_acc,
            path,
        )
        return {**metrics, **({"dense_twin_checkpoint": str(path)} if path else {})}

    def describe(self) -> str:
        """The resolved phases, one per line, for logs and reports."""
        return self.phases.describe(self.steps_per_epoch)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "phases": self.phases.as_list(),
            "snapshot": self.snapshot,
            "twin": self.twin,
            "twin_metrics": dict(self.twin_metrics),
            "final_lrs": [list(lrs) for lrs in self.final_lrs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        phases = state.get("phases")
        if phases is not None and [tuple(p) for p in phases] != self.phases.as_list():
            raise CheckpointError(
                "the checkpoint's AC/DC phases differ from this run's (different total steps, "
                "preset or phase lengths); resume with the same schedule"
            )
        self.snapshot = state.get("snapshot")
        self.twin = state.get("twin")
        self.twin_metrics = dict(state.get("twin_metrics") or {})
        self.final_lrs = [list(lrs) for lrs in state.get("final_lrs") or []]


def _restart_state(state: dict[str, Any], param: torch.Tensor, done: bool) -> None:
    """Zero one parameter's optimizer state as if it were new.

    Weight-shaped tensors (momentum, Adam moments) are zeroed unless the sparsifier already did
    (``done``); step counters return to 0 so Adam's bias correction restarts with its moments
    instead of scaling fresh moments as if they were long-averaged.
    """
    for key, value in state.items():
        if key == "step":
            if isinstance(value, torch.Tensor):
                value.zero_()
            else:
                state[key] = type(value)(0)
        elif not done and isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.zero_()
