"""What the training loop computes from a model's output, for each kind of dataset.

Both tasks are classification at every output position, so one loss and one accuracy serve both:
``classification`` has logits ``[B, C]`` for labels ``[B]``; ``language_model`` has next-token
logits ``[B, T, V]`` for targets ``[B, T]``, each of the ``B * T`` positions one prediction. Loss
and accuracy are then means per example or per token. A language model's loss also reads as bits
per token (``loss / ln 2``): bits per byte for the byte-level ``text`` dataset, the usual measure
of a character-level model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsetrain.errors import ConfigError

__all__ = [
    "CLASSIFICATION",
    "LANGUAGE_MODEL",
    "TASKS",
    "check_task",
    "Headline",
    "correct",
    "derived_metrics",
    "describe",
    "headline",
    "loss",
]

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language_model"
TASKS = (CLASSIFICATION, LANGUAGE_MODEL)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of: {', '.join(TASKS)}")
    return task


def loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over every prediction (position) of the batch."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction=reduction)


def correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of predictions whose top class is the target (a 0-dim tensor, on the device)."""
    return (logits.argmax(-1) == targets).sum()


def derived_metrics(
    task: str, mean_loss: float | None, prefix: str = ""
) -> dict[str, float | None]:
    """Metrics that follow from the mean loss: ``bpb`` (bits per token, per byte for byte-level
    text) for a language model, none for a classifier. Keys start with ``prefix``; values are
    None when ``mean_loss`` is (an epoch without evaluation)."""
    if task != LANGUAGE_MODEL:
        return {}
    return {f"{prefix}bpb": None if mean_loss is None else mean_loss / math.log(2)}


@dataclass(frozen=True)
class Headline:
    """The one number a comparison ranks a task's models by: a key of the result records, how to
    print it, and which way is better."""

    key: str
    label: str
    scale: float  # printed value = scale * stored value
    higher_is_better: bool

    def format(self, value: float) -> str:
        return f"{self.scale * value:.2f}" if self.scale != 1 else f"{value:.3f}"


_HEADLINES = {
    CLASSIFICATION: Headline("test_acc", "test accuracy (%)", 100.0, True),
    LANGUAGE_MODEL: Headline("test_bpb", "validation bits per byte", 1.0, False),
}


def headline(task: str) -> Headline:
    """Test accuracy for a classifier; validation bits per byte for a language model (its
    next-byte accuracy says little)."""
    return _HEADLINES[check_task(task)]


def describe(task: str, mean_loss: float, accuracy: float) -> str:
    """``loss 0.3012 acc 89.10%``, with ``bpb 1.873`` after the loss for a language model."""
    extra = "".join(f" {k} {v:.3f}" for k, v in derived_metrics(task, mean_loss).items())
    return f"loss {mean_loss:.4f}{extra} acc {accuracy:.2%}"
