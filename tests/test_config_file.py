"""Config files: read, checked against the options dataclasses, written back (library level)."""

from pathlib import Path

import pytest

from apr_cli.distill.config_file import build, flat_values, load_config, option_types, write_config
from apr_cli.distill.options import DistillOptions
from apr_cli.errors import AprError


def test_every_option_has_a_type_config_files_hold():
    types = option_types(DistillOptions)  # raises on a type check_value cannot hold
    assert types["batch-size"] is int and types["lr"] is float and types["dataset"] == Path | None


def test_written_options_read_back_equal(tmp_path):
    options = DistillOptions(dataset=tmp_path, teacher_warmup=3)
    options.train.steps, options.train.lr, options.train.compile = 7, 1e-4, True
    write_config(tmp_path / "config.yaml", options)
    values = load_config(tmp_path / "config.yaml", DistillOptions)
    assert build(DistillOptions, values) == options
    assert flat_values(build(DistillOptions, values)) == flat_values(options)


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_yaml_and_toml_alike(tmp_path, suffix):
    text = {
        ".yaml": "steps: 12\nlr: 1\nteacher: tiny-teacher\nfsdp: true\nteacher-warmup: null\n",
        ".toml": 'steps = 12\nlr = 1\nteacher = "tiny-teacher"\nfsdp = true\n',
    }[suffix]
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    values = load_config(path, DistillOptions)
    assert values["steps"] == 12 and values["lr"] == 1.0 and isinstance(values["lr"], float)
    assert values["fsdp"] is True and values["teacher"] == "tiny-teacher"


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("unknown.yaml", "steps: 5\nstepz: 6\n", "unknown option 'stepz'"),
        ("type.yaml", "steps: ten\n", "steps: expected an integer, got 'ten'"),
        ("bool.yaml", "steps: true\n", "steps: expected an integer, got True"),
        ("float.toml", 'lr = "fast"\n', "lr: expected a number, got 'fast'"),
        ("flag.yaml", "compile: yes please\n", "compile: expected true or false"),
        ("value.yaml", "steps: -1\n", "--steps must be > 0, got -1"),
        ("alpha.toml", "alpha = 2.0\n", "--alpha must be in [0, 1], got 2.0"),
        ("null.yaml", "steps: null\n", "steps: expected an integer, got None"),
        ("syntax.yaml", "steps: [5\n", "not valid YAML"),
        ("syntax.toml", "steps = = 5\n", "not valid TOML"),
        ("list.yaml", "- steps\n- 5\n", "expected a mapping of option names"),
        ("config.json", '{"steps": 5}', "expected a .yaml, .yml or .toml file"),
    ],
)
def test_bad_files_are_refused_naming_file_and_key(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AprError) as caught:
        load_config(path, DistillOptions)
    message = str(caught.value)
    assert needle in message and str(path) in message and "\n" not in message
