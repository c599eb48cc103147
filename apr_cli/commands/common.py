"""What every command shares: turning library errors into one red line and an exit code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from apr_cli.errors import AprError

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, exit_code: int = 2, label: str = "error") -> typer.Exit:
    """Print `error: message` on stderr (red) and return the Exit to raise.

    Another `label` (a run stopped on request) prints in yellow.
    """
    color = "bold red" if label == "error" else "bold yellow"
    stderr.print(f"[{color}]{label}:[/] {escape(message)}", markup=True)
    return typer.Exit(code=exit_code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Run a command body; an AprError becomes one line on stderr and a non-zero exit."""
    try:
        yield
    except AprError as e:
        raise fail(str(e), e.exit_code, e.label) from None
