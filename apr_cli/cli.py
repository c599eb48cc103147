"""The `apr` command line: thin commands that parse, build library objects and render.

Command modules import torch inside their bodies, so `apr --help` and `--version` start fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

import apr_cli
from apr_cli.commands.common import fail
from apr_cli.commands.distill import distill
from apr_cli.commands.eval import eval_model
from apr_cli.commands.generate import generate
from apr_cli.commands.humaneval import humaneval
from apr_cli.commands.options import flag
from apr_cli.commands.shards import app as shards_app
from apr_cli.commands.teacher_cache import app as teacher_cache_app
from apr_cli.commands.train import train

try:  # newer typer vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort, ClickException, NoArgsIsHelpError

app = typer.Typer(
    name="apr",
    help="Distill a teacher language model into a smaller student.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"apr {apr_cli.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        flag("--version", help="Print the version and exit.", is_eager=True, callback=show_version),
    ] = False,
) -> None:
    """Distill a teacher language model into a smaller student."""


app.command()(distill)
app.command()(train)
app.command(name="eval")(eval_model)
app.command()(generate)
app.command()(humaneval)
app.add_typer(shards_app, name="shards")
app.add_typer(teacher_cache_app, name="teacher-cache")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors become one red line on stderr, like every other error."""
    # OpenMP threads that spin while they wait stall a run 10x and more when another job holds a
    # core; sleeping ones cost little on an idle machine (benchmarks/bench_threads.py). OpenMP
    # reads this once, when torch loads it, which no command has done yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        code = app(args=argv, prog_name="apr", standalone_mode=False)
    except NoArgsIsHelpError:  # typer has already printed the help
        raise SystemExit(2) from None
    except ClickException as e:
        raise SystemExit(fail(e.format_message(), e.exit_code).exit_code) from None
    except Abort:
        raise SystemExit(fail("aborted", 130).exit_code) from None
    sys.exit(code if isinstance(code, int) else 0)
