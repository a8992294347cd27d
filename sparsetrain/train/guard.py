"""What ``sparsetrain train`` does at step boundaries besides training: nothing is lost on faults.

* periodic checkpoints (``train.save_every`` steps, or every epoch end when 0), rotated to the
  newest ``train.keep``;
* SIGTERM / SIGINT: save at the next step boundary and raise :class:`TrainingInterrupted`;
* a non-finite loss: never saved; the run stops with :class:`NonFiniteLoss` naming the last good
  checkpoint (``train.skip_nonfinite`` skips such steps in the loop instead);
* under ``torchrun``: every decision above is taken by all ranks together, only rank 0 writes,
  and the masks are compared across ranks every ``train.check_masks_every`` steps and at the end.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sparsetrain.errors import SparsetrainError
from sparsetrain.train import distributed
from sparsetrain.train.checkpoint import save_rotating, state_checkpoint
from sparsetrain.train.signals import StopSignals, TrainingInterrupted

if TYPE_CHECKING:
    from sparsetrain.train.config import Config
    from sparsetrain.train.state import Data, TrainState

__all__ = ["NonFiniteLoss", "StepGuard"]

log = logging.getLogger(__name__)


class NonFiniteLoss(SparsetrainError):
    """The training loss became inf or nan."""


class StepGuard:
    """Checkpoints, signals, finiteness and mask checks of one run; see the module docstring."""

    def __init__(
        self, config: Config, data: Data, run_dir: Path, signals: StopSignals | None = None
    ) -> None:
        t = config.train
        self.config = config
        self.data = data
        self.run_dir = run_dir
        self.signals = signals or StopSignals()
        self.save_every = t.save_every
        self.keep = t.keep
        self.check_every = distributed.mask_check_interval(t.check_masks_every)
        self.last: Path | None = None  # the newest complete checkpoint
        self._saved_at: tuple[int, int] | None = None  # its (epoch, batch) position

    # ------------------------------------------------------------ loop hooks
    def step(self, state: TrainState) -> None:
        """After every batch: mask check, stop on a signal, periodic checkpoint."""
        if self.check_every and state.step % self.check_every == 0:
            distributed.check_same_masks(state.sparsifier.full_masks(), state.step)
        if distributed.any_rank(self.signals.received is not None):
            name = signal.Signals(self.signals.received or signal.SIGTERM).name
            log.info("%s: saving a checkpoint after step %d, then stopping", name, state.step)
            self.stop(state)
        if self.save_every and state.step % self.save_every == 0:
            self.save(state)

    def epoch(self, state: TrainState, record: dict[str, Any]) -> None:
        """After every epoch's record: the epoch-end checkpoint when ``save_every`` is 0."""
        if not self.save_every:
            self.save(state, record)

    def after_training_step(self, state: TrainState) -> None:
        """Steps of extra training after the main run (e.g. AC/DC's dense twin): on a signal,
        stop without saving; a resume redoes that phase from the end-of-training checkpoint."""
        if distributed.any_rank(self.signals.received is not None):
            self._raise_interrupted(state.step)

    def finish(self, state: TrainState, record: dict[str, Any] | None) -> None:
        """End of the main training: a checkpoint to redo after-training phases from, and (with
        several processes) a final check that every rank holds the same masks."""
        self.save(state, record)
        if distributed.is_distributed():
            digest = distributed.check_same_masks(state.sparsifier.full_masks(), state.step)
            log.info("masks identical on every rank (sha256 %s)", digest[:16])

    # --------------------------------------------------------------- actions
    def save(self, state: TrainState, metrics: dict[str, Any] | None = None) -> Path | None:
        """Save a rotating checkpoint unless this position is already saved; never a bad one."""
        position = (state.epoch, state.progress.batch)
        if position == self._saved_at:
            return self.last
        self.check_finite(state)
        checkpoint = state_checkpoint(state, self.config, self.data, dict(metrics or {}))
        self.last = save_rotating(self.run_dir, checkpoint, state.step, self.keep)
        self._saved_at = position
        log.debug("checkpoint %s", self.last)
        return self.last

    def stop(self, state: TrainState) -> None:
        """Save at this step boundary, wait for every rank, raise TrainingInterrupted."""
        self.save(state)
        distributed.barrier()  # rank 0 has written the checkpoint before any process exits
        self._raise_interrupted(state.step)

    def _raise_interrupted(self, step: int) -> None:
        signum = self.signals.received or signal.SIGTERM  # or another rank's signal
        raise TrainingInterrupted(signum, step, self.last, self.run_dir)

    def check_finite(self, state: TrainState) -> None:
        """Raise NonFiniteLoss if a loss of this epoch so far was inf or nan (on any rank)."""
        loss_sum = state.progress.loss_sum
        bad = loss_sum is not None and not bool(torch.isfinite(loss_sum))
        if distributed.any_rank(bad):
            raise self.non_finite(state)

    def non_finite(self, state: TrainState) -> NonFiniteLoss:
        """The error for a non-finite loss, naming the checkpoint to go back to."""
        if self.last is None:
            saved = "no checkpoint was saved before it"
        else:
            saved = (
                f"the last good checkpoint is {self.last} (resume with sparsetrain train "
                f"--resume {self.run_dir} --set train.skip_nonfinite=true to skip such steps)"
            )
        return NonFiniteLoss(
            f"the training loss became inf or nan in epoch {state.epoch + 1} (by step "
            f"{state.step}); {saved}; or lower optimizer.lr / add lr_schedule.warmup_epochs"
        )
