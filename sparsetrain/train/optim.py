"""Optimizer and per-step learning-rate schedule from the config.

The schedule is a function of the optimizer step (not the epoch), so warm-up and decay are smooth
and a run resumed mid-epoch continues on the same curve.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from sparsetrain.errors import ConfigError
from sparsetrain.train.config import LRScheduleConfig, OptimizerConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def build_optimizer(
    params: Iterable[nn.Parameter], config: OptimizerConfig
) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay) or AdamW (decoupled weight decay)."""
    params = list(params)
    if config.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            fused=config.fused or None,
        )
    if config.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
            fused=config.fused or None,
        )
    raise ConfigError(f"unknown optimizer {config.name!r}; choose sgd or adamw")


def lr_factor(config: LRScheduleConfig, steps_per_epoch: int, total_steps: int) -> Callable:
    """Multiplier of the base lr at step ``t`` (0-based): linear warm-up, then the schedule.

    Warm-up over ``w`` steps goes ``1/w, 2/w, ..., 1``; cosine then decays from 1 at step ``w``
    towards 0 at ``total_steps``; step multiplies by ``gamma`` at each milestone (in epochs).
    """
    warmup = round(config.warmup_epochs * steps_per_epoch)
    milestones = [round(m * steps_per_epoch) for m in config.milestones]
    decay_steps = max(1, total_steps - warmup)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if config.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup) / decay_steps)))
        if config.name == "step":
            return config.gamma ** bisect.bisect_right(milestones, t)
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: LRScheduleConfig,
    steps_per_epoch: int,
    total_steps: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to ``step()`` after every optimizer step; its state_dict resumes it exactly."""
    if config.name not in ("cosine", "step", "constant"):
        raise ConfigError(f"unknown lr schedule {config.name!r}; choose cosine, step or constant")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config, steps_per_epoch, total_steps)
    )
