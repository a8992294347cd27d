"""Sparse training under the Hugging Face ``Trainer``: one callback, checkpoints that resume exactly.

    from sparsetrain.integrations.hf import SparsityCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SparsityCallback(method="rigl", sparsity=0.9)])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

When training begins the callback calls :func:`sparsetrain.sparsify` on the Trainer's model and
the optimizer the Trainer steps (Accelerate's ``AcceleratedOptimizer`` is unwrapped by the
engine), with ``total_steps`` the Trainer's ``state.max_steps`` (from ``max_steps``, or epochs
times the optimizer steps of one epoch, gradient accumulation counted) and ``steps_per_epoch``
those optimizer steps; keywords given to the callback win.

Every Trainer checkpoint ``checkpoint-<step>/`` gets ``sparsifier.pt`` beside ``optimizer.pt``:
the sparsifier's masks, step and method state in the project's checkpoint format (written to a
temporary file and renamed, with a SHA-256 of its content checked on load). It is written when
the Trainer decides to save, before the Trainer writes ``trainer_state.json``, so every checkpoint
the Trainer can resume from holds it, also when ``save_total_limit`` has removed the one before.
Resuming at step ``k`` reads ``<output_dir>/checkpoint-<k>/sparsifier.pt`` (``resume_from=`` names
another checkpoint directory): the file must verify, be of step ``k`` and fit the loaded weights.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from sparsetrain.errors import CheckpointError
from sparsetrain.integrations.common import SparsityRun, log_values, require, steps_per_epoch
from sparsetrain.train.checkpoint import load_checkpoint, save_checkpoint

_transformers = require("transformers", "hf", "sparsetrain.integrations.hf")
require("accelerate", "hf", "sparsetrain.integrations.hf")

from transformers.trainer_callback import (  # noqa: E402
    CallbackHandler,
    DefaultFlowCallback,
    TrainerCallback,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

__all__ = ["COMPRESSED_FILE", "STATE_FILE", "SparsityCallback"]

log = logging.getLogger(__name__)

STATE_FILE = "sparsifier.pt"
COMPRESSED_FILE = "model.stz"
_NOT_TRAINING = ("eval_", "test_")  # evaluation and prediction logs carry no training values


class SparsityCallback(TrainerCallback):
    """Sparsify the model a ``transformers.Trainer`` trains, and keep its state in checkpoints.

    Args:
        strict: resuming from a checkpoint without sparsifier state is an error (True), or
            starts a new sparsifier on the loaded weights over the remaining steps, with a
            warning (False: e.g. sparse fine-tuning from a dense checkpoint).
        log_layers: put each layer's sparsity into the logs, not only the totals.
        export_compressed: also write the ``compressed`` export (``model.stz``, kept values and a
            bitmask) into every checkpoint and, when training ends, into ``output_dir``.
        resume_from: the checkpoint directory a resumed run continues from, when it is not the
            Trainer's own ``<output_dir>/checkpoint-<step>``.
        **sparsify_kwargs: any keyword of :func:`sparsetrain.sparsify` (``method``,
            ``sparsity``, method options, ...), checked here, before training.

    After ``trainer.train()``, :attr:`sparsifier` is the :class:`~sparsetrain.Sparsifier`
    (``report()``, ``export()``, AST's ``use_subnet``, AC/DC's ``export(which="dense")``).
    """

    def __init__(
        self,
        *,
        strict: bool = True,
        log_layers: bool = True,
        export_compressed: bool = False,
        resume_from: str | os.PathLike | None = None,
        **sparsify_kwargs: Any,
    ) -> None:
        self.run = SparsityRun(sparsify_kwargs)
        self.strict = strict
        self.log_layers = log_layers
        self.export_compressed = export_compressed
        self.resume_from = resume_from
        self._written: Path | None = None  # the checkpoint directory last given our state
        self._started = 0.0
        self._logs_placed = False

    @property
    def sparsifier(self) -> Any:
        """The :class:`~sparsetrain.Sparsifier` of the current (or last) ``train()`` call."""
        return self.run.sparsifier

    # -------------------------------------------------------------- training
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        """Sparsify the model on the optimizer the Trainer steps; on resume, restore the state."""
        self._started = time.time()
        self._written = None
        self._logs_placed = False
        per_epoch = steps_per_epoch(
            kwargs.get("train_dataloader"), args.gradient_accumulation_steps
        )
        if state.global_step == 0:
            self.run.start(model, optimizer, state.max_steps, per_epoch)
            return
        directory = Path(self.resume_from or _checkpoint_dir(args, state.global_step))
        path = directory / STATE_FILE
        if path.is_file():
            saved = load_checkpoint(path)
            self.run.resume(
                model, optimizer, saved, state.global_step, state.max_steps, per_epoch, str(path)
            )
        elif self.strict:
            raise CheckpointError(
                f"resuming at step {state.global_step}: {directory} holds no sparsifier state "
                f"({STATE_FILE}); it was not saved by a Trainer with SparsityCallback, or its "
                "save was cut short. Resume from a checkpoint that has it, name the checkpoint "
                "with SparsityCallback(resume_from=...), or pass strict=False to start a new "
                "sparsifier on the loaded weights over the remaining steps"
            )
        else:
            log.warning(
                "%s holds no sparsifier state: new masks are drawn from the loaded weights and "
                "the method's schedule spans the remaining %d steps (strict=False)",
                directory,
                state.max_steps - state.global_step,
            )
            self.run.start(
                model, optimizer, state.max_steps - state.global_step, per_epoch, state.global_step
            )

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """Place the log values ahead of the reporters (see :meth:`_place_logs`)."""
        if not self._logs_placed:
            self._place_logs(sys._getframe(1))

    # ---------------------------------------------------------- checkpoints
    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """Write the state before the Trainer writes a checkpoint it has decided on."""
        self._save_if_due(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._save_if_due(args, state, control)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._save_if_due(args, state, control)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._save_if_due(args, state, control)

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """A checkpoint decided after the step (best-metric saving, another callback): write it
        now; then the compressed export beside the model, when asked for."""
        directory = _checkpoint_dir(args, state.global_step)
        self._save(directory, state.global_step)
        if self.export_compressed and args.should_save:
            self.save_compressed(directory)

    def _save_if_due(self, args, state, control) -> None:  # noqa: ANN001
        directory = _checkpoint_dir(args, state.global_step)
        # A checkpoint written by the Trainer outside the callback flow (its SIGTERM-triggered
        # JIT checkpoint) shows as a directory made during this run when training stops.
        written = (
            control.should_training_stop
            and directory.is_dir()
            and directory.stat().st_mtime >= self._started
        )
        if control.should_save or written:
            self._save(directory, state.global_step)

    def _save(self, directory: Path, step: int) -> None:
        if self.run.sparsifier is None or self._written == directory:
            return
        save_checkpoint(directory / STATE_FILE, self.run.state(step))
        self._written = directory

    def save_compressed(self, directory: str | os.PathLike) -> Path:
        """Write the ``compressed`` export of the trained model to ``directory/model.stz``
        (checked by a bit-exact round trip); AST writes its active sub-network."""
        from sparsetrain.export import export_model

        if self.run.sparsifier is None:
            raise CheckpointError("nothing to export before training has begun")
        path = Path(directory) / COMPRESSED_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(self.run.sparsifier.export(), None, "compressed", path=path)
        return path

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.export_compressed and args.should_save and self.run.sparsifier is not None:
            log.info("compressed export written to %s", self.save_compressed(args.output_dir))

    # -------------------------------------------------------------- logging
    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        if not self._logs_placed:
            self.add_logs(logs)

    def add_logs(self, logs: dict[str, Any] | None) -> None:
        """Add sparsity and FLOPs to a training log record (evaluation records are left alone)."""
        sp = self.run.sparsifier
        if sp is None or logs is None or any(k.startswith(_NOT_TRAINING) for k in logs):
            return
        logs.update(log_values(sp, self.log_layers))

    def _place_logs(self, frame: Any) -> None:
        """Have the sparsity values in the log record before the reporters see it.

        The Trainer calls the reporters chosen with ``report_to`` (TensorBoard, W&B, ...) before
        the callbacks passed to it, and gives callbacks no handle on that order. The handler
        calling this event is found on the stack (its ``call_event``), and a small callback that
        only adds the values is put right after the Trainer's ``DefaultFlowCallback``. Should that
        ever fail, this callback adds them itself, for the callbacks after it. (Inserting ahead
        of the running callback calls it once more for this event: ``on_epoch_begin`` does
        nothing else, so it is the event to do it in.)
        """
        handler = None
        for _ in range(4):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and self in owner.callbacks:
                handler = owner
                break
            frame = frame.f_back
        if handler is None:
            log.warning(
                "sparsity values go only to the callbacks after SparsityCallback: the Trainer's "
                "callback handler was not found"
            )
            return
        if not any(isinstance(c, _SparsityLogs) and c.owner is self for c in handler.callbacks):
            flow = [
                i for i, c in enumerate(handler.callbacks) if isinstance(c, DefaultFlowCallback)
            ]
            handler.callbacks.insert(flow[0] + 1 if flow else 0, _SparsityLogs(self))
        self._logs_placed = True


class _SparsityLogs(TrainerCallback):
    """Adds its owner's values to each training log record, ahead of the reporters."""

    def __init__(self, owner: SparsityCallback) -> None:
        self.owner = owner

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        self.owner.add_logs(logs)


def _checkpoint_dir(args: Any, step: int) -> Path:
    """Where the Trainer writes the checkpoint of ``step``."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
