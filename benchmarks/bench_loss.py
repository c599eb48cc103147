"""Chunked vs. naive KD loss at Qwen2.5's vocabulary: memory and fwd+bwd time (run by hand).

    python benchmarks/bench_loss.py [--tokens 2048] [--device cpu|cuda] [--dtype fp32|bf16]
        [--chunk 0] [--rounds 3]
    python benchmarks/bench_loss.py --sweep 64,128,256,512 [--hidden 896] [--dtype bf16]

The naive loss is the obvious PyTorch: full logits of both models, `log_softmax`, `F.kl_div`,
`F.cross_entropy`. Each variant runs in a fresh process: on the CPU its memory is the peak
resident set (VmHWM, reset after a warm-up call) minus the resident set held before the call
(parameters, inputs); on CUDA it is `max_memory_allocated` minus `memory_allocated` before.
Each variant saves its value and gradients, and the two are compared. `--dtype bf16` runs both
under bf16 autocast (the default on CUDA), the teacher stored in bf16. Times are medians of
`--rounds` alternating runs. Targets: memory <= 0.2x naive, time <= 0.4x naive.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from peak_memory import peak, reset_peak, sync

from apr_cli.distill.losses import auto_chunk_tokens, distill_loss

VOCAB, HIDDEN = 151936, 896  # Qwen2.5-0.5B's lm_head, the student and teacher alike
TEMPERATURE, ALPHA = 2.0, 0.5


def make_inputs(tokens: int, device: str, dtype: str, hidden: int = HIDDEN) -> dict:
    """Seeded student hidden (N, C) and weight (V, C) with grads; frozen teacher; labels (N,)."""
    g = torch.Generator().manual_seed(0)
    # In bf16 the frozen teacher is stored in bf16 as the pipeline does; the student in fp32.
    teacher_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    return {
        "s_h": torch.randn(tokens, hidden, generator=g).to(device).requires_grad_(),
        "s_w": (torch.randn(VOCAB, hidden, generator=g) * 0.05).to(device).requires_grad_(),
        "t_h": torch.randn(tokens, hidden, generator=g).to(device, teacher_dtype),
        "t_w": (torch.randn(VOCAB, hidden, generator=g) * 0.05).to(device, teacher_dtype),
        "y": torch.randint(0, VOCAB, (tokens,), generator=g).to(device),
    }


def naive_loss(s_h, s_w, t_h, t_w, y, chunk: int) -> torch.Tensor:
    """Forward KL and CE on the full (N, V) logits, written the obvious way."""
    s_logits = F.linear(s_h, s_w)  # (N, V)
    with torch.no_grad():
        t_logits = F.linear(t_h, t_w)  # (N, V)
    kd = F.kl_div(
        F.log_softmax(s_logits.float() / TEMPERATURE, dim=-1),
        F.log_softmax(t_logits.float() / TEMPERATURE, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(s_logits.float(), y)
    return ALPHA * TEMPERATURE**2 * kd + (1 - ALPHA) * ce


def chunked_loss(s_h, s_w, t_h, t_w, y, chunk: int) -> torch.Tensor:
    """Ours: the same loss, `chunk` tokens at a time."""
    parts = distill_loss(
        s_h, s_w, t_h, t_w, y, temperature=TEMPERATURE, alpha=ALPHA, chunk_tokens=chunk
    )
    return parts.loss


VARIANTS: dict[str, Callable[..., torch.Tensor]] = {"naive": naive_loss, "chunked": chunked_loss}


def fwd_bwd(loss_fn, x: dict, device: str, dtype: str, chunk: int) -> torch.Tensor:
    """One forward and backward; the gradients land in x["s_h"].grad and x["s_w"].grad."""
    x["s_h"].grad = x["s_w"].grad = None
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = loss_fn(**x, chunk=chunk)
    loss.backward()
    return loss.detach()


def measure(variant: str, args) -> dict:
    """Memory attributable to the loss and fwd+bwd seconds, in this (fresh) process."""
    x = make_inputs(args.tokens, args.device, args.dtype)
    loss_fn = VARIANTS[variant]
    # Warm up thread pools and kernels on a few tokens, so that they are not counted.
    few = {**x, "s_h": x["s_h"].detach()[:64].requires_grad_(), "t_h": x["t_h"][:64]}
    fwd_bwd(loss_fn, {**few, "y": x["y"][:64]}, args.device, args.dtype, args.chunk)
    x["s_w"].grad = None
    sync(args.device)
    before = reset_peak(args.device)
    start = time.perf_counter()
    loss = fwd_bwd(loss_fn, x, args.device, args.dtype, args.chunk)
    sync(args.device)
    seconds = time.perf_counter() - start
    peak_bytes = peak(args.device)
    torch.save([loss.cpu(), x["s_h"].grad.cpu(), x["s_w"].grad.cpu()], args.save)
    return {"memory": peak_bytes - before, "seconds": seconds}


def sweep(args) -> None:
    """Chunked fwd+bwd time per token for each block size, alternated in this process."""
    x = make_inputs(args.tokens, args.device, args.dtype, args.hidden)
    chunks = [int(c) for c in args.sweep.split(",")]
    seconds: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(args.rounds + 1):  # the first round warms up and is not counted
        for c in chunks:
            sync(args.device)
            start = time.perf_counter()
            fwd_bwd(chunked_loss, x, args.device, args.dtype, c)
            sync(args.device)
            seconds[c].append(time.perf_counter() - start)
    print(f"hidden {args.hidden}, {args.dtype}, {args.tokens} tokens: median ms per token")
    for c in chunks:
        per_token = statistics.median(seconds[c][1:]) / args.tokens * 1e3
        print(f"  chunk {c:5d}: {per_token:7.3f}")


def child(args, variant: str, save: Path) -> dict:
    """Measure one variant in a fresh process, so that no other allocation is counted."""
    cmd = [sys.executable, __file__, "--child", variant, "--save", str(save)]
    cmd += ["--tokens", str(args.tokens), "--device", args.device, "--dtype", args.dtype]
    cmd += ["--chunk", str(args.chunk)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def max_relative_differences(ours: Path, naive: Path) -> list[float]:
    """Largest |ours - naive| / max|naive| for the value, the hidden and the weight gradients."""
    pairs = zip(torch.load(ours), torch.load(naive))
    return [float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="default: bf16 on CUDA")
    parser.add_argument("--chunk", type=int, default=0, help="tokens per block; 0: automatic")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each variant")
    parser.add_argument("--sweep", help="comma-separated block sizes: time only the chunked loss")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="hidden size (for --sweep)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    if args.sweep:
        sweep(args)
        return

    low = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    chunk = args.chunk or auto_chunk_tokens(VOCAB, low)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{os.cpu_count()}"
    print(
        f"vocab {VOCAB}, hidden {HIDDEN}, {args.tokens} tokens, {device}, {args.dtype}, "
        f"chunk {chunk}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        saved = {name: Path(tmp) / f"{name}.pt" for name in VARIANTS}
        # Alternating rounds: other load on the machine hits both alike.
        runs = [
            (name, child(args, name, saved[name])) for _ in range(args.rounds) for name in VARIANTS
        ]
        diffs = max_relative_differences(saved["chunked"], saved["naive"])
    seconds = {name: [r["seconds"] for n, r in runs if n == name] for name in VARIANTS}
    memory = {name: max(r["memory"] for n, r in runs if n == name) for name in VARIANTS}
    for name in VARIANTS:
        times = " ".join(f"{t:.2f}" for t in seconds[name])
        print(f"{name:>8}: {memory[name] / 2**20:9.1f} MiB  fwd+bwd s per round: {times}")
    time_ratio = statistics.median(seconds["chunked"]) / statistics.median(seconds["naive"])
    print(
        f"memory ratio {memory['chunked'] / memory['naive']:.3f}x (target <= 0.2x), "
        f"median time ratio {time_ratio:.3f}x (target <= 0.4x)"
    )
    print(
        "max relative difference: value {:.1e}, grad hidden {:.1e}, grad weight {:.1e}".format(
            *diffs
        )
    )


if __name__ == "__main__":
    main()
