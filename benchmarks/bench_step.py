"""Our distill step vs. a reference loop on transformers' Qwen2: tokens/s and memory (by hand).

    python benchmarks/bench_step.py [--teacher 384|512] [--dtype fp32|bf16] [--rounds 3]
        [--steps 3] [--device cpu|cuda] [--compile]

The reference is the obvious loop: transformers `Qwen2ForCausalLM` student and teacher with the
same weights as ours, the teacher under `no_grad`, full logits of both, `log_softmax`,
`F.kl_div`, `F.cross_entropy`, clipping, AdamW, in the same `--dtype` (bf16: autocast, the teacher
stored in bf16). Both train on the same batches from the same start. Each variant runs in a
fresh process, `--rounds` times, alternating: memory is the peak resident set during the timed
steps (VmHWM, reset after a warm-up step) minus the resident set before them (weights, optimizer
state), or `max_memory_allocated` minus `memory_allocated` on CUDA. Achieved FLOP/s is divided by
the rate of large fp32 and bf16 matmuls measured in the same process. `--compile` adds our step
with torch.compile. Targets: tokens/s >= 1.5x the reference (median), memory <= 0.3x, achieved
FLOP/s >= 40% of the matmul peak in the step's dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from peak_memory import peak, reset_peak, sync

from apr_cli.distill.backend import Backend
from apr_cli.distill.pipeline import Pipeline, TrainConfig
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import Qwen2ForCausalLM, build_model

# Qwen2.5's vocabulary with small bodies: the logits are most of the work, as in distillation.
VOCAB = 151936
STUDENT = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    torch_dtype="float32",
)
TEACHERS = {  # by width: today's small teacher and the larger one of issue 20
    width: STUDENT.with_(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4)
    for width in (384, 512)
}
TRAIN = TrainConfig(steps=10**6, batch_size=4, seq_len=256, lr=1e-3, warmup=0)


class RandomTokens:
    """Seeded random rows (a BatchSource): both loops see the same batches in the same order."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size, self.seed = vocab_size, seed
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randint(0, self.vocab_size, (batch_size, seq_len + 1), generator=self.generator)
        return w[:, :-1], w[:, 1:]  # (B, T) inputs and next-token labels

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "random", "vocab_size": self.vocab_size}


def transformers_twin(model: Qwen2ForCausalLM) -> torch.nn.Module:
    """The same weights in transformers' Qwen2ForCausalLM (our parameter names are theirs)."""
    import transformers

    hf_config = transformers.Qwen2Config(**model.config.to_hf())
    hf_config._attn_implementation = "sdpa"
    twin = transformers.Qwen2ForCausalLM(hf_config)
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    twin.tie_weights()
    return twin


def flops_per_token(model: Qwen2ForCausalLM, seq_len: int, train: bool) -> float:
    """2N (+ attention) per token forward, three times that with backward (PaLM's count)."""
    cfg = model.config
    matmul_params = sum(p.numel() for p in model.model.layers.parameters() if p.ndim == 2)
    matmul_params += model.output_weight.numel()  # the lm_head; embedding lookups are free
    forward = 2 * matmul_params + 4 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    return 3 * forward if train else forward


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the best of five 4096^2 matmuls in `dtype`."""
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    a @ a  # warm-up: thread pools, kernels
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 4096**3 / best


def reference_step(student, teacher, optimizer, source, device, low: torch.dtype | None) -> float:
    """One step of the obvious loop (matmuls in `low` under autocast, if given); the loss."""
    cfg = TRAIN
    inputs, labels = (t.to(device) for t in source.next_batch(cfg.batch_size, cfg.seq_len))
    with torch.autocast(device.type, dtype=low, enabled=low is not None):
        with torch.no_grad():
            t_logits = teacher(inputs).logits.flatten(0, 1)  # (N, V)
        s_logits = student(inputs).logits.flatten(0, 1)  # (N, V)
    T = cfg.temperature
    kd = F.kl_div(
        F.log_softmax(s_logits.float() / T, dim=-1),
        F.log_softmax(t_logits.float() / T, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(s_logits.float(), labels.flatten())
    loss = cfg.alpha * T**2 * kd + (1 - cfg.alpha) * ce
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.item()


def make_step(
    variant: str, device: torch.device, teacher_config: ModelConfig, dtype: str, loss_chunk: int
):
    """A zero-argument callable running one training step of `variant`, and the two models."""
    student, teacher = build_model(STUDENT, seed=0), build_model(teacher_config, seed=1)
    source = RandomTokens(VOCAB)
    low = None if dtype == "fp32" else DTYPES[dtype]
    if variant == "reference":
        hf_student = transformers_twin(student).to(device).train()
        hf_teacher = transformers_twin(teacher).to(device, low or torch.float32).eval()
        optimizer = torch.optim.AdamW(
            hf_student.parameters(), lr=TRAIN.lr, betas=(0.9, 0.95), weight_decay=0.01
        )
        step = lambda: reference_step(hf_student, hf_teacher, optimizer, source, device, low)  # noqa: E731
        return step, student, teacher
    backend = Backend(device, low)
    teacher.to(backend.teacher_dtype)
    config = TrainConfig(
        **{**TRAIN.to_dict(), "compile": variant == "ours-compiled", "loss_chunk": loss_chunk}
    )
    pipeline = Pipeline(student, teacher, config, source, backend)
    return (lambda: pipeline.train_step().loss), student, teacher


def measure(variant: str, args) -> dict:
    """Throughput, memory and FLOP/s of one variant, in this (fresh) process."""
    device = torch.device(args.device)
    peaks = {name: matmul_peak(device, dtype) for name, dtype in DTYPES.items()}
    teacher_config = TEACHERS[args.teacher]
    step, student, teacher = make_step(variant, device, teacher_config, args.dtype, args.loss_chunk)
    start = time.perf_counter()
    losses = [step()]  # warm-up (and, compiled, the compile)
    first_step_s = time.perf_counter() - start
    sync(device)
    before = reset_peak(device)
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak_bytes = peak(device)
    tokens = TRAIN.batch_size * TRAIN.seq_len
    flops = tokens * (
        flops_per_token(student, TRAIN.seq_len, train=True)
        + flops_per_token(teacher, TRAIN.seq_len, train=False)
    )
    return {
        "tokens_per_s": tokens / seconds,
        "memory": peak_bytes - before,
        "first_step_s": first_step_s,
        "flops": flops / seconds,
        "peaks": peaks,
        "losses": losses,
    }


def child(args, variant: str) -> dict:
    """Measure one variant in a fresh process, so that no other allocation is counted."""
    cmd = [sys.executable, __file__, "--child", variant, "--device", args.device]
    cmd += ["--steps", str(args.steps), "--teacher", str(args.teacher), "--dtype", args.dtype]
    cmd += ["--loss-chunk", str(args.loss_chunk)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=int, choices=TEACHERS, default=384, help="width")
    parser.add_argument("--dtype", choices=DTYPES, help="matmul dtype; default: bf16 on CUDA")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each variant")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time our compiled step")
    parser.add_argument("--loss-chunk", type=int, default=0, help="ours: tokens per loss block")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{os.cpu_count()}"
    tokens = TRAIN.batch_size * TRAIN.seq_len
    teacher = TEACHERS[args.teacher]
    print(
        f"student {STUDENT.hidden_size}x{STUDENT.num_hidden_layers}, teacher "
        f"{teacher.hidden_size}x{teacher.num_hidden_layers}, vocab {VOCAB}, "
        f"{tokens} tokens/step, {args.dtype}, {device}"
    )
    variants = ["reference", "ours"] + (["ours-compiled"] if args.compile else [])
    # Alternating rounds: other load on the machine hits every variant alike.
    runs = [(name, child(args, name)) for _ in range(args.rounds) for name in variants]
    for name, r in runs:
        peaks = r["peaks"]
        print(
            f"{name:>14}: {r['tokens_per_s']:8.1f} tokens/s  {r['memory'] / 2**20:8.1f} MiB  "
            f"{r['flops'] / 1e9:6.1f} GFLOP/s = {r['flops'] / peaks[args.dtype]:6.1%} of the "
            f"{args.dtype} matmul peak (fp32 {peaks['fp32'] / 1e9:.0f}, bf16 "
            f"{peaks['bf16'] / 1e9:.0f} GFLOP/s)  first step {r['first_step_s']:.1f} s  losses "
            + " ".join(f"{x:.4f}" for x in r["losses"])
        )
    by_name = {name: [r for n, r in runs if n == name] for name in variants}

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in by_name[name])

    pairs = zip(by_name["reference"], by_name["ours"])
    ratios = [ours["tokens_per_s"] / ref["tokens_per_s"] for ref, ours in pairs]
    speed = median("ours", "tokens_per_s") / median("reference", "tokens_per_s")
    fraction = statistics.median(r["flops"] / r["peaks"][args.dtype] for r in by_name["ours"])
    print(
        f"median tokens/s ratio {speed:.2f}x"
        f" (per round {' '.join(f'{x:.2f}' for x in ratios)}; target >= 1.5x), memory ratio "
        f"{median('ours', 'memory') / median('reference', 'memory'):.3f}x (target <= 0.3x), "
        f"ours at {fraction:.1%} of the {args.dtype} matmul peak (target >= 40%)"
    )
    if args.compile:
        compiled = median("ours-compiled", "tokens_per_s") / median("ours", "tokens_per_s")
        first = median("ours-compiled", "first_step_s") - median("ours", "first_step_s")
        print(f"compile: {compiled:.2f}x tokens/s, first step {first:+.1f} s")


if __name__ == "__main__":
    main()
