"""On-policy runs resume bit for bit: step kinds, prompts and the sampling generator included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from apr_cli.data.shards import ShardBatchSource, write_shard
from apr_cli.distill.on_policy import SampledBatches, WindowPrompts
from apr_cli.distill.options import OnPolicyOptions
from apr_cli.model.config import PRESETS
from apr_cli.model.qwen2 import build_model

STEPS = 12
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_shard(d / "a.bin", np.random.default_rng(0).integers(0, 512, 4000))
    return d


def sampler(dataset, seed=0):
    source = ShardBatchSource(dataset, shuffle=True, seed=seed + 1)
    options = OnPolicyOptions(on_policy_fraction=0.5, max_new_tokens=5)
    return SampledBatches(options, WindowPrompts(source, 16), seed, 0, 1, torch.device("cpu"))


def test_sampler_state_restores_the_next_batches(dataset):
    model = build_model(PRESETS["tiny-student"], seed=0)
    a = sampler(dataset)
    a.next_batch(model, 3, 16)
    state = a.state_dict()
    expected = [a.next_batch(model, 3, 16) for _ in range(2)]
    b = sampler(dataset)
    b.load_state_dict(state)
    got = [b.next_batch(model, 3, 16) for _ in range(2)]
    for (x, y), (x2, y2) in zip(expected, got):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    fresh = sampler(dataset).next_batch(model, 3, 16)  # the state mattered: a new one differs
    assert not torch.equal(fresh[0], expected[0][0])


def apr(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "apr_cli", "distill", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_and_resumed_on_policy_run_equals_an_uninterrupted_one(tmp_path, dataset):
    args = ["--steps", STEPS, "--save-every", 4, "--seq-len", 16, "--batch-size", 4,
            "--teacher-warmup", 5, "--device", "cpu", "--dataset", dataset,
            "--on-policy", 0.5, "--max-new-tokens", 6, "--sample-top-p", 0.9]  # fmt: skip
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = apr(*args, "--out", ref)
    killed = apr(*args, "--out", run)
    for line in killed.stdout:  # kill after step 5, past the step-4 checkpoint
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 5:
            break
    killed.kill()
    killed.wait()
    assert json.loads((run / "dispatch.json").read_text())["status"] == "running"
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    resumed = apr("--resume", run)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a, b = metrics(run), metrics(ref)
    drop = ("tokens_per_s", "sec_per_step", "sample_s")  # wall-clock figures
    assert [{k: v for k, v in m.items() if k not in drop} for m in a] == [
        {k: v for k, v in m.items() if k not in drop} for m in b
    ]
    kinds = [m["kind"] for m in b]
    assert "on-policy" in kinds[8:] and "off-policy" in kinds[8:]  # both kinds after the resume
    w, w_ref = (load_file(r / "student-trained.apr" / "model.safetensors") for r in (run, ref))
    assert w.keys() == w_ref.keys()
    assert all(torch.equal(w[k], w_ref[k]) for k in w)
    resumed_from = json.loads((run / "dispatch.json").read_text())["resumed"][0]["from_step"]
    assert resumed_from in (4, 8)  # 8 when the machine let the run reach the next checkpoint
