"""Stopping a run cleanly: SIGINT/SIGTERM end it after the current step, with a checkpoint."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from signal import SIGINT, SIGTERM

from apr_cli.errors import AprError


class RunInterrupted(AprError):
    label = "stopped"  # asked for (Ctrl-C, SIGTERM), not an error

    def __init__(self, signum: int, run_dir: Path, step: int, command: str):
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} after step {step}; checkpoint saved; "
            f"continue with: apr {command} --resume {run_dir}",
            exit_code=128 + signum,
        )


class WarmUpInterrupted(AprError):
    def __init__(self, signum: int):
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} during the teacher warm-up, before "
            "any distillation step; there is nothing to resume: start the run again",
            exit_code=128 + signum,
        )


@contextlib.contextmanager
def warm_up_signals() -> Iterator[None]:
    """SIGINT/SIGTERM stop the teacher warm-up at once: it has no checkpoint to finish."""

    def stop(signum, frame):
        raise WarmUpInterrupted(signum)

    with handling(stop):
        yield


@contextlib.contextmanager
def handling(handler) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM inside the block (from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig in (SIGINT, SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second one exits at once."""

    def __init__(self):
        self.signum: int | None = None

    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            # Every file is replaced atomically, so leaving mid-write corrupts nothing.
            os._exit(128 + signum)
        self.signum = signum

    def installed(self) -> contextlib.AbstractContextManager[None]:
        return handling(self.handle)
