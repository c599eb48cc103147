"""The `apr` command line: thin commands that parse, build library objects and render."""

import typer

from apr_cli.commands.distill import distill
from apr_cli.commands.generate import generate
from apr_cli.commands.shards import app as shards_app

app = typer.Typer(
    name="apr",
    help="Distill a teacher language model into a smaller student.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(distill)
app.command()(generate)
app.add_typer(shards_app, name="shards")
