"""`apr distill` end to end: the real command, its run directory, plan, JSON and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.distill.options import DistillOptions
from apr_cli.distill.pipeline import TrainConfig
from apr_cli.distill.prepare import prepare
from apr_cli.distill.run import start, train_run
from apr_cli.model.checkpoint import load_model, save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

FAST = ["--seq-len", "16", "--batch-size", "4", "--teacher-warmup", "5"]
runner = CliRunner()


def apr(*args):
    return runner.invoke(app, [str(a) for a in args])


def step_lines(text):
    return [line for line in text.splitlines() if line.startswith("step ")]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`apr distill --steps 100` exactly as a user types it, in a fresh directory."""
    cwd = tmp_path_factory.mktemp("default")
    proc = subprocess.run(
        [sys.executable, "-m", "apr_cli", "distill", "--steps", "100"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, cwd


@pytest.mark.slow
def test_default_run_trains_exactly_100_steps_and_loss_halves(default_run):
    proc, cwd = default_run
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "dataset: (synthetic)"
    assert len(step_lines(proc.stdout)) == 100
    assert step_lines(proc.stdout)[-1].startswith("step 100/100 loss=")
    assert lines[-2].startswith("Distillation complete: initial_loss=")
    assert lines[-1].startswith("Output: runs/distill-")
    run = cwd / lines[-1].removeprefix("Output: ")
    manifest = json.loads((run / "dispatch.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["steps"] == 100
    assert manifest["final_loss"] < 0.5 * manifest["initial_loss"]
    assert manifest["data"]["kind"] == "synthetic"
    for name in ("launch-victory.txt", "metrics.jsonl", "loss.png"):
        assert (run / name).stat().st_size > 0
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 101))
    assert set(metrics[0]) >= {"loss", "kd_loss", "ce_loss", "lr", "grad_norm", "tokens_per_s"}
    log = (run / "launch-victory.txt").read_text()
    assert len(step_lines(log)) == 100 and "Distillation complete: initial_loss=" in log


@pytest.mark.slow
def test_default_run_saves_a_trained_student_that_reloads(default_run):
    _, cwd = default_run
    run = next((cwd / "runs").iterdir())
    trained, info = load_model(str(run / "student-trained.apr"))
    manifest = json.loads((run / "dispatch.json").read_text())
    initial = build_model(
        ModelConfig.from_name("tiny-student"), seed=manifest["hyperparameters"]["seed"]
    )
    assert info["parameters"] == manifest["student"]["parameters"]
    changed = [
        name
        for name, t in trained.state_dict().items()
        if not torch.equal(t, initial.state_dict()[name])
    ]
    assert len(changed) == len(initial.state_dict())


def test_saved_student_gives_the_in_memory_logits(tmp_path):
    options = DistillOptions(teacher_warmup=5, train=TrainConfig(steps=5, batch_size=4, seq_len=16))
    prepared = prepare(options)
    run, manifest = start(prepared, tmp_path / "run", emit=lambda line: None)
    train_run(prepared, run, manifest, emit=lambda line: None)
    reloaded, _ = load_model(str(tmp_path / "run" / "student-trained.apr"))
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), prepared.student.eval()(ids), rtol=0, atol=0)


def test_a_step_row_holds_only_what_the_run_measured(tmp_path):
    """A run that never samples leaves out the sampling columns (no `"kind": null`)."""
    r = apr("distill", "--steps", 2, "--out", tmp_path / "run", *FAST)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    columns = {"step", "loss", "kd_loss", "ce_loss", "lr", "grad_norm", "tokens_per_s"}
    assert [set(row) for row in rows] == [columns | {"sec_per_step"}] * 2


def test_dataset_run_trains_on_shards(tmp_path):
    data = tmp_path / "shards"
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, 512, size=5000, dtype=np.uint32)
    tokens[:2500].astype("<u4").tofile(data / "a.bin")
    tokens[2500:].astype("<u4").tofile(data / "b.bin")
    r = apr("distill", "--dataset", data, "--steps", 20, "--out", tmp_path / "run", *FAST)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == f"dataset: {data} (real corpus via --dataset)"
    assert len(step_lines(r.stdout)) == 20
    manifest = json.loads((tmp_path / "run" / "dispatch.json").read_text())
    assert manifest["data"]["kind"] == "shards"
    assert manifest["data"]["tokens"] == 5000
    assert Path(manifest["data"]["path"]) == data.resolve()


def test_plan_prints_and_trains_nothing(tmp_path):
    r = apr("distill", "--plan", "--out", tmp_path / "run", *FAST)
    assert r.exit_code == 0, r.output
    for word in ("teacher: tiny-teacher", "student: tiny-student", "tokens/step", "memory"):
        assert word in r.stdout
    assert not (tmp_path / "run").exists()


def test_plan_json_parses(tmp_path):
    r = apr("distill", "--plan", "--json", *FAST)
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["tokens_per_step"] == 4 * 16
    assert plan["teacher"]["parameters"] > plan["student"]["parameters"]
    assert plan["memory_estimate_bytes"]["total"] > 0


def test_json_summary_on_stdout_and_steps_on_stderr(tmp_path):
    r = apr("distill", "--json", "--steps", 3, "--out", tmp_path / "run", *FAST)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert len(step_lines(r.stderr)) == 3


def test_every_option_has_help():
    command = typer.main.get_command(app).commands["distill"]
    for param in command.params:
        assert param.help, f"{param.name} has no help"
    r = runner.invoke(app, ["distill", "--help"])
    assert r.exit_code == 0 and "--teacher" in r.stdout


def test_same_model_warns(tmp_path):
    save_model(build_model(ModelConfig.from_name("tiny-student"), seed=3), tmp_path / "m")
    r = apr(
        "distill",
        "--teacher",
        tmp_path / "m",
        "--student",
        tmp_path / "m",
        "--steps",
        2,
        "--out",
        tmp_path / "run",
        *FAST,
    )
    assert r.exit_code == 0, r.output
    assert "same model" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--steps", "0"], "--steps"),
        (["--alpha", "1.5"], "--alpha"),
        (["--temperature", "0"], "--temperature"),
        (["--lr", "-1"], "--lr"),
        (["--seq-len", "100000"], "--seq-len"),
        (["--loss", "mse"], "--loss"),
        (["--teacher", "/no/such/model"], "/no/such/model"),
        (["--device", "tpu"], "--device"),
        (["--vocab-size", "-1"], "--vocab-size"),
        (["--vocab-size", "100000"], "--vocab-size"),  # more rows than the models share
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, needle):
    r = apr("distill", "--out", tmp_path / "run", *FAST, *args)
    assert r.exit_code != 0
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_completed_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    assert apr("distill", "--steps", 2, "--out", out, *FAST).exit_code == 0
    before = (out / "dispatch.json").read_text()
    r = apr("distill", "--steps", 2, "--out", out, *FAST)
    assert r.exit_code != 0 and "--overwrite" in r.stderr
    assert (out / "dispatch.json").read_text() == before
    assert apr("distill", "--steps", 2, "--out", out, "--overwrite", *FAST).exit_code == 0
