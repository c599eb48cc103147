"""Config files: a run's options as YAML or TOML, read and checked against the options types."""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from apr_cli.errors import AprError
from apr_cli.fsutil import atomic_write_bytes

CONFIG_FILE = "config.yaml"
SUFFIXES = (".yaml", ".yml", ".toml")


def option_types(cls: type) -> dict[str, type]:
    """Each option of the options dataclass `cls` by its long name (`batch-size`) -> its type.

    Nested dataclasses (a run's training settings) are flattened: every option has one name.
    """
    hints = typing.get_type_hints(cls)
    found: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found.update(option_types(kind))
        else:
            found[long_name(f.name)] = kind
    return found


def long_name(field: str) -> str:
    return field.replace("_", "-")


def flat_values(options: Any) -> dict[str, Any]:
    """An options object's values by long name, nested dataclasses flattened, as plain data."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if dataclasses.is_dataclass(value):
            values.update(flat_values(value))
        else:
            values[long_name(f.name)] = str(value) if isinstance(value, Path) else value
    return values


def build(cls: type, values: dict[str, Any]) -> Any:
    """An options object of `cls` from long-name values; absent options keep their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = build(kind, values)
        elif long_name(f.name) in values:
            kwargs[f.name] = values[long_name(f.name)]
    return cls(**kwargs)


def read_config(path: Path) -> dict[str, Any]:
    """The file's top-level mapping, parsed as YAML or TOML by its suffix."""
    if path.suffix not in SUFFIXES:
        raise AprError(f"--config {path}: expected a .yaml, .yml or .toml file")
    try:
        text = path.read_text()
    except OSError as e:
        raise AprError(f"--config {path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        where = " ".join(str(e).split())
        raise AprError(f"--config {path}: not valid {path.suffix[1:].upper()}: {where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AprError(f"{path}: expected a mapping of option names to values at the top level")
    return data


def check_value(path: Path, key: str, value: Any, kind: Any) -> Any:
    """`value` as type `kind` (None for optional ones), or a one-line error naming the key."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        value = float(value) if ok else value
    elif kind in (str, Path):
        ok = isinstance(value, str)
        value = Path(value) if ok and kind is Path else value
    else:
        raise TypeError(f"option {key} has a type config files cannot hold: {kind}")
    if not ok:
        raise AprError(f"{path}: {key}: expected {type_name(kind)}, got {value!r}")
    return value


def type_name(kind: type) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(kind, "a path")


def load_config(path: Path, cls: type) -> dict[str, Any]:
    """The options in `path`, by long name, typed as `cls` declares and checked by its validate.

    An unknown key, a wrong type or a bad value is an AprError naming the file and the key.
    """
    data = read_config(path)
    known = option_types(cls)
    values = {}
    for key, value in data.items():
        name = long_name(str(key))
        if name not in known:
            raise AprError(f"{path}: unknown option {key!r}")
        values[name] = check_value(path, name, value, known[name])
    try:
        build(cls, values).validate()
    except AprError as e:
        raise AprError(f"{path}: {e}") from None
    return values


def write_config(path: Path, options: Any) -> None:
    """Every option of `options` by long name, as YAML that `load_config` reads back."""
    text = yaml.safe_dump(flat_values(options), sort_keys=False)
    atomic_write_bytes(path, text.encode())
