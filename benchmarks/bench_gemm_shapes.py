"""GEMM rates of the distill step's shapes against the 4096^2 "peak" bench_step divides by.

    python benchmarks/bench_gemm_shapes.py [--rows 330] [--rounds 3]

Each shape runs once per round in fp32 and bf16, rounds alternated (the first warms up and is
not counted); medians in GFLOP/s. V is Qwen2.5's vocabulary, `--rows` a loss block.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

VOCAB = 151936


def shapes(rows: int) -> dict[str, tuple[int, int, int, bool]]:
    """name -> (M, K, N, a transposed): C (M, N) = A (M, K) @ B (K, N)."""
    return {
        "4096^2": (4096, 4096, 4096, False),
        f"logits {rows}x256 @ 256xV": (rows, 256, VOCAB, False),
        f"logits {rows}x896 @ 896xV": (rows, 896, VOCAB, False),
        f"input grad {rows}xV @ Vx256": (rows, VOCAB, 256, False),
        f"weight grad ({rows}xV)^T @ {rows}x256": (VOCAB, rows, 256, True),
    }


def rate(m: int, k: int, n: int, transposed: bool, dtype: torch.dtype) -> float:
    """GFLOP/s of one (M, K) @ (K, N) product; A is a transposed (K, M) when `transposed`."""
    a = torch.randn(k, m).to(dtype).T if transposed else torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    start = time.perf_counter()
    a @ b
    return 2 * m * k * n / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=330, help="tokens per loss block")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds + 1):
        for dtype in (torch.float32, torch.bfloat16):
            for name, shape in shapes(args.rows).items():
                gflops = rate(*shape, dtype)
                if round_:
                    results.setdefault((name, str(dtype)[6:]), []).append(gflops)
    for (name, dtype), values in results.items():
        rounds = " ".join(f"{v:.0f}" for v in values)
        print(f"{dtype:9s} {name:34s} {statistics.median(values):7.0f} GFLOP/s  ({rounds})")


if __name__ == "__main__":
    main()
