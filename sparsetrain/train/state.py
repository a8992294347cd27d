"""What a run is made of while it trains: its data, its changing state, and its result.

Plain dataclasses shared by the loop, its checkpoints and the dense branch, so none of those needs
the loop itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import sparsetrain as st
from sparsetrain import tasks
from sparsetrain.data import DatasetInfo
from sparsetrain.report.summary import Report
from sparsetrain.train import distributed
from sparsetrain.train.config import Config
from sparsetrain.train.sampler import EpochBatchSampler, epoch_generator

__all__ = ["Data", "EpochProgress", "RunResult", "TrainState"]


@dataclass
class Data:
    train: DataLoader
    test: DataLoader
    info: DatasetInfo
    generator: torch.Generator  # the train loader's (worker seeds); reseeded every epoch
    sampler: EpochBatchSampler | None = None  # the train order: a function of (seed, epoch)

    def start_epoch(self, epoch: int, batch: int = 0) -> None:
        """Set the train loader to epoch ``epoch``'s order, from its batch ``batch`` on."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, batch)
            self.generator.manual_seed(
                epoch_generator(self.sampler.seed, epoch, "loader").initial_seed()
            )


@dataclass
class EpochProgress:
    """How far the current epoch has got, and the sums behind its train loss and accuracy.

    Sums run over predictions: one per example, or one per token for a language model.

    The sums stay on the training device (no synchronization per step) and go into checkpoints,
    so a run resumed mid-epoch reports the same epoch metrics as one never interrupted.
    """

    batch: int = 0  # batches of the epoch consumed
    loss_sum: torch.Tensor | None = None  # sum over predictions of the loss
    correct: torch.Tensor | None = None
    seen: int = 0  # predictions in the sums (this process's)
    skipped: int = 0  # batches whose non-finite loss skipped the update (train.skip_nonfinite)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        if self.loss_sum is None or self.correct is None:
            self.loss_sum = torch.zeros((), device=loss.device)
            self.correct = torch.zeros((), dtype=torch.long, device=loss.device)
        self.loss_sum += loss.detach() * y.numel()
        self.correct += tasks.correct(logits, y)
        self.seen += y.numel()

    def finish(self, device: torch.device) -> tuple[float, float]:
        """Mean loss and accuracy of the epoch over every process; starts the next epoch."""
        totals = torch.tensor([0.0, 0.0, float(self.seen)], dtype=torch.float64, device=device)
        if self.loss_sum is not None and self.correct is not None:
            totals[0], totals[1] = self.loss_sum, self.correct
        loss_sum, correct, seen = distributed.all_sum(totals).tolist()
        vars(self).update(vars(EpochProgress()))
        return loss_sum / max(1.0, seen), correct / max(1.0, seen)

    def to(self, device: torch.device) -> None:
        if self.loss_sum is not None and self.correct is not None:
            self.loss_sum, self.correct = self.loss_sum.to(device), self.correct.to(device)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # tensors copied

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


@dataclass
class TrainState:
    """Everything that changes while training; ``run_epochs`` advances it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sparsifier: st.Sparsifier
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    elapsed: float = 0.0  # seconds spent in run_epochs
    progress: EpochProgress = field(default_factory=EpochProgress)  # inside epoch ``epoch + 1``
    forward: nn.Module | None = None  # what the loop calls: the model, or DDP around it


@dataclass
class RunResult:
    run_dir: Path
    config: Config
    state: TrainState
    metrics: list[dict[str, Any]]
    test_loss: float
    test_acc: float
    report: Report
    checkpoint: Path
    plots: list[Path]
    extras: dict[str, Any] = field(default_factory=dict)
