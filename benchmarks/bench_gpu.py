"""One table of GPU figures for `benchmarks/gpu.sh`: loss, step, a Qwen-shaped step, generation.

    python benchmarks/bench_gpu.py [--out gpu-results.md] [--peak-tflops N]

Every row is measured on CUDA in bf16, each variant in a fresh process (so memory figures
count only its own allocations):
- loss: chunked vs naive KD loss at Qwen2.5's vocabulary, 8192 tokens (`bench_loss.py`);
- step: our distill step vs the transformers reference loop (`bench_step.py`);
- qwen step: a Qwen2.5-0.5B-shaped student and a 1.5B-shaped teacher (random weights, real
  shapes), batch 8 x 1024 tokens: tokens/s, MFU against the GPU's dense bf16 peak, peak memory;
- generation: a 0.5B-shaped model, greedy, cached vs uncached tokens/s (`bench_generate.py`).
MFU counts 6N (+ attention) per trained token of the student and 2N per token of the teacher's
forward. The peak comes from the GPU's name (H100/H200 989, A100 312, L40S 362, RTX 4090 165
dense bf16 TFLOP/s), or `--peak-tflops`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_generate import timed_generate
from bench_step import flops_per_token
from peak_memory import peak, reset_peak, sync

from apr_cli.data.source import SyntheticBatchSource
from apr_cli.distill.backend import select_backend
from apr_cli.distill.pipeline import Pipeline, TrainConfig
from apr_cli.model.config import PRESETS
from apr_cli.model.qwen2 import build_model

HERE = Path(__file__).parent
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "A100": 312, "L40S": 362, "4090": 165}
QWEN_STEP = TrainConfig(steps=6, batch_size=8, seq_len=1024, warmup=1)


def run_child(*args: str) -> dict:
    """The last line of a benchmark child's stdout, as JSON."""
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def qwen_step() -> dict:
    """A distill step at real Qwen shapes, bf16 on CUDA (run in a fresh process)."""
    backend = select_backend("cuda")
    student = build_model(PRESETS["qwen2.5-coder-0.5b"], seed=0).to(backend.device)
    teacher = build_model(PRESETS["qwen2.5-coder-1.5b"], seed=1).to(backend.device)
    teacher.to(backend.teacher_dtype)
    source = SyntheticBatchSource(student.config.vocab_size)
    pipe = Pipeline(student, teacher, QWEN_STEP, source, backend)
    pipe.train_step()  # warm-up: kernels, allocator, optimizer state
    sync(backend.device)
    reset_peak(backend.device)
    timed = QWEN_STEP.steps - 1
    start = time.perf_counter()
    for _ in range(timed):
        pipe.train_step()
    sync(backend.device)
    seconds = (time.perf_counter() - start) / timed
    tokens = QWEN_STEP.batch_size * QWEN_STEP.seq_len
    flops = tokens * (
        flops_per_token(student, QWEN_STEP.seq_len, train=True)
        + flops_per_token(teacher, QWEN_STEP.seq_len, train=False)
    )
    return {"tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds,
            "peak_memory": peak(backend.device), "sec_per_step": seconds}  # fmt: skip


def generation() -> dict:
    """Greedy tokens/s of a 0.5B-shaped bf16 model, cached vs uncached, prompt 128."""
    model = build_model(PRESETS["qwen2.5-coder-0.5b"], seed=0).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, 151643, (1, 128), device="cuda")
    new = 128
    _, cached = timed_generate(model, prompt, new, use_cache=True)
    _, uncached = timed_generate(model, prompt, new, use_cache=False)
    return {"cached": new / cached, "uncached": new / uncached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-results.md"))
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, TFLOP/s")
    ap.add_argument("--child", choices=("qwen-step", "generation"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(qwen_step() if args.child == "qwen-step" else generation()))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device is visible")
    name = torch.cuda.get_device_name()
    peak_tflops = args.peak_tflops or next(
        (v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None
    )
    header = "| benchmark | baseline | ours | ratio (ours / baseline) |\n|---|---|---|---|"
    rows = [f"GPU: {name}, torch {torch.__version__}", "", header]

    def row(*cells: str) -> None:
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)

    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        loss = {
            v: run_child(
                str(HERE / "bench_loss.py"),
                "--child",
                v,
                "--save",
                f"{tmp}/{v}",
                "--tokens",
                "8192",
                "--device",
                "cuda",
                "--chunk",
                "0",
            )  # fmt: skip
            for v in ("naive", "chunked")
        }
    n, c = loss["naive"], loss["chunked"]
    row("loss fwd+bwd, 8192 tokens, vocab 151936: memory",
        f"{n['memory'] / 2**20:,.0f} MiB", f"{c['memory'] / 2**20:,.0f} MiB",
        f"{c['memory'] / n['memory']:.3f}x")  # fmt: skip
    row("loss fwd+bwd: time", f"{n['seconds'] * 1e3:.1f} ms", f"{c['seconds'] * 1e3:.1f} ms",
        f"{c['seconds'] / n['seconds']:.3f}x")  # fmt: skip
    step = {
        v: run_child(str(HERE / "bench_step.py"), "--child", v, "--device", "cuda", "--steps", "3")
        for v in ("reference", "ours")
    }
    r, o = step["reference"], step["ours"]
    row("distill step (bench_step.py): tokens/s", f"{r['tokens_per_s']:,.0f}",
        f"{o['tokens_per_s']:,.0f}", f"{o['tokens_per_s'] / r['tokens_per_s']:.2f}x")  # fmt: skip
    row("distill step: memory", f"{r['memory'] / 2**20:,.0f} MiB",
        f"{o['memory'] / 2**20:,.0f} MiB", f"{o['memory'] / r['memory']:.3f}x")  # fmt: skip
    q = run_child(__file__, "--child", "qwen-step")
    mfu = f"{q['flops_per_s'] / (peak_tflops * 1e12):.1%}" if peak_tflops else "peak unknown"
    row("0.5B student + 1.5B teacher, 8 x 1024 tokens: tokens/s", "", f"{q['tokens_per_s']:,.0f}",
        "")  # fmt: skip
    row(f"  MFU (of {peak_tflops or '?'} TFLOP/s bf16)", "", mfu, "")
    row("  peak memory", "", f"{q['peak_memory'] / 2**30:.1f} GiB", "")
    g = run_child(__file__, "--child", "generation")
    row("generation, 0.5B, prompt 128, 128 new: tokens/s", f"{g['uncached']:,.1f} (uncached)",
        f"{g['cached']:,.1f} (cached)", f"{g['cached'] / g['uncached']:.1f}x")  # fmt: skip
    args.out.write_text("\n".join(rows) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
