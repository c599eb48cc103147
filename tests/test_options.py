"""Run options as typed objects: what a resume may change, and the commands' defaults."""

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.distill.options import RESUMABLE_CHANGES, DistillOptions, resumed_options
from apr_cli.distill.pipeline import TrainConfig
from apr_cli.errors import AprError

RUN = Path("runs/x")


def test_resumable_changes_name_option_fields():
    names = {f.name for f in fields(DistillOptions)} | {f.name for f in fields(TrainConfig)}
    assert names >= RESUMABLE_CHANGES


def test_resume_keeps_settings_left_at_their_defaults():
    saved = DistillOptions(teacher_warmup=5, train=TrainConfig(seq_len=16, batch_size=4))
    assert resumed_options(saved, DistillOptions(), DistillOptions(), RUN) == saved


def test_resume_applies_resumable_changes():
    saved = DistillOptions(train=TrainConfig(seq_len=16, steps=12))
    requested = DistillOptions(save_every=3, train=TrainConfig(steps=24))
    resumed = resumed_options(saved, requested, DistillOptions(), RUN)
    assert resumed == replace(saved, save_every=3, train=replace(saved.train, steps=24))


@pytest.mark.parametrize(
    "requested,flag",
    [
        (DistillOptions(teacher="tiny-student"), "--teacher 'tiny-student'"),
        (DistillOptions(train=TrainConfig(lr=1e-4)), "--lr 0.0001"),
        (DistillOptions(dataset=Path("data")), "--dataset 'data'"),
    ],
)
def test_resume_refuses_changes_to_the_result(requested, flag):
    with pytest.raises(AprError, match="would change the result") as e:
        resumed_options(DistillOptions(), requested, DistillOptions(), RUN)
    assert str(e.value).startswith(f"--resume {RUN}: {flag} (the run used ")


@pytest.mark.parametrize(
    "command,expected",
    [
        (["distill", "--teacher-warmup", "0"], DistillOptions(teacher_warmup=0)),
        (["train"], DistillOptions(teacher=None)),
    ],
)
def test_command_defaults_are_the_options_defaults(tmp_path, command, expected):
    """What resume treats as 'not asked for' is what the command builds with no flags."""
    r = CliRunner().invoke(app, [*command, "--steps", "1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "run" / "dispatch.json").read_text())
    saved = DistillOptions.from_dict(manifest["options"])
    # The loss vocabulary is resolved (here every row of the tiny presets) and recorded.
    assert saved.train.vocab_size == 512
    assert saved == replace(expected, train=replace(expected.train, steps=1, vocab_size=512))
