"""Evals during training, end to end: `apr distill --val-dataset --eval-every`, sinks, resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.data.shards import ShardBatchSource, write_shard
from apr_cli.distill.backend import select_backend
from apr_cli.distill.evaluate import evaluate, score_windows, window_indices
from apr_cli.distill.plot import loss_figure
from apr_cli.distill.rundir import RunDirectory
from apr_cli.model.checkpoint import load_model
from tests.test_sinks import tensorboard_scalars, wandb_records

STEPS = 20
FAST = ["--seq-len", "16", "--batch-size", "4", "--teacher-warmup", "5", "--device", "cpu",
        "--dtype", "fp32", "--steps", str(STEPS)]  # fmt: skip
EVALS = ["--eval-every", "5", "--eval-windows", "8"]


def apr(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Train and val shards of ids below the tiny presets' vocabulary."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, n in (("train", 4000), ("val", 801)):
        (root / name).mkdir()
        write_shard(root / name / "a.bin", rng.integers(0, 512, n))
    return root


def rows(run_dir, kind=None):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def weights(run_dir, name="student-trained.apr"):
    return load_file(run_dir / name / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The same run with and without evals (and with --keep-best and TensorBoard)."""
    root = tmp_path_factory.mktemp("runs")
    plain = apr("distill", "--dataset", data / "train", *FAST, "--out", root / "plain")
    assert plain.exit_code == 0, plain.output
    watched = apr("distill", "--dataset", data / "train", *FAST, "--out", root / "watched",
                  "--val-dataset", data / "val", *EVALS, "--keep-best",
                  "--report-to", "tensorboard")  # fmt: skip
    assert watched.exit_code == 0, watched.output
    return root / "plain", root / "watched", watched.stdout


@pytest.mark.slow
def test_evals_at_every_n_steps_leave_training_bitwise_unchanged(runs):
    plain, watched, _ = runs
    assert [r["step"] for r in rows(watched, "eval")] == [5, 10, 15, 20]
    losses = [r["loss"] for r in rows(plain)], [r["loss"] for r in rows(watched)]
    assert losses[0] == losses[1]
    assert_same_weights(weights(plain), weights(watched))


@pytest.mark.slow
def test_eval_rows_log_lines_and_manifest_agree(runs, data):
    _, watched, stdout = runs
    evals = rows(watched, "eval")
    for row in evals:
        assert 0.0 <= row["top1_agreement"] <= 1.0 and row["kl_to_teacher"] > 0
    log = (watched / "launch-victory.txt").read_text().splitlines()
    eval_lines = [line for line in log if line.startswith("eval ")]
    assert [line.split()[1] for line in eval_lines] == ["5/20", "10/20", "15/20", "20/20"]
    assert f"val_loss={evals[1]['val_loss']:.4f}" in eval_lines[1]
    assert "teacher val_loss=" in eval_lines[0] and "teacher val_loss" not in eval_lines[1]
    assert eval_lines[2] in stdout
    # The step line comes first, then its eval.
    assert log.index(eval_lines[0]) == next(i for i, x in enumerate(log) if "step  5/20" in x) + 1
    validation = json.loads((watched / "dispatch.json").read_text())["validation"]
    best = min(evals, key=lambda r: r["val_loss"])
    assert validation["best_val_loss"] == best["val_loss"]
    assert validation["best_step"] == best["step"]
    assert validation["final_val_loss"] == evals[-1]["val_loss"]
    assert validation["evals"] == 4 and validation["windows"] == 8
    assert validation["teacher_val_loss"] > 0


@pytest.mark.slow
def test_the_plot_shows_the_evals_as_points(runs):
    _, watched, _ = runs
    history = RunDirectory(watched).loss_history(with_teacher=True)
    assert history.steps == list(range(1, STEPS + 1))  # eval rows are not steps
    assert history.validation == [(r["step"], r["val_loss"]) for r in rows(watched, "eval")]
    (line,) = [x for x in loss_figure(history).axes[0].lines if x.get_label() == "validation"]
    assert list(line.get_xdata()) == [5, 10, 15, 20] and line.get_marker() == "o"
    assert (watched / "loss.png").stat().st_size > 0


@pytest.mark.slow
def test_last_eval_is_what_apr_eval_computes_and_best_student_is_kept(runs, data):
    _, watched, _ = runs
    evals = rows(watched, "eval")
    fp32 = select_backend("cpu", "fp32")  # as the runs (FAST): the same arithmetic
    trained, _ = load_model(str(watched / "student-trained.apr"))
    report = evaluate(trained, ShardBatchSource(data / "val"), seq_len=16, windows=8, backend=fp32)
    assert report.loss == pytest.approx(evals[-1]["val_loss"], rel=1e-6)
    # student-best.apr holds the student of the best eval: scoring it gives the best val loss.
    best, _ = load_model(str(watched / "student-best.apr"))
    source = ShardBatchSource(data / "val")
    scores = score_windows(best, source, window_indices(50, 8), seq_len=16, batch_size=4,
                           backend=fp32)  # fmt: skip
    assert scores.loss == pytest.approx(min(r["val_loss"] for r in evals), rel=1e-6)


@pytest.mark.slow
def test_tensorboard_holds_train_and_val_scalars_at_their_steps(runs):
    _, watched, _ = runs
    scalars = tensorboard_scalars(watched)
    for name in ("train/loss", "train/kd", "train/ce", "train/lr", "train/grad_norm"):
        assert [s for s, _ in scalars[name]] == list(range(1, STEPS + 1)), name
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [r["loss"] for r in rows(watched)]
    )
    evals = rows(watched, "eval")
    for name, key in (("val/loss", "val_loss"), ("val/top1_agreement", "top1_agreement")):
        assert scalars[name] == [(r["step"], pytest.approx(r[key])) for r in evals]


def test_eval_flags_are_checked_before_anything_runs(tmp_path, data):
    for args, needle in (
        (["--eval-every", "5"], "--eval-every needs --val-dataset"),
        (["--keep-best"], "--keep-best needs --val-dataset"),
        (["--val-dataset", data / "val", "--eval-every", "-1"], "--eval-every must be >= 0"),
        (["--report-to", "tensorbored"], "--report-to: unknown sink 'tensorbored'"),
    ):
        r = apr("distill", *FAST, *args, "--out", tmp_path / "run")
        assert r.exit_code != 0 and needle in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_kill_and_resume_with_evals_and_tensorboard_repeats_no_step(data, tmp_path):
    """SIGKILL after step 13 (checkpoint at 10), then --resume: every step and eval once."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "apr_cli", "distill", "--dataset", data / "train", *FAST,
            "--val-dataset", data / "val", *EVALS, "--save-every", "10",
            "--report-to", "tensorboard", "--out", out]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step 13/"):
            break
    proc.kill()
    proc.wait()
    assert 12 <= len(rows(out)) < STEPS  # the killed run got past its checkpoint at 10
    r = apr("distill", "--resume", out)
    assert r.exit_code == 0, r.output
    assert [x["step"] for x in rows(out)] == list(range(1, STEPS + 1))
    assert [x["step"] for x in rows(out, "eval")] == [5, 10, 15, 20]
    log = (out / "launch-victory.txt").read_text().splitlines()
    assert [x.split()[1] for x in log if x.startswith("eval ")] == [
        "5/20",
        "10/20",
        "15/20",
        "20/20",
    ]
    assert json.loads((out / "dispatch.json").read_text())["validation"]["evals"] == 4
    scalars = tensorboard_scalars(out)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in scalars["val/loss"]] == [5, 10, 15, 20]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([x["loss"] for x in rows(out)])


@pytest.mark.slow
def test_wandb_offline_run_holds_the_options_and_the_same_scalars(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    r = apr("distill", "--dataset", data / "train", *FAST[:-1], 6, "--val-dataset", data / "val",
            "--eval-every", 3, "--eval-windows", 4, "--report-to", "wandb,jsonl",
            "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    records = wandb_records(out)
    (run,) = [x.run for x in records if x.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["steps"] == 6 and config["val-dataset"] == str(data / "val")
    assert config["report-to"] == "wandb,jsonl" and config["lr"] == 3e-3
    history = {}
    for x in records:
        if x.WhichOneof("record_type") == "history":
            items = {
                (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in x.history.item
            }
            history[items["_step"]] = items
    assert sorted(history) == list(range(1, 7))
    assert [history[s]["train/loss"] for s in range(1, 7)] == [x["loss"] for x in rows(out)]
    evals = rows(out, "eval")
    assert [(s, h["val/loss"]) for s, h in history.items() if "val/loss" in h] == [
        (x["step"], x["val_loss"]) for x in evals
    ]
    assert history[6]["val/kl_to_teacher"] == evals[-1]["kl_to_teacher"]
