"""Where a bench_step step spends its time: torch.profiler's top operators (run by hand).

    python benchmarks/profile_step.py [--teacher 384|512] [--dtype fp32|bf16]
        [--variant ours|reference] [--rows 25]

Builds the same models and batches as `bench_step.py`, takes two untimed steps (warm-up), then
profiles one step on the CPU and prints the operators by their own time. docs/performance.md
reads these tables: the lm_head GEMMs (`mm`, `addmm_`), the element-wise passes over
(block, V) and the optimizer.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_step import DTYPES, TEACHERS, make_step
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=int, choices=TEACHERS, default=512, help="width")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="matmul dtype")
    parser.add_argument("--variant", choices=("ours", "reference"), default="ours")
    parser.add_argument("--rows", type=int, default=25, help="operators to print")
    args = parser.parse_args()
    step, _, _ = make_step(args.variant, torch.device("cpu"), TEACHERS[args.teacher], args.dtype)
    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    print(f"{args.variant}, teacher {args.teacher}, {args.dtype}: profiled step {seconds:.2f} s")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(table)


if __name__ == "__main__":
    main()
