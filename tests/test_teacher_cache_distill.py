"""Distilling from a teacher cache: the same run as online (exact kind), and what it refuses."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.data.shards import ShardBatchSource, write_shard
from apr_cli.distill.backend import select_backend
from apr_cli.distill.losses import distill_loss
from apr_cli.distill.pipeline import Pipeline, TrainConfig
from apr_cli.distill.rundir import RunDirectory
from apr_cli.distill.topk_loss import topk_distill_loss
from apr_cli.model.checkpoint import load_model, save_model
from apr_cli.model.config import PRESETS
from apr_cli.model.qwen2 import build_model
from apr_cli.teacher_cache.reader import TeacherCache

SEQ_LEN = 16


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved tiny teacher, a dataset of 124 windows at SEQ_LEN, and caches of every kind."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    write_shard(root / "data" / "a.bin", rng.integers(0, 512, 2000))
    save_model(build_model(PRESETS["tiny-teacher"], seed=1), root / "teacher")
    for name, extra in {
        "f32": ["--cache-dtype", "float32"],
        "bf16": [],
        "topk": ["--kind", "topk", "--temperature", "2"],
    }.items():
        args = ["teacher-cache", "build", "--teacher", str(root / "teacher"), "--dataset",
                str(root / "data"), "--seq-len", str(SEQ_LEN), "--out", str(root / name),
                "--device", "cpu", "--shard-windows", "40", *extra]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    return root


def train(inputs, cache=None, steps=6, **config):
    """Losses per step and final student weights of a seeded pipeline run (shuffled windows)."""
    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=SEQ_LEN, grad_accum=2, lr=3e-3, **config)
    torch.manual_seed(0)
    student = build_model(PRESETS["tiny-student"], seed=0)
    teacher = None if cache else load_model(str(inputs / "teacher"))[0]
    source = ShardBatchSource(inputs / "data", shuffle=True, seed=5)
    teacher_cache = TeacherCache(inputs / cache) if cache else None
    pipeline = Pipeline(
        student, teacher, cfg, source, select_backend("cpu"), teacher_cache=teacher_cache
    )
    pipeline.train()
    return pipeline.losses, pipeline.student_state()


@pytest.fixture(scope="module")
def online(inputs):
    return train(inputs)


def test_float32_hidden_cache_gives_the_online_run(inputs, online):
    losses, weights = train(inputs, "f32")
    want_losses, want_weights = online
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6, atol=0)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, want_weights[name], rtol=1e-5, atol=1e-5)


def test_bf16_hidden_cache_stays_close_to_the_online_run(inputs, online):
    losses, _ = train(inputs, "bf16")
    np.testing.assert_allclose(losses, online[0], rtol=1e-2)
    assert losses != online[0]  # bf16 storage rounds: close, not equal


def test_topk_cache_trains_the_student(inputs):
    losses, _ = train(inputs, "topk", steps=20, temperature=2.0)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.97 * np.mean(losses[:5])


def test_topk_kd_is_a_lower_bound_of_the_full_kd(inputs):
    """Merging tokens into one bin can only lower a KL; CE is unchanged."""
    teacher = load_model(str(inputs / "teacher"))[0]
    student = build_model(PRESETS["tiny-student"], seed=0)
    source = ShardBatchSource(inputs / "data")
    windows = source.batch_windows(4, SEQ_LEN)
    inputs_, labels = source.next_batch(4, SEQ_LEN)
    options = {"temperature": 2.0, "alpha": 0.5}
    with torch.no_grad():
        hidden = student.hidden_states(inputs_)
        full = distill_loss(
            hidden, student.output_weight, teacher.hidden_states(inputs_), teacher.output_weight,
            labels, **options,
        )  # fmt: skip
        top = topk_distill_loss(
            hidden, student.output_weight, TeacherCache(inputs / "topk").read(windows), labels,
            **options,
        )  # fmt: skip
    torch.testing.assert_close(top.ce, full.ce)
    assert 0 < top.kd <= full.kd


# ---- apr distill --teacher-cache ----


def distill(inputs, tmp_path, cache, *extra):
    args = ["distill", "--teacher-cache", str(inputs / cache), "--dataset", str(inputs / "data"),
            "--seq-len", str(SEQ_LEN), "--batch-size", "4", "--steps", "3", "--device", "cpu",
            "--out", str(tmp_path / "run"), *map(str, extra)]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_distill_from_a_cache_records_it_in_the_manifest(inputs, tmp_path):
    result = distill(inputs, tmp_path, "topk", "--temperature", "2", "--shuffle")
    assert result.exit_code == 0, result.output
    assert "Distillation complete" in result.output
    steps = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and all(" kd=" in line and " ce=" in line for line in steps)
    history = RunDirectory(tmp_path / "run").loss_history(with_teacher=True)
    assert history.kd is not None and len(history.kd) == 3  # loss.png draws the KD curve
    manifest = json.loads((tmp_path / "run" / "dispatch.json").read_text())
    teacher = manifest["teacher"]
    assert teacher["kind"] == "teacher-cache (topk)" and "files" in teacher["fingerprint"]
    assert teacher["cache"]["dataset"]["fingerprint"]["files"] == [["a.bin", 8000]]
    assert (tmp_path / "run" / "student-trained.apr" / "model.safetensors").is_file()
    resumed = CliRunner().invoke(
        app, ["distill", "--resume", str(tmp_path / "run"), "--steps", "5"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert "step 5/5" in resumed.output


def test_plan_with_a_cache_counts_its_output_weight(inputs, tmp_path):
    result = distill(inputs, tmp_path, "f32", "--plan", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["memory_estimate_bytes"]["teacher_weights"] == 512 * 256 * 4
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def other_inputs(inputs, tmp_path_factory):
    """Another dataset, a cache of 20 windows only, and a student whose vocab cannot align."""
    root = tmp_path_factory.mktemp("other")
    (root / "data").mkdir()
    write_shard(root / "data" / "a.bin", np.arange(2000) % 512)
    save_model(build_model(PRESETS["tiny-student"].with_(vocab_size=2048), seed=0), root / "wide")
    args = ["teacher-cache", "build", "--teacher", str(inputs / "teacher"), "--dataset",
            str(inputs / "data"), "--seq-len", str(SEQ_LEN), "--out", str(root / "part"),
            "--device", "cpu", "--windows", "0:20"]  # fmt: skip
    assert CliRunner().invoke(app, args).exit_code == 0
    return root


@pytest.mark.parametrize(
    ("cache", "extra", "needle"),
    [
        ("f32", ["--dataset", "{other}/data"], "was built for another dataset"),
        ("f32", ["--seq-len", "8"], "--seq-len 8: --teacher-cache"),
        ("f32", ["--student", "{other}/wide"], "cannot be aligned"),
        ("topk", ["--temperature", "3"], "holds log-probs at temperature 2.0"),
        ("{other}/part", ["--steps", "6"], "covers windows 0..19 of the dataset at seq_len 16; "
                                          "this run reads windows 0..23"),
        ("f32", ["--teacher", "tiny-teacher"], "--teacher and --teacher-cache: pass one"),
        ("f32", ["--teacher-warmup", "3"], "--teacher-warmup needs a teacher model"),
    ],
)  # fmt: skip
def test_distill_refuses_a_cache_that_does_not_fit(
    inputs, other_inputs, tmp_path, cache, extra, needle
):
    extra = [x.replace("{other}", str(other_inputs)) for x in extra]
    cache = cache.replace("{other}", str(other_inputs))
    args = ["distill", "--teacher-cache", str(inputs / cache) if "/" not in cache else cache,
            "--dataset", str(inputs / "data"), "--seq-len", str(SEQ_LEN), "--batch-size", "4",
            "--steps", "3", "--device", "cpu", "--out", str(tmp_path / "run"), *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_distill_refuses_a_damaged_cache(inputs, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(inputs / "bf16", damaged)
    shard = damaged / "shards" / "000002.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    result = distill(inputs, tmp_path, damaged)
    assert result.exit_code == 2
    assert "shard 2 000002.bin has 100 bytes" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_ranks_distill_from_a_cache_like_one(inputs, tmp_path):
    """DDP over 2 processes reads each rank's rows from the cache: the same run as 1 process."""
    args = ["-m", "apr_cli", "distill", "--teacher-cache", str(inputs / "f32"), "--dataset",
            str(inputs / "data"), "--seq-len", str(SEQ_LEN), "--batch-size", "8", "--steps", "4",
            "--device", "cpu", "--shuffle"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for nproc in (1, 2):
        launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc-per-node={nproc}"]  # fmt: skip
        out = tmp_path / f"run{nproc}"
        command = [sys.executable, *launcher, *args, "--out", str(out)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        metrics = (out / "metrics.jsonl").read_text().splitlines()
        runs[nproc] = [json.loads(line)["loss"] for line in metrics]
    assert runs[2] == pytest.approx(runs[1], rel=1e-5)
