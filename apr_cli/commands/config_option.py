"""`--config FILE`: a config file's options become the command's defaults; flags override them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from apr_cli.commands.common import user_errors
from apr_cli.commands.options import RUN
from apr_cli.distill.config_file import flat_values, load_config
from apr_cli.errors import AprError


def config_defaults(ctx: typer.Context, path: Path, defaults: Any, command: str) -> dict[str, Any]:
    """The file's options as click defaults for `ctx`'s command, keyed by parameter name.

    The file is checked against the options dataclass of `defaults`. Each command parameter is
    named after the options field it sets, so a key finds its parameter by name. A key the
    command has no option for is accepted only when it holds what the command uses anyway
    (`apr train` reading a file that says `teacher: null`).
    """
    values = load_config(path, type(defaults))
    params = {p.name: p for p in ctx.command.params}
    fixed = flat_values(defaults)
    found = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in params:
            if value is None and params[name].default is not None:
                raise AprError(f"{path}: {key}: apr {command} needs a value, got null")
            found[name] = value
        elif _shown(value) != fixed[key]:
            raise AprError(f"{path}: {key}: not an option of apr {command}")
    return found


def _shown(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def config_option(defaults: Any, command: str) -> Callable[[typer.Context, Path | None], Any]:
    """The eager callback of `--config`: load the file before the other options are read."""

    def load(ctx: typer.Context, path: Path | None) -> Path | None:
        if path is not None:
            with user_errors():
                found = config_defaults(ctx, path, defaults, command)
            ctx.default_map = {**(ctx.default_map or {}), **found}
        return path

    return load


def ConfigFile(defaults: Any, command: str) -> Any:  # noqa: N802 (used like the other types)
    """The `--config` option of a command whose options default to `defaults`."""
    return Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Options from a YAML or TOML file, by long name (as RUN/config.yaml holds "
            "them); options on the command line override it.",
            exists=True,
            dir_okay=False,
            is_eager=True,
            callback=config_option(defaults, command),
            rich_help_panel=RUN,
        ),
    ]
