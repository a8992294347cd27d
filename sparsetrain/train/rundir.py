"""One run per directory: a new run never writes into a directory that holds another run.

Checkpoint rotation keeps the highest step numbers, so a second run started in the directory of an
interrupted one would have each of its checkpoints deleted as soon as it is written, and a resume
would continue the first run. So a new run refuses a directory holding rotating checkpoints or a
``final.pt``, unless told to overwrite it (which first deletes that run's files); a resumed run
drops the checkpoints written after the one it resumes from (a timeline it abandons, like the
metrics records it trims). Either way the temporary files of saves cut short by a kill go.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sparsetrain.errors import ConfigError
from sparsetrain.train import distributed, fsdp
from sparsetrain.train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_step,
    list_checkpoints,
    remove_temporaries,
)
from sparsetrain.train.steplog import STEPS_FILE, TENSORBOARD_DIR

__all__ = ["RUN_FILES", "claim_run_dir", "clear_run", "tidy_run_dir"]

log = logging.getLogger(__name__)

# What a run writes besides its checkpoints (*.pt: final.pt, a method's extra models).
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    STEPS_FILE,
    "report.txt",
    "report.json",
    "curves.png",
    "layer_sparsity.png",
)


def _refusal(run_dir: Path) -> str | None:
    """Why a new run may not start in ``run_dir`` (None: no run trained there)."""
    saved = list_checkpoints(run_dir)
    if (run_dir / "final.pt").exists():
        found, resume = "a finished run (final.pt)", ""
    elif saved:
        found = f"the checkpoints of a run (up to step {checkpoint_step(saved[-1])})"
        resume = f"resume it (--resume {run_dir}), "
    else:
        return None
    return (
        f"run directory {run_dir} already holds {found}; {resume}start over with --overwrite "
        "(overwrite=True), or give the new run another directory (--out / train.out)"
    )


def claim_run_dir(run_dir: str | Path, overwrite: bool = False) -> None:
    """Make ``run_dir`` the new run's: refuse one holding another run, or clear it (``overwrite``).

    Under ``torchrun`` every rank calls this and raises the same error; only rank 0 deletes.
    """
    run_dir = Path(run_dir)
    problem = _refusal(run_dir) if distributed.rank() == 0 else None
    problem = distributed.broadcast_object(problem)
    if problem is None:
        return
    if not overwrite:
        raise ConfigError(problem)
    if distributed.rank() == 0:
        log.warning("--overwrite: deleting the previous run in %s", run_dir)
        clear_run(run_dir)


def clear_run(run_dir: str | Path) -> None:
    """Delete what a run wrote into ``run_dir`` (checkpoints, ``*.pt``, RUN_FILES, TensorBoard
    events); other files stay."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)
    for path in [*run_dir.glob("*.pt"), *(run_dir / name for name in RUN_FILES)]:
        path.unlink(missing_ok=True)
    remove_temporaries(run_dir)


def tidy_run_dir(run_dir: str | Path, step: int) -> None:
    """At a (re)start at ``step``: drop torn saves and the checkpoints written after ``step``."""
    remove_temporaries(run_dir)
    for path in list_checkpoints(run_dir):
        if checkpoint_step(path) > step:
            log.info("removing %s: written after step %d, where the run continues", path, step)
            fsdp.remove_checkpoint(path)
