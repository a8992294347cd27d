"""Stop cleanly on SIGTERM / SIGINT: finish the step, save a checkpoint, exit non-zero.

Job schedulers (SLURM, Kubernetes, torchrun's agent) send SIGTERM some seconds before they kill a
job; Ctrl-C sends SIGINT. The handlers only record the signal. The training loop looks at it at the
next step boundary (all ranks agree on it there), saves a checkpoint and raises
:class:`TrainingInterrupted`, which ``sparsetrain train`` turns into exit code 128 + the signal
number (143 for SIGTERM, 130 for SIGINT) and a line saying how to resume. A second SIGINT
interrupts at once, for a user who does not want to wait for the save.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["STOP_SIGNALS", "StopSignals", "TrainingInterrupted"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(BaseException):
    """Training stopped on a signal after saving ``checkpoint``; resume from ``run_dir``.

    Like KeyboardInterrupt it is not an ``Exception``: code that catches every error to carry on
    (e.g. a grid of runs) must not swallow a request to stop.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, run_dir: Path) -> None:
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        self.run_dir = run_dir
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(
            f"stopped by {signal.Signals(self.signum).name} after step {step} ({saved}); "
            f"resume with: sparsetrain train --resume {run_dir}"
        )

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopSignals:
    """Context manager that records SIGTERM / SIGINT in ``received`` instead of dying.

    Handlers can only be installed from the main thread; elsewhere the default behaviour stays and
    ``received`` remains None. The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        else:
            log.debug("not the main thread: SIGTERM/SIGINT keep their default handlers")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: do not wait for the checkpoint
        if self.received is None:
            self.received = signum
