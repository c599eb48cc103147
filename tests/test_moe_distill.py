"""`apr distill` end to end with Qwen3-MoE and Qwen3 teachers and students, across architectures."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import load_model, save_model
from apr_cli.model.mlp import SparseMoE

FAST = ["--seq-len", "16", "--batch-size", "4", "--teacher-warmup", "3"]
runner = CliRunner()


def apr(*args):
    return runner.invoke(app, [str(a) for a in args])


def shards(tmp_path):
    data = tmp_path / "shards"
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, 512, size=4000, dtype=np.uint32)
    tokens.astype("<u4").tofile(data / "a.bin")
    return data


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_plan_names_every_architecture(tmp_path):
    r = apr("distill", "--teacher", "tiny-qwen3-moe", "--student", "tiny-qwen3", "--plan",
            "--json", *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["teacher"]["config"]["architecture"] == "Qwen3MoeForCausalLM"
    assert plan["student"]["config"]["architecture"] == "Qwen3ForCausalLM"
    assert plan["memory_estimate_bytes"]["total"] > 0


def test_plan_of_a_30b_moe_teacher_reads_no_weights(tmp_path):
    """The plan builds the models on the meta device: 30.5B parameters cost no memory."""
    r = apr("distill", "--teacher", "qwen3-30b-a3b", "--student", "qwen3-0.6b", "--plan", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert 30.4e9 < plan["teacher"]["parameters"] < 30.6e9
    assert plan["memory_estimate_bytes"]["teacher_weights"] == plan["teacher"]["parameters"] * 4


def test_meta_load_checks_a_folder_without_reading_weights(tmp_path):
    model, _ = load_model("tiny-qwen3-moe")
    save_model(model, tmp_path / "m")
    meta, info = load_model(str(tmp_path / "m"), device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    (tmp_path / "m" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(AprError, match="not a readable safetensors file"):
        load_model(str(tmp_path / "m"), device="meta")


@pytest.mark.slow
def test_moe_teacher_qwen2_student_on_shards(tmp_path):
    out = tmp_path / "run"
    r = apr("distill", "--teacher", "tiny-qwen3-moe", "--student", "tiny-student", "--dataset",
            shards(tmp_path), "--steps", 6, "--out", out, *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "dispatch.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["teacher"]["config"]["architecture"] == "Qwen3MoeForCausalLM"
    assert manifest["data"]["kind"] == "shards"
    rows = metrics(out)
    assert len(rows) == 6 and "aux_loss" not in rows[0]  # the dense student has no router
    student, _ = load_model(str(out / "student-trained.apr"))
    assert student.config.architecture == "Qwen2ForCausalLM"


@pytest.mark.slow
def test_moe_student_logs_its_aux_loss(tmp_path):
    out = tmp_path / "run"
    r = apr("distill", "--teacher", "tiny-teacher", "--student", "tiny-qwen3-moe", "--steps", 5,
            "--out", out, *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = metrics(out)
    assert len(rows) == 5
    # Two sparse layers of top-2 routing: perfectly balanced routing scores exactly top_k = 2.
    assert all(math.isfinite(row["aux_loss"]) and 1.9 < row["aux_loss"] < 4.0 for row in rows)
    assert all(" aux=" in line for line in r.stdout.splitlines() if line.startswith("step "))
    student, _ = load_model(str(out / "student-trained.apr"))
    assert isinstance(student.model.layers[0].mlp, SparseMoE)


@pytest.mark.slow
def test_student_init_from_moe_teacher(tmp_path):
    out = tmp_path / "run"
    r = apr("distill", "--teacher", "tiny-qwen3-moe", "--student-init", "teacher-layers:0,1",
            "--steps", 3, "--out", out, *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    student, _ = load_model(str(out / "student-trained.apr"))
    assert student.config.mlp_only_layers == (1,)
    assert all("aux_loss" in row for row in metrics(out))


def torchrun(nproc, *args):
    apr_args = ["-m", "apr_cli", "distill", *map(str, args)]
    cmd = [sys.executable, *apr_args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *apr_args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_moe_student_on_two_ranks_matches_one(tmp_path, parallel):
    """Experts idle on a rank (DDP's unused parameters, FSDP2's missing gradients) are fine,
    and the losses follow the one-rank run's."""
    args = ["--teacher", "tiny-teacher", "--student", "tiny-qwen3-moe", "--steps", 4, "--seq-len",
            16, "--batch-size", 8, "--teacher-warmup", 3, "--device", "cpu"]  # fmt: skip
    one = torchrun(1, *args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *args, *parallel, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # Each rank's load-balancing loss is over its own tokens (as in transformers), and a mean of
    # per-rank products is not the product over the whole batch: close, not equal.
    for key, rel in (("kd_loss", 1e-3), ("ce_loss", 1e-3), ("aux_loss", 5e-2)):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=rel), key
    # Which expert a token reaches then differs a little, and AdamW's step is about lr whatever
    # the gradient's size, so weights are not compared; the saved student must still be whole.
    student, _ = load_model(str(tmp_path / "two" / "student-trained.apr"))
    assert all(torch.isfinite(t).all() for t in student.state_dict().values())
