"""Long runs survive: a real `apr distill` process killed or interrupted, then resumed."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.distill.checkpoints import list_checkpoints

pytestmark = pytest.mark.slow  # every test here runs real processes end to end

STEPS = 24
ARGS = ["--steps", str(STEPS), "--save-every", "4", "--seq-len", "16", "--batch-size", "4",
        "--teacher-warmup", "5", "--device", "cpu"]  # fmt: skip
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def apr_process(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "apr_cli", "distill", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def run_to_end(*args):
    proc = apr_process(*args)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def stop_after_step(proc, step):
    """Read step lines until `step` has been printed; the process keeps running meanwhile."""
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            return
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()}")


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return load_file(run / "student-trained.apr" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    code, out, err = run_to_end(*ARGS, "--out", run)
    assert code == 0, err
    return run


def assert_same_run(run, reference):
    assert losses(run) == losses(reference)  # exact, step by step
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = (run / "launch-victory.txt").read_text()
    assert sum(line.startswith("step ") for line in log.splitlines()) == STEPS
    manifest = json.loads((run / "dispatch.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps"] == STEPS
    assert manifest["resumed"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    run = tmp_path / "run"
    proc = apr_process(*ARGS, "--out", run)
    stop_after_step(proc, random.Random().randint(6, STEPS - 3))
    proc.kill()
    proc.wait()
    assert json.loads((run / "dispatch.json").read_text())["status"] == "running"
    code, out, err = run_to_end("--resume", run)
    assert code == 0, err
    assert out.splitlines()[0] == "dataset: (synthetic)"
    assert_same_run(run, reference)


def test_sigint_checkpoints_exits_130_and_resumes(tmp_path, reference):
    run = tmp_path / "run"
    proc = apr_process(*ARGS, "--out", run)
    stop_after_step(proc, 7)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    manifest = json.loads((run / "dispatch.json").read_text())
    assert manifest["status"] == "interrupted"
    stopped_at = manifest["steps_completed"]
    assert list_checkpoints(run)[-1].name == f"step-{stopped_at:08d}.pt"
    code, _, err = run_to_end("--resume", run)
    assert code == 0, err
    assert_same_run(run, reference)


def test_sigterm_exits_143(tmp_path):
    run = tmp_path / "run"
    proc = apr_process(*ARGS, "--out", run)
    stop_after_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert json.loads((run / "dispatch.json").read_text())["status"] == "interrupted"


def test_steps_can_grow_on_resume(tmp_path, reference):
    run = tmp_path / "run"
    code, _, err = run_to_end(*ARGS[:1], "12", *ARGS[2:], "--out", run)
    assert code == 0, err
    code, _, err = run_to_end("--resume", run, "--steps", STEPS)
    assert code == 0, err
    # The cosine schedule follows the new total, so the losses differ from the reference run's.
    assert len(losses(run)) == STEPS
    assert json.loads((run / "dispatch.json").read_text())["steps"] == STEPS


@pytest.mark.parametrize(
    "flag,value",
    [("--seq-len", "32"), ("--batch-size", "8"), ("--teacher", "tiny-student"), ("--lr", "1e-4")],
)
def test_resume_refuses_settings_that_change_the_result(reference, flag, value):
    r = CliRunner().invoke(app, ["distill", "--resume", str(reference), flag, value])
    assert r.exit_code == 2
    assert flag in r.stderr and "would change the result" in r.stderr


def test_resume_without_checkpoints_is_refused(tmp_path):
    (tmp_path / "dispatch.json").write_text(json.dumps({"status": "failed", "options": {}}))
    r = CliRunner().invoke(app, ["distill", "--resume", str(tmp_path)])
    assert r.exit_code == 2 and "no checkpoint" in r.stderr
