"""The training loop's side of a method's ``after_training`` hook."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import sparsetrain as st
from sparsetrain.train.branch import train_dense_branch
from sparsetrain.train.builders import build_model_for
from sparsetrain.train.config import Config
from sparsetrain.train.epochs import StepHook, evaluate, run_epochs
from sparsetrain.train.fsdp import is_sharded, shard_model
from sparsetrain.train.state import Data, TrainState
from sparsetrain.train.steplog import StepLog

__all__ = ["TrainContext"]


@dataclass
class TrainContext:
    """This loop's side of a method's ``after_training(run)`` hook
    (:class:`sparsetrain.methods.base.TrainingRun`): the seam for extra models.

    After the main training, :func:`train` calls ``sp.method.after_training(ctx)`` if the method
    defines it. The hook may evaluate any model (``evaluate``) and train a dense branch of the run
    (``train_dense_branch``). It returns a mapping of JSON-ready results (e.g.
    ``{"dense_test_acc": 0.91}``) that lands in ``RunResult.extras``, ``report.json``, the final
    checkpoint's ``metrics`` and the log. Records of extra epochs go to ``metrics.jsonl`` tagged
    with ``phase``.
    """

    config: Config
    data: Data
    state: TrainState
    run_dir: Path
    metrics_path: Path | None  # None on ranks other than 0, which write no files
    on_step: StepHook | None = None  # stops extra training on SIGTERM/SIGINT
    steps: StepLog | None = None  # per-step records (steps.jsonl, TensorBoard)

    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def sparsifier(self) -> st.Sparsifier:
        return self.state.sparsifier

    def branch_model(self) -> nn.Module:
        if not is_sharded(self.model):
            return self.sparsifier.baked_copy()
        device = next(self.model.parameters()).device
        model = build_model_for(self.config, self.data.info).to(device)
        return shard_model(model, self.config.train.strategy)

    def train_dense_branch(
        self, model: nn.Module, optimizer_state: dict[str, Any] | None, step: int, name: str
    ) -> tuple[tuple[float, float], Path]:
        return train_dense_branch(self, model, optimizer_state, step, name)

    def run_epochs(self, state: TrainState, epochs: int, phase: str) -> list[dict[str, Any]]:
        t = self.config.train
        return run_epochs(
            state,
            self.data,
            epochs,
            eval_every=t.eval_every,
            log_every=t.log_every,
            metrics_path=self.metrics_path,
            phase=phase,
            on_step=self.on_step,
            skip_nonfinite=t.skip_nonfinite,
            steps=self.steps,
        )

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.data.test)
