"""Continue an interrupted run exactly: find its checkpoint, check it belongs to the run, restore.

``sparsetrain train --resume RUN_DIR_OR_CKPT`` reads the newest loadable checkpoint of a run
directory (or the file given), refuses one from a different configuration (than the one asked for,
or than the run directory's ``config.yaml``), rebuilds the run from its config and restores the
saved state in the order that keeps everything consistent: masks and method state
(``sp.load_state_dict``), weights, optimizer, lr scheduler, then the RNG states. The
run continues in its own directory; ``metrics.jsonl`` and ``steps.jsonl`` lose the records
written after the checkpoint, which the resumed run writes again.

Nothing in the run directory is touched until the checkpoint has been verified (size and sha256)
and checked against the model, masks and optimizer it is loaded into.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsetrain.errors import CheckpointError
from sparsetrain.train import fsdp
from sparsetrain.train.checkpoint import (
    CHECKPOINT_DIR,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
)
from sparsetrain.train.config import Config, apply_overrides, config_from_dict, load_config

__all__ = [
    "RESUMABLE_KEYS",
    "ResumePoint",
    "check_same_run",
    "find_resume",
    "restore_run",
    "restore_state",
    "trim_metrics",
    "trim_steps",
]

log = logging.getLogger(__name__)

# Config keys a resumed run may change: where and how it runs, not what it computes. Everything
# else (model, data, method, sparsity, optimizer, lr schedule, seed, batch size, epochs) shapes the
# step-based schedules or the data order, so a change would not continue the same run.
RESUMABLE_KEYS = frozenset(
    {
        "data.dir",
        "train.out",
        "train.name",
        "train.device",
        "train.num_workers",
        "train.log_every",
        "train.eval_every",
        "train.save_every",
        "train.keep",
        "train.check_masks_every",
        "train.skip_nonfinite",
        "train.loggers",
    }
)
RUN_CONFIG = "config.yaml"  # the resolved config a run writes into its directory
_TRAINING_STATE = ("model", "sparsifier", "optimizer", "scheduler", "epoch", "step", "progress")


@dataclass(frozen=True)
class ResumePoint:
    """A verified training checkpoint and the run directory it continues."""

    path: Path
    run_dir: Path
    checkpoint: dict[str, Any]

    def config(self, overrides: Sequence[str] = ()) -> Config:
        """The checkpoint's config with ``--set`` style ``overrides`` applied."""
        raw = apply_overrides(self.checkpoint["config"], overrides)
        return config_from_dict(raw, f" in checkpoint {self.path}")


def _require_training_state(checkpoint: Mapping[str, Any], path: Path) -> None:
    sharded = ("model", "sparsifier", "optimizer") if checkpoint.get("shards") else ()
    missing = [k for k in _TRAINING_STATE if checkpoint.get(k) is None and k not in sharded]
    if missing or not isinstance(checkpoint.get("config"), Mapping):
        raise CheckpointError(
            f"{path} holds no training state to resume from (missing {', '.join(missing) or 'config'})"
        )


def find_resume(path: str | Path) -> ResumePoint:
    """The checkpoint to resume: ``path`` itself, or the newest loadable one of run dir ``path``.

    In a run directory a newer checkpoint that fails verification is skipped with a warning (the
    older ones are kept for exactly this); a file given by name must verify. A finished run
    (``final.pt`` present) is refused, and so is a checkpoint whose config differs from the run
    directory's ``config.yaml`` in a key that shapes the run (the error names each such key).
    """
    path = Path(path)
    if path.is_dir():
        run_dir = path
        candidates = list_checkpoints(path)[::-1]
    else:
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        candidates = [path]
    if (run_dir / "final.pt").exists():
        raise CheckpointError(f"run {run_dir} has finished (final.pt exists); nothing to resume")
    if not candidates:
        raise CheckpointError(
            f"no checkpoint to resume in {run_dir} (looked for {CHECKPOINT_DIR}/step-*.pt)"
        )
    refused = []
    for candidate in candidates:
        try:
            checkpoint = load_checkpoint(candidate)
        except CheckpointError as error:
            if len(candidates) == 1:
                raise
            log.warning("skipping checkpoint: %s", error)
            refused.append(str(error))
            continue
        _require_training_state(checkpoint, candidate)
        _check_of_run(checkpoint, candidate, run_dir)
        if refused:
            log.warning("resuming from the older checkpoint %s", candidate)
        return ResumePoint(candidate, run_dir, checkpoint)
    raise CheckpointError(f"no loadable checkpoint in {run_dir}: {'; '.join(refused)}")


def _check_of_run(checkpoint: Mapping[str, Any], path: Path, run_dir: Path) -> None:
    """Refuse a checkpoint whose config is not the one of the run it would continue (the run
    directory's ``config.yaml``, when there is one)."""
    written = run_dir / RUN_CONFIG
    if not written.is_file():
        return
    run = load_config(written)
    mine = config_from_dict(checkpoint["config"], f" in checkpoint {path}")
    differing, details = _differences(mine, run, f"in {written}")
    if differing:
        raise CheckpointError(
            f"cannot resume from {path}: it is not a checkpoint of the run in {run_dir}: {details}"
        )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):  # an empty one adds no key: {} equals no options
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _differences(saved: Config, other: Config, where: str) -> tuple[list[str], str]:
    """The keys outside RESUMABLE_KEYS where ``other`` differs from ``saved``, and in words."""
    old, new = _flatten(saved.to_dict()), _flatten(other.to_dict())
    differing = [
        key
        for key in sorted(old.keys() | new.keys())
        if key not in RESUMABLE_KEYS and old.get(key) != new.get(key)
    ]
    details = "; ".join(
        f"{key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} {where}" for key in differing
    )
    return differing, details


def check_same_run(saved: Config, requested: Config, path: Path) -> None:
    """Raise CheckpointError unless ``requested`` differs from ``saved`` only in RESUMABLE_KEYS."""
    differing, details = _differences(saved, requested, "now")
    if not differing:
        return
    hint = (
        " (a different length changes every step-based schedule: start a new run)"
        if "train.epochs" in differing
        else ""
    )
    raise CheckpointError(
        f"cannot resume from {path}: it is from a different run configuration: {details}{hint}"
    )


def _check_fits(state: Any, checkpoint: Mapping[str, Any], path: Path) -> None:
    """Everything that can be checked before loading: names and shapes of every tensor."""
    expected = state.model.state_dict()
    saved = checkpoint["model"]
    problems = [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [
        f"{k} has shape {tuple(saved[k].shape)}, the model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    sparsifier = checkpoint["sparsifier"]
    method = getattr(state.sparsifier.method, "name", None)
    if sparsifier.get("method") != method:
        problems.append(f"masks of method {sparsifier.get('method')!r}, this run uses {method!r}")
    masks, params = sparsifier.get("masks", {}), state.sparsifier.params
    if set(masks) != set(params):
        problems.append(f"masks for {sorted(masks)[:3]}..., sparse parameters {sorted(params)[:3]}")
    groups = checkpoint["optimizer"].get("param_groups", [])
    sizes = [len(g["params"]) for g in state.optimizer.param_groups]
    if [len(g.get("params", [])) for g in groups] != sizes:
        problems.append("optimizer parameter groups differ")
    if problems:
        raise CheckpointError(
            f"{path} does not fit the model built from its config: {'; '.join(problems[:5])}"
        )


def restore_state(state: Any, checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Load a training checkpoint into a freshly built ``TrainState`` (model already sparsified).

    Order: sparsifier (masks, targets, method state), model weights, optimizer, lr scheduler,
    counters. RNG states are the caller's, last, once the data is set up.
    """
    path = Path(path)
    _require_training_state(checkpoint, path)
    if not checkpoint.get("shards"):
        _check_fits(state, checkpoint, path)
    try:
        if checkpoint.get("shards"):  # train.strategy fsdp: DCP shards beside the file
            fsdp.load_parts(state, checkpoint, path)
        else:
            state.sparsifier.load_state_dict(checkpoint["sparsifier"])
            state.model.load_state_dict(checkpoint["model"])
            state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot restore the training state ({first})") from None
    state.epoch = int(checkpoint["epoch"])
    state.step = int(checkpoint["step"])
    state.elapsed = float(checkpoint.get("elapsed", 0.0))
    state.progress.load_state_dict(checkpoint["progress"])


def restore_run(state: Any, data: Any, point: ResumePoint) -> None:
    """Restore a run's ``TrainState`` and its ``Data``'s order and RNG states from ``point``."""
    checkpoint = point.checkpoint
    restore_state(state, checkpoint, point.path)
    sampler = checkpoint.get("sampler") or {}
    if data.sampler is not None:
        data.sampler.set_epoch(sampler.get("epoch", state.epoch))
        if sampler.get("world_size", 1) != data.sampler.world_size:
            log.warning(
                "the checkpoint was written by %d processes, this run has %d: the schedule and "
                "data order continue, but per-process BatchNorm statistics and gradient sums "
                "differ from an uninterrupted run",
                *(sampler.get("world_size", 1), data.sampler.world_size),
            )
    restore_rng(checkpoint["rng"], data.generator)
    log.info(
        "resuming from %s: epoch %d, batch %d, step %d",
        *(point.path, state.epoch + 1, state.progress.batch, state.step),
    )


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line torn by the interruption
            continue
    return records


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def trim_metrics(path: Path, epoch: int, write: bool = True) -> list[dict[str, Any]]:
    """The main run's records of epochs up to ``epoch`` in ``path``; ``write``: keep only those.

    Records written after the checkpoint (later epochs, after-training phases) are dropped: the
    resumed run writes them again. The file is replaced atomically.
    """
    if not path.exists():
        return []
    kept = [r for r in _read_records(path) if "phase" not in r and r.get("epoch", 0) <= epoch]
    if write:
        _rewrite(path, kept)
    return kept


def trim_steps(path: Path, step: int) -> None:
    """Keep the main run's step records (``steps.jsonl``) up to optimizer step ``step``, as
    :func:`trim_metrics` does for the epochs: the resumed run writes the later ones again."""
    if path.exists():
        _rewrite(path, [r for r in _read_records(path) if "phase" not in r and r["step"] <= step])
