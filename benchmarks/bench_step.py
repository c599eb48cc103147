"""Our distill step vs. a reference loop on transformers' Qwen2: tokens/s and memory (by hand).

    python benchmarks/bench_step.py [--steps 3] [--device cpu|cuda] [--compile]

The reference is the obvious loop: transformers `Qwen2ForCausalLM` student and teacher with the
same weights as ours, the teacher under `no_grad`, full logits of both, `log_softmax`,
`F.kl_div`, `F.cross_entropy`, AdamW. Both train on the same batches from the same start. Each
variant runs in a fresh process: memory is the peak resident set during the timed steps (VmHWM,
reset after a warm-up step) minus the resident set before them (weights, optimizer state), or
`max_memory_allocated` minus `memory_allocated` on CUDA. Achieved FLOP/s is divided by the rate
of a large matmul measured in the same process. `--compile` adds our step with torch.compile.
Targets on the CPU: tokens/s >= 1.1x the reference, memory <= 0.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from peak_memory import peak, reset_peak, sync

from apr_cli.distill.backend import select_backend
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
TEACHER = STUDENT.with_(hidden_size=384, intermediate_size=1536, num_hidden_layers=4)
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


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of the best of five 4096^2 matmuls in the step's dtype."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 4096**3 / best


def reference_step(student, teacher, optimizer, source, device) -> float:
    """One step of the obvious loop; returns the loss."""
    cfg = TRAIN
    inputs, labels = (t.to(device) for t in source.next_batch(cfg.batch_size, cfg.seq_len))
    on_cuda = device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
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


def make_step(variant: str, device: torch.device):
    """A zero-argument callable running one training step of `variant`, and the two models."""
    student, teacher = build_model(STUDENT, seed=0), build_model(TEACHER, seed=1)
    source = RandomTokens(VOCAB)
    if variant == "reference":
        hf_student = transformers_twin(student).to(device).train()
        hf_teacher = transformers_twin(teacher).to(device).eval()
        if device.type == "cuda":
            hf_teacher.to(torch.bfloat16)
        optimizer = torch.optim.AdamW(
            hf_student.parameters(), lr=TRAIN.lr, betas=(0.9, 0.95), weight_decay=0.01
        )
        step = lambda: reference_step(hf_student, hf_teacher, optimizer, source, device)  # noqa: E731
        return step, student, teacher
    backend = select_backend(device.type)
    teacher.to(backend.teacher_dtype)
    config = TrainConfig(**{**TRAIN.to_dict(), "compile": variant == "ours-compiled"})
    pipeline = Pipeline(student, teacher, config, source, backend)
    return (lambda: pipeline.train_step().loss), student, teacher


def measure(variant: str, args) -> dict:
    """Throughput, memory and FLOP/s of one variant, in this (fresh) process."""
    device = torch.device(args.device)
    peak_flops = matmul_peak(device)
    step, student, teacher = make_step(variant, device)
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
        "flops_fraction": flops / seconds / peak_flops,
        "peak_flops": peak_flops,
        "losses": losses,
    }


def child(args, variant: str) -> dict:
    """Measure one variant in a fresh process, so that no other allocation is counted."""
    cmd = [sys.executable, __file__, "--child", variant, "--device", args.device]
    cmd += ["--steps", str(args.steps)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time our compiled step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{os.cpu_count()}"
    tokens = TRAIN.batch_size * TRAIN.seq_len
    print(
        f"student {STUDENT.hidden_size}x{STUDENT.num_hidden_layers}, teacher "
        f"{TEACHER.hidden_size}x{TEACHER.num_hidden_layers}, vocab {VOCAB}, "
        f"{tokens} tokens/step, {device}"
    )
    variants = ["reference", "ours"] + (["ours-compiled"] if args.compile else [])
    rows = {name: child(args, name) for name in variants}
    for name, r in rows.items():
        print(
            f"{name:>14}: {r['tokens_per_s']:8.1f} tokens/s  {r['memory'] / 2**20:8.1f} MiB  "
            f"{r['flops_fraction']:6.1%} of matmul peak ({r['peak_flops'] / 1e9:.0f} GFLOP/s)  "
            f"first step {r['first_step_s']:.1f} s  losses "
            + " ".join(f"{x:.4f}" for x in r["losses"])
        )
    ref, ours = rows["reference"], rows["ours"]
    print(
        f"tokens/s ratio {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x (target >= 1.1x), "
        f"memory ratio {ours['memory'] / ref['memory']:.3f}x (target <= 0.5x)"
    )
    if args.compile:
        compiled = rows["ours-compiled"]
        print(
            f"compile: {compiled['tokens_per_s'] / ours['tokens_per_s']:.2f}x tokens/s, "
            f"first step {compiled['first_step_s']:.1f} s vs {ours['first_step_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
