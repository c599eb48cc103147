"""On-policy steps under torchrun on CPU (gloo, 2 processes): each rank samples its share of the
rows, DDP and FSDP2 alike, and a killed two-rank run resumes bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from apr_cli.data.shards import write_shard

pytestmark = pytest.mark.slow
STEPS = 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_shard(data / "a.bin", np.random.default_rng(0).integers(0, 512, 4000))
    return ["--steps", STEPS, "--seq-len", 16, "--batch-size", 8, "--teacher-warmup", 3,
            "--device", "cpu", "--save-every", 2, "--dataset", data, "--on-policy", 0.5,
            "--max-new-tokens", 5]  # fmt: skip


def command(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "apr_cli", "distill", *map(str, args)]  # fmt: skip


def run(*args):
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=600, env=ENV)


def metrics(run_dir):
    drop = ("tokens_per_s", "sec_per_step", "sample_s")  # wall-clock figures
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


def weights(run_dir):
    return load_file(run_dir / "student-trained.apr" / "model.safetensors")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, args):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = run(*args, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("parallel", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_sample_their_rows(tmp_path, ddp, args, parallel):
    out = ddp
    if parallel:
        out = tmp_path / "run"
        proc = run(*args, *parallel, "--out", out)
        assert proc.returncode == 0, proc.stderr
    rows = metrics(out)
    assert {m["kind"] for m in rows} == {"on-policy", "off-policy"}
    # Every row of the global batch of 8 (4 a rank) got 5 sampled tokens.
    assert all(m["generated"] == 5.0 for m in rows if m["kind"] == "on-policy")
    if parallel:  # the same steps sample; both layouts train alike
        assert [m["kind"] for m in rows] == [m["kind"] for m in metrics(ddp)]
        for a, b in zip(rows, metrics(ddp)):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_two_rank_on_policy_run_killed_and_resumed_matches(tmp_path, ddp, args):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(*args, "--out", out), stdout=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith(f"step {STEPS // 2 + 1}/"):
            break
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
    proc.wait()
    resumed = run("--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(out) == metrics(ddp)
    a, b = weights(out), weights(ddp)
    assert all(torch.equal(a[k], b[k]) for k in b)
