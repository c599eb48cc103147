"""`apr distill` under torchrun on CPU (gloo, 2 processes): DDP and FSDP2 match one process."""

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from apr_cli.distill.backend import Backend
from apr_cli.distill.parallel import mixed_precision
from apr_cli.model.checkpoint import save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

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


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Random tokens: unlike the synthetic source (the same rows every call), each micro-batch
    reads new windows, so accumulation is tested on distinct rows."""
    data = tmp_path_factory.mktemp("shards")
    np.random.default_rng(0).integers(0, 512, 20_000, dtype=np.uint32).tofile(data / "a.bin")
    return data


@pytest.fixture(scope="module")
def single_on_shards(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("single-shards") / "run"
    proc = run(1, *ARGS, "--dataset", shards, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("parallel", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_gradient_accumulation_on_two_ranks_matches_one_rank(
    tmp_path, shards, single_on_shards, parallel
):
    """2 ranks x 2 micro-batches x 2 rows: the same global batch of 8 rows as the reference."""
    out = tmp_path / "run"
    proc = run(2, *ARGS, "--dataset", shards, "--grad-accum", "2", *parallel, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert_matches(out, single_on_shards)


@pytest.mark.parametrize("resume_nproc", [2, 1], ids=["same-world", "fewer-ranks"])
def test_two_rank_run_killed_and_resumed_matches(tmp_path, single, resume_nproc):
    """A checkpoint from 2 ranks resumes on 2, or on 1 (a host with fewer GPUs)."""
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
    resumed = run(resume_nproc, "--resume", out)
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


def test_plan_under_torchrun_shows_the_per_rank_micro_batch():
    proc = run(2, "--plan", "--json", "--batch-size", "8", "--grad-accum", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)  # rank 0's plan alone
    assert plan["backend"]["world_size"] == 2
    assert plan["micro_batch_size"] == 2  # 8 rows / (2 micro-batches x 2 ranks)


def run_script(tmp_path, source, *args):
    """`source` as a script under torchrun, 2 processes."""
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), *map(str, args)], capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip


SHARDED_TEACHER = """
import sys
import torch
from torch.distributed.tensor import DTensor
from apr_cli.distill.options import DistillOptions, TrainConfig
from apr_cli.distill.pipeline import Pipeline
from apr_cli.distill.prepare import prepare
from apr_cli.model.checkpoint import load_model

folder = sys.argv[1]  # a checkpoint whose MLP width (701) does not split evenly over 2 ranks
options = DistillOptions(teacher=folder, fsdp=True, device="cpu", train=TrainConfig(steps=1))
p = prepare(options)  # the teacher: this rank's rows of each block tensor, read from the file
whole, _ = load_model(folder)
ids = torch.arange(32).view(2, 16)
reference = whole.hidden_states(ids).detach()
pipe = Pipeline(p.student, p.teacher, options.train, p.source, p.backend, parallel="fsdp")
for _ in range(2):  # at rest after every forward, not just the first
    torch.testing.assert_close(pipe.teacher_hidden(ids), reference, rtol=1e-5, atol=1e-5)
    for name, t in p.teacher.model.layers.named_parameters():
        assert isinstance(t, DTensor), name
        rows = -(-t.shape[0] // 2)  # torch.chunk's split: rank 0 holds ceil(n/2) rows
        expected = rows if p.backend.rank == 0 else t.shape[0] - rows
        assert t.to_local().shape[0] == expected, (name, t.to_local().shape, t.shape)
assert not isinstance(p.teacher.output_weight, DTensor)  # the loss reads it whole
print("sharded at rest")
"""


def test_fsdp_teacher_stays_sharded_between_forwards(tmp_path):
    config = ModelConfig.from_name("tiny-teacher").with_(intermediate_size=701)
    save_model(build_model(config, seed=5), tmp_path / "teacher")
    proc = run_script(tmp_path, SHARDED_TEACHER, tmp_path / "teacher")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("sharded at rest") == 2


TEACHER_MEMORY = """
import gc
import sys
from pathlib import Path
import torch
import torch._dynamo  # fully_shard imports it on first use: code, not the teacher's memory
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from apr_cli.distill.parallel import load_local_shards, shard_teacher
from apr_cli.model.checkpoint import load_model


def status(key):  # MiB, from this process's /proc/self/status
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


dist.init_process_group("gloo")
teacher, _ = load_model(sys.argv[1], device="meta")
blocks = {name: p.shape for name, p in teacher.model.layers.named_parameters()}
full_mib = sum(shape.numel() * 4 for shape in blocks.values()) / 2**20
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
before = status("VmRSS")
load_local_shards(teacher, Path(sys.argv[1]), torch.device("cpu"))
load_peak = status("VmHWM") - before
forward = shard_teacher(teacher)
ids = torch.arange(64).view(2, 32)
at_rest = status("RssAnon")
with torch.no_grad():
    for _ in range(3):
        forward(ids)
kept = status("RssAnon") - at_rest
local = {n: p.to_local() for n, p in teacher.model.layers.named_parameters()}
local_mib = sum(t.numel() * 4 for t in local.values()) / 2**20
assert abs(local_mib - full_mib / 2) < 0.01 * full_mib, (local_mib, full_mib)
# Loading: the resident set grows by this rank's shards, not by the file's pages it read.
assert load_peak < 1.5 * local_mib, (load_peak, local_mib)
# After forwards, the gathered weights are freed and given back (glibc kept them before).
assert kept < 0.5 * local_mib, (kept, local_mib)
# No whole copy of any block weight is reachable: only this rank's shards hold their bytes
# (the gathered parameters FSDP2 keeps have empty storage between forwards).
shapes = {tuple(shape) for shape in blocks.values()}
whole = {p.untyped_storage().data_ptr() for p in teacher.parameters() if not isinstance(p, DTensor)}
for obj in gc.get_objects():
    if isinstance(obj, torch.Tensor) and not isinstance(obj, DTensor) and not obj.is_meta:
        storage = obj.untyped_storage()
        if tuple(obj.shape) in shapes and storage.data_ptr() not in whole:
            assert storage.nbytes() < obj.numel() * obj.element_size(), obj.shape
print(f"per rank: {local_mib:.0f} of {full_mib:.0f} MiB, load {load_peak:.0f}, kept {kept:.0f}")
dist.destroy_process_group()
"""


def test_fsdp_teacher_memory_per_rank_is_its_shard(tmp_path):
    """Each rank's resident memory holds half of the teacher's blocks: when loading, and after
    forwards (no gathered weights kept by the allocator, no whole copy reachable)."""
    config = ModelConfig.from_name("tiny-teacher").with_(
        hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2,
        num_hidden_layers=8,
    )  # fmt: skip
    save_model(build_model(config, seed=5), tmp_path / "teacher")  # 93 MiB of blocks, fp32
    proc = run_script(tmp_path, TEACHER_MEMORY, tmp_path / "teacher")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("per rank:") == 2, proc.stdout


CONVERTED_SHARDS = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from apr_cli.distill.parallel import load_local_shards
from apr_cli.model.checkpoint import load_model

dist.init_process_group("gloo")
folder = Path(sys.argv[1])  # bf16 weights, read into an fp32 teacher
sharded, _ = load_model(str(folder), dtype=torch.float32, device="meta")
load_local_shards(sharded, folder, torch.device("cpu"))
whole = dict(load_model(str(folder), dtype=torch.float32)[0].named_parameters())
for name, p in sharded.named_parameters():
    got = p.full_tensor() if isinstance(p, DTensor) else p
    assert got.dtype == torch.float32 and torch.equal(got, whole[name]), name
print("converted")
dist.destroy_process_group()  # else gloo's threads can abort the exit (seen once in 5 suites)
"""


def test_fsdp_teacher_shards_convert_the_checkpoint_dtype(tmp_path):
    config = ModelConfig.from_name("tiny-teacher").with_(intermediate_size=701)
    save_model(build_model(config, seed=3).to(torch.bfloat16), tmp_path / "teacher")
    proc = run_script(tmp_path, CONVERTED_SHARDS, tmp_path / "teacher")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("converted") == 2


def test_fsdp_gathers_bf16_weights_and_reduces_fp32_gradients_on_cuda():
    # The policy needs no GPU to check; wrap() hands it to every fully_shard of the student.
    cuda = mixed_precision(Backend(torch.device("cuda", 0), torch.bfloat16))
    assert (cuda.param_dtype, cuda.reduce_dtype) == (torch.bfloat16, torch.float32)
    cpu = mixed_precision(Backend(torch.device("cpu"), None))
    assert (cpu.param_dtype, cpu.reduce_dtype) == (None, None)
