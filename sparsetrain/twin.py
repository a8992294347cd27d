"""AC/DC's dense twin, fine-tuned in a training loop of your own.

``sparsetrain train`` fine-tunes the twin itself. In any other loop the run ends with the sparse
model and a snapshot of the dense model at the end of the last dense phase; the paper's twin is
that snapshot trained densely over the final compressed phase's steps, on the learning-rate
schedule the sparse model followed there. :func:`finetune_dense_twin` does that from a loss
function and batches, replaying the learning rates AC/DC recorded, so no scheduler has to be
rebuilt.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from sparsetrain.errors import ConfigError, ExportError
from sparsetrain.masks import Sparsifier

__all__ = ["finetune_dense_twin"]

log = logging.getLogger(__name__)


def _batches(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches`` round and round (a loader is iterated again, an iterator once)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty or iter(batches) is batches:
            raise ConfigError("finetune_dense_twin ran out of batches before the final phase's end")


def _twin_optimizer(sp: Sparsifier, twin: nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer class and groups, over the twin's parameters, at the snapshot state."""
    optimizer = sp.optimizer
    names = {id(p): name for name, p in sp.model.named_parameters()}
    params = dict(twin.named_parameters())
    groups = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [params[names[id(p)]] for p in g["params"]],
        }
        for g in optimizer.param_groups
    ]
    try:
        twin_optimizer = type(optimizer)(groups, **optimizer.defaults)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"cannot rebuild the run's {type(optimizer).__name__} for the twin ({error})"
        ) from None
    state = sp.method.snapshot["optimizer"]
    if state is not None:  # a copy: load_state_dict keeps the snapshot's tensors as the state
        twin_optimizer.load_state_dict(copy.deepcopy(state))
    return twin_optimizer


def finetune_dense_twin(
    sp: Sparsifier,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    max_grad_norm: float | None = None,
) -> nn.Module:
    """Fine-tune AC/DC's dense twin after training; returns it (a plain module, no masks).

    Args:
        sp: the sparsifier of a finished AC/DC run (``dense_twin=True``, the default).
        loss_fn: ``loss_fn(model, batch)`` -> the loss to minimise, as in your loop.
        batches: training batches, e.g. the loader (iterated again if it runs out); give those
            of the final phase to retrace the run.
        max_grad_norm: clip the twin's gradients as your loop clipped the sparse model's.

    The twin starts from the snapshot (weights, buffers, optimizer state) and takes one dense step
    per step of the final compressed phase, each at the learning rates the sparse model had at
    that step. ``sp.export(which="dense")`` returns the result afterwards.
    """
    method = sp.method
    if not hasattr(method, "final_lrs"):
        raise ConfigError(f"finetune_dense_twin needs an AC/DC run, not {type(method).__name__}")
    if method.twin is not None:
        log.info("the dense twin is already fine-tuned")
        return method.export(sp, which="dense")
    if method.snapshot is None:
        raise ExportError(
            "no dense snapshot yet: it is taken when the final compressed phase starts at step "
            f"{method.final_phase.start_step} (training is at step {sp.step}"
            f"{'' if method.dense_twin else ', and dense_twin=False'})"
        )
    if sp.optimizer is None:
        raise ConfigError("finetune_dense_twin needs the run's optimizer (sparsify(model, opt))")
    if len(method.final_lrs) < method.final_phase.length:
        log.warning(
            "the final phase has run %d of its %d steps; the twin is fine-tuned over those",
            len(method.final_lrs),
            method.final_phase.length,
        )
    twin = _snapshot_model(sp)
    optimizer = _twin_optimizer(sp, twin)
    twin.train()
    stream = _batches(batches)
    for lrs in method.final_lrs:
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_fn(twin, next(stream)).backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(twin.parameters(), max_grad_norm)
        optimizer.step()
    method.set_twin(twin.state_dict(), {"twin_steps": float(len(method.final_lrs))})
    log.info("AC/DC: dense twin fine-tuned over %d steps", len(method.final_lrs))
    return twin


def _snapshot_model(sp: Sparsifier) -> nn.Module:
    model = sp.baked_copy()
    model.load_state_dict(sp.method.snapshot["model"])
    return model
