"""`--config FILE` on `apr distill` / `apr train`: round trip, overrides, bad files at the CLI."""

import json

import numpy as np
import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.data.shards import write_shard
from apr_cli.distill.config_file import option_types
from apr_cli.distill.options import DistillOptions

FAST = ["--seq-len", "16", "--batch-size", "4", "--teacher-warmup", "3", "--device", "cpu"]


def apr(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("kind") != "eval"]


def weights(run_dir):
    return load_file(run_dir / "student-trained.apr" / "model.safetensors")


def command_params(name: str) -> set[str]:
    command = typer.main.get_command(app).commands[name]
    return {p.name for p in command.params}


def test_every_option_field_is_a_parameter_of_apr_distill():
    """--config finds a parameter by its field's name: a renamed one fails here."""
    fields = {key.replace("-", "_") for key in option_types(DistillOptions)}
    fields.remove("min_lr_ratio")  # no command-line option: a file may only repeat its default
    assert fields <= command_params("distill")
    no_teacher = {"teacher", "teacher_cache", "student_init", "teacher_warmup", "loss"}
    no_teacher |= {"temperature", "alpha", "on_policy_fraction", "prompts", "max_new_tokens"}
    no_teacher |= {"sample_temperature", "sample_top_p", "on_policy_loss", "teacher_samples"}
    assert fields - no_teacher - {"beta"} <= command_params("train")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_shard(root / "a.bin", np.random.default_rng(1).integers(0, 512, 3000))
    return root


@pytest.fixture(scope="module")
def original(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("runs") / "a"
    r = apr("distill", *FAST, "--dataset", dataset, "--steps", 6, "--lr", 1e-3, "--seed", 3,
            "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
def test_a_run_from_its_config_yaml_is_the_same_run(original, tmp_path):
    config = yaml.safe_load((original / "config.yaml").read_text())
    assert config["steps"] == 6 and config["lr"] == 1e-3 and config["shuffle"] is False
    r = apr("distill", "--config", original / "config.yaml", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert losses(tmp_path / "b") == losses(original)
    a, b = weights(original), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert (tmp_path / "b" / "config.yaml").read_text() == (original / "config.yaml").read_text()


@pytest.mark.slow
def test_command_line_options_override_the_file(original, tmp_path):
    r = apr("distill", "--config", original / "config.yaml", "--steps", 3, "--shuffle",
            "--out", tmp_path / "c")  # fmt: skip
    assert r.exit_code == 0, r.output
    config = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert config["steps"] == 3 and config["shuffle"] is True  # from the command line
    assert config["lr"] == 1e-3 and config["seed"] == 3  # from the file
    assert len(losses(tmp_path / "c")) == 3


@pytest.mark.slow
def test_apr_train_reads_its_own_config_yaml(tmp_path, dataset):
    r = apr("train", *FAST[:2], "--device", "cpu", "--model", "tiny-student", "--dataset",
            dataset, "--steps", 3, "--out", tmp_path / "t")  # fmt: skip
    assert r.exit_code == 0, r.output
    config = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert config["teacher"] is None and config["student"] == "tiny-student"
    again = apr("train", "--config", tmp_path / "t" / "config.yaml", "--out", tmp_path / "t2")
    assert again.exit_code == 0, again.output
    assert losses(tmp_path / "t2") == losses(tmp_path / "t")


@pytest.mark.parametrize(
    ("command", "text", "needle"),
    [
        ("distill", "steps: 4\nlearning-rate: 0.1\n", "unknown option 'learning-rate'"),
        ("distill", "batch-size: sixteen\n", "batch-size: expected an integer, got 'sixteen'"),
        ("distill", "seq-len: 0\n", "--seq-len must be > 0, got 0"),
        ("distill", "loss: kl\n", "--loss must be one of"),
        ("distill", "student: null\n", "student: expected a string, got None"),
        ("distill", "report-to: mlflow\n", "--report-to: unknown sink 'mlflow'"),
        ("train", "temperature: 2.0\n", "temperature: not an option of apr train"),
        ("distill", "min-lr-ratio: 0.5\n", "min-lr-ratio: not an option of apr distill"),
        ("train", "steps: [1, 2]\n", "steps: expected an integer, got [1, 2]"),
    ],
)
def test_bad_config_files_are_one_line_naming_file_and_key(tmp_path, command, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = apr(command, "--config", path, *FAST[:2], "--out", tmp_path / "run")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
