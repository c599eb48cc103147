"""Long phases made visible on a terminal: a bar when the length is known, else a spinner.

Both are transient rich displays on a terminal and nothing elsewhere (captured or piped
output), where the caller prints a start line instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _description() -> TextColumn:
    # Descriptions hold paths: plain text, never markup (`[x]` would vanish or crash rich).
    return TextColumn("{task.description}", markup=False)


class ProgressBar:
    """A bar for one phase of `total` units: done of total, elapsed and remaining time.

    It appears at the first `update` or `advance`, so a phase whose total is learnt only after
    its input was checked (`update(0, total)`) shows nothing before, and a refused input stays
    one error line. Counted in bytes (shown as kB, MB, ...) when `in_bytes`. A further pass over
    the same units (`advance(n, phase)` with another phase name) gets its own line below.
    Does nothing when not `enabled`.
    """

    def __init__(
        self,
        console: Console,
        description: str,
        total: int | None = None,
        enabled: bool = True,
        in_bytes: bool = False,
    ):
        self.progress = (
            Progress(
                _description(),
                BarColumn(),
                DownloadColumn() if in_bytes else MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            if enabled
            else None
        )
        self.description, self.total = description, total
        self.tasks: dict[str, TaskID] = {}  # by phase, in the order they started

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.progress.stop()

    def update(self, done: int, total: int | None = None) -> None:
        """`done` units of `total` (or of the total given before) are finished."""
        self.total = total or self.total
        if self.progress is not None:
            self.progress.update(self._task(self.description), completed=done, total=self.total)

    def advance(self, n: int, phase: str | None = None) -> None:
        """`n` more units are finished in `phase` (by default the bar's own description)."""
        if self.progress is not None:
            self.progress.advance(self._task(phase or self.description), n)

    def _task(self, phase: str) -> TaskID:
        if not self.tasks:
            self.progress.start()
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=self.total)
        return self.tasks[phase]


@contextlib.contextmanager
def spinner(console: Console, description: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with the elapsed time for a phase of unknown length (e.g. torch.compile)."""
    if not enabled:
        yield
        return
    columns = (SpinnerColumn(), _description(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as shown:
        shown.add_task(description, total=None)
        yield
