"""Plans and shape checks cost no weights; models get weights only to train."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from apr_cli.distill.options import DistillOptions
from apr_cli.distill.pipeline import TrainConfig
from apr_cli.distill.prepare import estimate_memory, plan, prepare
from apr_cli.distill.run import start
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

MiB = 2**20


# Runs `apr` in a fresh interpreter and reports that interpreter's own peak resident memory.
# VmHWM belongs to the exec'd process alone; wait4's ru_maxrss would also count the pytest
# process it was forked from (Linux carries the old peak across exec).
PEAK_OF_APR = """
import atexit, sys
from apr_cli.cli import main

def report_peak():
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    sys.stderr.write(f"peak-kib {kib}\\n")

atexit.register(report_peak)
sys.argv = ["apr", *sys.argv[1:]]
main()
"""


def test_plan_of_the_7b_preset_builds_no_weights():
    """7.6B parameters would be 15 GB in bf16 and 30 GB in fp32; a plan must not build them."""
    models = ["--teacher", "qwen2.5-coder-7b", "--student", "qwen2.5-coder-0.5b"]
    args = ["distill", *models, "--device", "cpu", "--plan", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_OF_APR, *args], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    peak_mib = int(proc.stderr.rsplit("peak-kib ", 1)[1].split()[0]) / 1024
    info = json.loads(proc.stdout)
    assert info["teacher"]["parameters"] == 7_615_616_512  # Qwen2.5-Coder-7B's published count
    assert info["student"]["parameters"] == 494_032_768
    assert info["shared_vocab_size"] == 151936
    # Importing torch alone takes ~275 MiB; the weights would take 15 GB.
    assert peak_mib < 500, f"--plan peaked at {peak_mib:.0f} MiB ({elapsed:.1f} s)"
    print(f"7B plan: {peak_mib:.0f} MiB peak RSS, {elapsed:.1f} s wall (shared machine)")


# torch.distributed's FSDP, checkpoint and tensor packages take seconds to import (so does
# torch._dynamo, which imports them); a plan or a single-process run must not pay for them.
PLAN_THEN_LIST_IMPORTS = """
import sys
from apr_cli.cli import main

try:
    main(["distill", "--plan"])
except SystemExit as e:
    assert e.code == 0, e.code
heavy = ("torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.distributed.tensor")
print("loaded:", ",".join(sorted(name for name in sys.modules if name.startswith(heavy))))
"""


def test_a_plan_imports_no_fsdp_or_distributed_checkpoint():
    proc = subprocess.run(
        [sys.executable, "-c", PLAN_THEN_LIST_IMPORTS], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "memory estimate" in proc.stdout  # the plan was rendered
    assert proc.stdout.splitlines()[-1] == "loaded: "


def test_prepare_reads_checkpoint_headers_only(tmp_path):
    cfg = ModelConfig.from_name("tiny-student")
    save_model(build_model(cfg, seed=3), tmp_path / "student")
    p = prepare(DistillOptions(student=str(tmp_path / "student")), plan_only=True)
    for model in (p.teacher, p.student):
        assert all(t.is_meta for t in model.parameters())
    assert p.student_info["parameters"] == sum(t.numel() for t in p.student.parameters())
    assert p.student_info["dtype"] == "float32"


def test_teacher_layers_are_copied_from_the_warmed_up_teacher(tmp_path):
    options = DistillOptions(
        student_init="teacher-layers:0,2",
        teacher_warmup=3,
        train=TrainConfig(steps=1, batch_size=4, seq_len=16),
    )
    p = prepare(options)
    start(p, tmp_path / "run", emit=lambda line: None)
    teacher, student = p.teacher.state_dict(), p.student.state_dict()
    cut = {"model.layers.0.": "model.layers.0.", "model.layers.1.": "model.layers.2."}
    for name, tensor in student.items():
        source = name
        for s, t in cut.items():
            if name.startswith(s):
                source = t + name.removeprefix(s)
        torch.testing.assert_close(tensor, teacher[source].float(), rtol=0, atol=0, msg=name)
    # The warm-up moved the teacher away from its seeded init, so the copy above is the warmed one.
    fresh = build_model(ModelConfig.from_name("tiny-teacher"), seed=options.train.seed + 1)
    assert not torch.equal(fresh.state_dict()["model.norm.weight"], teacher["model.norm.weight"])


def test_activation_checkpointing_lowers_the_planned_activations():
    def activations(**train):
        options = DistillOptions(train=TrainConfig(batch_size=4, seq_len=16, **train))
        return estimate_memory(prepare(options, plan_only=True))["activations"]

    # tiny-student: 2 layers, so 2 x 16 saved tensors per token become 2 + 16.
    assert activations(activation_checkpointing=True) * 32 == activations() * 18


def test_the_loss_covers_the_datasets_real_vocabulary(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    np.arange(2000, dtype=np.uint32).__mod__(500).tofile(data / "a.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": 500}))
    options = DistillOptions(dataset=data, train=TrainConfig(batch_size=4, seq_len=16))
    info = plan(prepare(options, plan_only=True))
    assert (info["shared_vocab_size"], info["loss_vocab_size"]) == (512, 500)
    assert info["hyperparameters"]["vocab_size"] == 500  # the manifest records the size used
    override = DistillOptions(dataset=data, train=TrainConfig(seq_len=16, vocab_size=510))
    assert plan(prepare(override, plan_only=True))["loss_vocab_size"] == 510
    with pytest.raises(AprError, match="--vocab-size 600 exceeds the 512 rows"):
        prepare(DistillOptions(train=TrainConfig(vocab_size=600)), plan_only=True)
