"""What every command shares: turning library errors into one red line and an exit code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.text import Text

from apr_cli.errors import AprError, from_os_error

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, exit_code: int = 2, label: str = "error") -> typer.Exit:
    """Print `error: message` on stderr (red) and return the Exit to raise.

    Another `label` (a run stopped on request) prints in yellow.
    """
    color = "bold red" if label == "error" else "bold yellow"
    # The message holds paths and user text: plain Text, never markup (`[/x]` would crash rich).
    stderr.print(Text(f"{label}:", style=color), Text(message))
    return typer.Exit(code=exit_code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Run a command body; an AprError or OSError becomes one line on stderr and an exit code."""
    try:
        yield
    except AprError as e:
        raise fail(str(e), e.exit_code, e.label) from None
    except OSError as e:  # unreadable input, read-only --out, full disk: one line, no traceback
        error = from_os_error(e)
        raise fail(str(error), error.exit_code) from None
    except KeyboardInterrupt:  # typer would exit 130 saying nothing
        raise fail("interrupted by SIGINT", 130) from None
