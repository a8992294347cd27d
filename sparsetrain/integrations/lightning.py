"""Sparse training under Lightning: one callback, its state inside Lightning's checkpoints.

    from sparsetrain.integrations.lightning import SparsityCallback
    trainer = lightning.pytorch.Trainer(max_epochs=10,
                                        callbacks=[SparsityCallback(method="rigl", sparsity=0.9)])
    trainer.fit(module)                 # or trainer.fit(module, ckpt_path="last.ckpt")

When training starts the callback calls :func:`sparsetrain.sparsify` on the LightningModule (or
one of its submodules, ``module="model"``) and the optimizer in ``trainer.optimizers``, with
``total_steps`` Lightning's ``estimated_stepping_batches`` (epochs, ``max_steps`` and
``accumulate_grad_batches`` counted) and ``steps_per_epoch`` the optimizer steps of one epoch.
The sparsifier's state (masks, step, method state) is the callback's ``state_dict``, so every
Lightning checkpoint holds it and ``fit(ckpt_path=...)`` restores it through ``load_state_dict``.

Lightning's automatic optimization calls ``optimizer.step(closure)``, and the closure runs the
forward and backward passes *inside* ``step``, after the optimizer's step pre-hooks; the
sparsifier's pre-hook would see the previous step's gradients, or none. The callback therefore
runs the closure first, in a step pre-hook registered ahead of the sparsifier's, and hands the
optimizer a closure that returns the loss already computed. Optimizers that call their closure
several times per step (L-BFGS) are refused.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.integrations.common import SparsityRun, log_values, require, steps_per_epoch

require("lightning", "lightning", "sparsetrain.integrations.lightning")

from lightning.pytorch import Callback  # noqa: E402

__all__ = ["SparsityCallback"]

log = logging.getLogger(__name__)


class SparsityCallback(Callback):
    """Sparsify the model a ``lightning.pytorch.Trainer`` fits, and keep its state in checkpoints.

    Args:
        strict: resuming from a checkpoint without sparsifier state is an error (True), or
            starts a new sparsifier on the loaded weights over the remaining steps, with a
            warning (False).
        log_layers: send each layer's sparsity to the loggers, not only the totals.
        module: the submodule of the LightningModule to sparsify (``"model"``); by default the
            LightningModule itself. FLOPs are counted from the first call of that module.
        **sparsify_kwargs: any keyword of :func:`sparsetrain.sparsify`, checked here.

    After ``trainer.fit()``, :attr:`sparsifier` is the :class:`~sparsetrain.Sparsifier`.
    """

    def __init__(
        self,
        *,
        strict: bool = True,
        log_layers: bool = True,
        module: str | None = None,
        **sparsify_kwargs: Any,
    ) -> None:
        self.run = SparsityRun(sparsify_kwargs)
        self.strict = strict
        self.log_layers = log_layers
        self.module = module
        self._loaded: dict[str, Any] | None = None
        self._global_step = 0
        self._logged_at = -1
        self._closure_hook: Any = None

    @property
    def sparsifier(self) -> Any:
        """The :class:`~sparsetrain.Sparsifier` of the current (or last) ``fit()``."""
        return self.run.sparsifier

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Sparsify (weights and optimizer state are loaded by now); on resume, restore."""
        model = pl_module if self.module is None else pl_module.get_submodule(self.module)
        optimizer = _only_optimizer(trainer.optimizers)
        total = trainer.estimated_stepping_batches
        total = int(total) if total != float("inf") else None
        per_epoch = steps_per_epoch(trainer.num_training_batches, trainer.accumulate_grad_batches)
        if self._closure_hook is not None:
            self._closure_hook.remove()
        self._closure_hook = optimizer.register_step_pre_hook(_closure_first)
        step = trainer.global_step
        self._global_step = step
        if step == 0:
            self.run.start(model, optimizer, total, per_epoch)
        elif self._loaded is not None:
            where = f"checkpoint {trainer.ckpt_path}"
            self.run.resume(model, optimizer, self._loaded, step, total, per_epoch, where)
        elif self.strict:
            raise CheckpointError(
                f"resuming at step {step}: checkpoint {trainer.ckpt_path} holds no sparsifier "
                "state (it was not saved with SparsityCallback); resume from one that has it, "
                "or pass strict=False to start a new sparsifier over the remaining steps"
            )
        else:
            remaining = None if total is None else total - step
            log.warning(
                "checkpoint %s holds no sparsifier state: new masks are drawn from the loaded "
                "weights and the method's schedule spans the remaining %s steps (strict=False)",
                trainer.ckpt_path,
                remaining,
            )
            self.run.start(model, optimizer, remaining, per_epoch, step)
        self._loaded = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Restore the sparsifier of a checkpoint whose run had already finished: Lightning then
        trains no step and skips ``on_train_start``, and ``report()`` / ``export()`` would
        find nothing."""
        if self.run.sparsifier is None and self._loaded:
            self.on_train_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        """Send sparsity and FLOPs to the loggers every ``log_every_n_steps`` optimizer steps."""
        step = self._global_step = trainer.global_step
        every = trainer.log_every_n_steps
        sp = self.run.sparsifier
        if sp is None or not every or step % every or step == self._logged_at:
            return
        self._logged_at = step
        if trainer.loggers:
            values = log_values(sp, self.log_layers)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state at the current step (empty before training starts)."""
        if self.run.sparsifier is None:
            return {}
        return self.run.state(self._global_step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved state until training starts (the optimizer does not exist yet)."""
        self._loaded = dict(state_dict)


def _only_optimizer(optimizers: list[Any]) -> torch.optim.Optimizer:
    if len(optimizers) != 1:
        raise ConfigError(
            f"SparsityCallback sparsifies one optimizer; configure_optimizers returned "
            f"{len(optimizers)}"
        )
    optimizer = optimizers[0]
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ConfigError(
            "SparsityCallback cannot drive L-BFGS, which calls its closure repeatedly"
        )
    return optimizer


def _closure_first(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
    """Run ``step``'s closure (forward, backward, clipping) before the sparsifier's pre-hook."""
    # ``args`` are step's own, ``self`` first; the closure comes by keyword or second.
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        return None
    with torch.enable_grad():
        loss = closure()
    return args[:1], {**kwargs, "closure": lambda: loss}
