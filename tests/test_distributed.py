"""`apr distill` under torchrun on CPU (gloo, 2 processes): DDP and FSDP2 match one process."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here runs real processes end to end

STEPS = 8
ARGS = ["--steps", str(STEPS), "--seq-len", "16", "--batch-size", "8", "--teacher-warmup", "5",
        "--device", "cpu", "--save-every", "2"]  # fmt: skip
# One thread per process in both cases, so the two layouts do the same arithmetic.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(nproc, *args):
    apr = ["-m", "apr_cli", "distill", *map(str, args)]
    if nproc == 1:
        return [sys.executable, *apr]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *apr]  # fmt: skip


def run(nproc, *args, **kwargs):
    proc = subprocess.run(
        command(nproc, *args), capture_output=True, text=True, timeout=300, env=ENV, **kwargs
    )
    return proc


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    return load_file(run_dir / "student-trained.apr" / "model.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    proc = run(1, *ARGS, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def assert_matches(run_dir, reference):
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5)
    a, b = weights(run_dir), weights(reference)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("parallel", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, single, parallel):
    out = tmp_path / "run"
    proc = run(2, *ARGS, *parallel, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert_matches(out, single)
    manifest = json.loads((out / "dispatch.json").read_text())
    assert manifest["backend"]["world_size"] == 2
    assert manifest["backend"]["process_group"] == "gloo"
    assert manifest["options"]["fsdp"] == bool(parallel)
    # Only rank 0 prints and writes: every step appears once in stdout, the log and metrics.
    assert sum(line.startswith("step ") for line in proc.stdout.splitlines()) == STEPS
    log = (out / "launch-victory.txt").read_text().splitlines()
    assert sum(line.startswith("step ") for line in log) == STEPS
    assert len(losses(out)) == STEPS


def test_two_rank_run_killed_and_resumed_matches(tmp_path, single):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        command(2, *ARGS, "--out", out), stdout=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith(f"step {STEPS // 2 + 1}/"):
            break
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
    proc.wait()
    assert json.loads((out / "dispatch.json").read_text())["status"] == "running"
    resumed = run(2, "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert_matches(out, single)


def test_a_failure_on_rank_0_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    ok = run(2, *ARGS, "--steps", "2", "--out", out)
    assert ok.returncode == 0, ok.stderr

    def small_files():  # rank 0 alone writes, so only rank 0's checkpoint write fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    proc = run(2, "--resume", out, "--steps", "6", preexec_fn=small_files)
    assert proc.returncode != 0
    assert "could not be written" in proc.stderr
    assert json.loads((out / "dispatch.json").read_text())["status"] == "failed"
