"""Chunked vs. naive KD loss at Qwen2.5's vocabulary: memory and fwd+bwd time (run by hand).

    python benchmarks/bench_loss.py [--tokens 2048] [--device cpu|cuda] [--chunk 0]

The naive loss is the obvious PyTorch: full logits of both models, `log_softmax`, `F.kl_div`,
`F.cross_entropy`. Each variant runs in a fresh process: on the CPU its memory is the peak
resident set (VmHWM, reset after a warm-up call) minus the resident set held before the call
(parameters, inputs); on CUDA it is `max_memory_allocated` minus `memory_allocated` before.
Each variant saves its value and gradients, and the two are compared.
Targets: memory <= 0.2x naive, time <= 1.0x naive.
"""

from __future__ import annotations

import argparse
import json
import os
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


def make_inputs(tokens: int, device: str) -> dict:
    """Seeded student hidden (N, C) and weight (V, C) with grads; frozen teacher; labels (N,)."""
    g = torch.Generator().manual_seed(0)
    # On CUDA the frozen teacher is stored in bf16 as the pipeline does; the student in fp32.
    teacher_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return {
        "s_h": torch.randn(tokens, HIDDEN, generator=g).to(device).requires_grad_(),
        "s_w": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.05).to(device).requires_grad_(),
        "t_h": torch.randn(tokens, HIDDEN, generator=g).to(device, teacher_dtype),
        "t_w": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.05).to(device, teacher_dtype),
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


def fwd_bwd(loss_fn, x: dict, device: str, chunk: int) -> torch.Tensor:
    """One forward and backward; the gradients land in x["s_h"].grad and x["s_w"].grad."""
    x["s_h"].grad = x["s_w"].grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = loss_fn(**x, chunk=chunk)
    loss.backward()
    return loss.detach()


def measure(variant: str, args) -> dict:
    """Memory attributable to the loss and fwd+bwd seconds, in this (fresh) process."""
    x = make_inputs(args.tokens, args.device)
    loss_fn = VARIANTS[variant]
    # Warm up thread pools and kernels on a few tokens, so that they are not counted.
    few = {**x, "s_h": x["s_h"].detach()[:64].requires_grad_(), "t_h": x["t_h"][:64]}
    fwd_bwd(loss_fn, {**few, "y": x["y"][:64]}, args.device, args.chunk)
    x["s_w"].grad = None
    sync(args.device)
    before = reset_peak(args.device)
    start = time.perf_counter()
    loss = fwd_bwd(loss_fn, x, args.device, args.chunk)
    sync(args.device)
    seconds = time.perf_counter() - start
    peak_bytes = peak(args.device)
    torch.save([loss.cpu(), x["s_h"].grad.cpu(), x["s_w"].grad.cpu()], args.save)
    return {"memory": peak_bytes - before, "seconds": seconds}


def child(args, variant: str, save: Path) -> dict:
    """Measure one variant in a fresh process, so that no other allocation is counted."""
    cmd = [sys.executable, __file__, "--child", variant, "--save", str(save)]
    cmd += ["--tokens", str(args.tokens), "--device", args.device, "--chunk", str(args.chunk)]
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
    parser.add_argument("--chunk", type=int, default=0, help="tokens per block; 0: automatic")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each variant")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    chunk = args.chunk or auto_chunk_tokens(VOCAB)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{os.cpu_count()}"
    print(f"vocab {VOCAB}, hidden {HIDDEN}, {args.tokens} tokens, {device}, chunk {chunk}")
    with tempfile.TemporaryDirectory() as tmp:
        saved = {name: Path(tmp) / f"{name}.pt" for name in VARIANTS}
        # Alternating rounds, best time of each: other load on the machine hits both alike.
        runs = [
            (name, child(args, name, saved[name])) for _ in range(args.rounds) for name in VARIANTS
        ]
        diffs = max_relative_differences(saved["chunked"], saved["naive"])
    best = {
        name: {
            "memory": max(r["memory"] for n, r in runs if n == name),
            "seconds": min(r["seconds"] for n, r in runs if n == name),
        }
        for name in VARIANTS
    }
    for name, r in best.items():
        print(f"{name:>8}: {r['memory'] / 2**20:9.1f} MiB  {r['seconds'] * 1e3:9.1f} ms fwd+bwd")
    naive, ours = best["naive"], best["chunked"]
    print(
        f"memory ratio {ours['memory'] / naive['memory']:.3f}x (target <= 0.2x), "
        f"time ratio {ours['seconds'] / naive['seconds']:.3f}x (target <= 1.0x)"
    )
    print(
        "max relative difference: value {:.1e}, grad hidden {:.1e}, grad weight {:.1e}".format(
            *diffs
        )
    )


if __name__ == "__main__":
    main()
