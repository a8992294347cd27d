"""Per-step records of a run: ``steps.jsonl`` and, when asked, TensorBoard.

``metrics.jsonl`` has one record per epoch, but the schedules act within an epoch (AC/DC's phases,
GMP's ramp, GaP's rotating dense group, AST's sub-networks). So every ``train.log_every`` steps,
at the first and each epoch's last step, and at every step after which the masks' overall
sparsity changed (not for AST, whose active sub-network changes at every step), one record goes
to ``steps.jsonl``::

    {"step": 47, "epoch": 1, "loss": 0.61, "lr": 0.049, "sparsity": 0.9,
     "density": {"fc1.weight": 0.07, ...}}

``loss`` is this step's batch loss (this process's share under ``torchrun``), ``lr`` the rate the
step used, ``sparsity`` and ``density`` those of the masks after the step (what the next step
trains). A method with sub-networks (AST) adds ``subnets``, each one's sparsity; records of extra
training after the main run (AC/DC's dense twin) carry its ``phase``.

The records change nothing in training: the densities are host-side numbers the sparsifier keeps,
no random number is drawn, and the loss is read (``.item()``) only on recorded steps.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from sparsetrain.errors import ConfigError
from sparsetrain.train.config import Config
from sparsetrain.train.state import TrainState

__all__ = [
    "STEPS_FILE",
    "TENSORBOARD_DIR",
    "StepLog",
    "TensorBoardSink",
    "check_loggers",
]

log = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"
TENSORBOARD_DIR = "tensorboard"
MAIN = "main"  # the TensorBoard run of the main training; extra phases get their own


def _subnet_sparsities(method: Any) -> list[float] | None:
    count = getattr(method, "num_subnets", None)
    if count is None or not hasattr(method, "subnet_sparsity"):
        return None
    return [float(method.subnet_sparsity(i)) for i in range(count)]


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.loggers asks for tensorboard, but the tensorboard package is not installed: "
            "pip install 'sparsetrain[tensorboard]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter


def check_loggers(config: Config) -> None:
    """Fail before anything is written if a logger ``train.loggers`` names cannot run here."""
    if "tensorboard" in config.train.loggers:
        _summary_writer()


class TensorBoardSink:
    """The step and epoch records as TensorBoard scalars, one TensorBoard run per phase.

    The main run's events after ``start_step`` are purged (a resumed run writes them again); an
    extra phase (the dense twin) always trains from its start, so its directory starts empty.
    """

    def __init__(self, root: Path, config: Config, start_step: int) -> None:
        self._writer_class = _summary_writer()
        self.root = root
        self._writers: dict[str, Any] = {
            MAIN: self._writer_class(str(root / MAIN), purge_step=start_step + 1)
        }
        if start_step == 0:
            text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            self._writers[MAIN].add_text("config", f"```yaml\n{text}```", 0)

    def _writer(self, phase: str | None) -> Any:
        name = phase or MAIN
        if name not in self._writers:
            shutil.rmtree(self.root / name, ignore_errors=True)
            self._writers[name] = self._writer_class(str(self.root / name))
        return self._writers[name]

    def step(self, record: dict[str, Any]) -> None:
        writer, step = self._writer(record.get("phase")), record["step"]
        writer.add_scalar("train/loss", record["loss"], step)
        writer.add_scalar("train/lr", record["lr"], step)
        writer.add_scalar("sparsity/overall", record["sparsity"], step)
        for name, density in record["density"].items():
            writer.add_scalar(f"sparsity/{name}", 1.0 - density, step)
        for i, sparsity in enumerate(record.get("subnets") or ()):
            writer.add_scalar(f"sparsity/subnet_{i}", sparsity, step)

    def epoch(self, record: dict[str, Any]) -> None:
        writer = self._writer(record.get("phase"))
        for key, value in record.items():
            if key not in ("step", "phase") and isinstance(value, int | float):
                writer.add_scalar(f"epoch/{key}", value, record["step"])
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


class StepLog:
    """Decides which steps are recorded and writes their records; see the module docstring.

    ``path`` None (processes other than rank 0) records nothing.
    """

    def __init__(
        self, path: Path | None, every: int, sinks: Sequence[TensorBoardSink] = ()
    ) -> None:
        self.path = path
        self.every = every
        self.sinks = list(sinks)
        self._last: dict[str | None, float] = {}  # per phase: sparsity after the last step seen

    @classmethod
    def for_run(cls, config: Config, run_dir: Path, step: int, main: bool) -> StepLog:
        """The run's log: ``steps.jsonl`` in ``run_dir``, TensorBoard if ``train.loggers`` asks;
        a run starting at ``step`` > 0 (resumed) keeps only the TensorBoard events up to it."""
        if not main:
            return cls(None, 0)
        sinks = []
        if "tensorboard" in config.train.loggers:
            sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR, config, step))
        return cls(run_dir / STEPS_FILE, config.train.log_every, sinks)

    def start(self, state: TrainState, phase: str | None = None) -> None:
        """Before the first step of ``phase`` from ``state``: the sparsity changes are counted
        from here, so a resumed run records the steps an uninterrupted one would."""
        self._last[phase] = state.sparsifier.sparsity

    def after_step(
        self,
        state: TrainState,
        loss: torch.Tensor,
        lr: float,
        phase: str | None = None,
        epoch_end: bool = False,
    ) -> None:
        """After optimizer step ``state.step`` (``lr`` its rate): record it if it is due (the
        last step of an epoch, ``epoch_end``, always is)."""
        if self.path is None:
            return
        sp = state.sparsifier
        sparsity = sp.sparsity
        # AST switches sub-networks every step: its ramps show in the periodic records.
        changed = self._last.get(phase) != sparsity and not hasattr(sp.method, "num_subnets")
        self._last[phase] = sparsity
        due = state.step == 1 or epoch_end or (self.every and state.step % self.every == 0)
        if not (due or changed):
            return
        record: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch + 1,
            "loss": loss.item(),
            "lr": lr,
            "sparsity": sparsity,
            "density": {name: sp.density(name) for name in sp.params},
        }
        subnets = _subnet_sparsities(sp.method)
        if subnets is not None:
            record["subnets"] = subnets
        if phase:
            record["phase"] = phase
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.step(record)

    def epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record (``metrics.jsonl``'s) for the loggers."""
        if self.path is not None:
            for sink in self.sinks:
                sink.epoch(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
