"""Seconds per distill step under each CPU thread policy, on an idle and on a loaded machine.

    python benchmarks/bench_threads.py [--steps 20] [--rounds 3] [--busy 0,1] [--train]

The step is `apr distill`'s smoke run (tiny-teacher -> tiny-student, synthetic batches, 16 x 64
tokens), or with `--train` the teacher alone trained on 16 x 128 tokens (`apr train`). Each
policy runs in a fresh process, because OpenMP reads its environment once, when torch loads it:

    default    torch's own choice (one thread per core it can see)
    affinity   torch.set_num_threads(len(os.sched_getaffinity(0)))
    one        torch.set_num_threads(1)
    passive    default threads with OMP_WAIT_POLICY=PASSIVE (idle threads sleep, not spin)
    free       one thread per core not busy now (cores minus the 1-minute load average)

`--busy N` runs N processes that each keep one core busy (a Python spin loop): the "loaded
machine" of the issue (2 cores, one other job). Busy levels and policies alternate within each
round, so a machine whose load drifts affects every policy alike; the figures are medians over
rounds of each process's median step, and ratios are against `default` at the same busy level.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = ("default", "affinity", "one", "passive", "free")


def child(policy: str, steps: int, train: bool) -> None:
    """Time `steps` optimizer steps under `policy` (already in the environment) and print JSON."""
    import torch

    from apr_cli.distill.pipeline import Pipeline, TrainConfig
    from apr_cli.model.config import ModelConfig
    from apr_cli.model.qwen2 import build_model

    cores = len(os.sched_getaffinity(0))
    threads = {
        "affinity": cores,
        "one": 1,
        "free": max(1, cores - round(os.getloadavg()[0])),
    }.get(policy)
    if threads is not None:
        torch.set_num_threads(threads)
    teacher = build_model(ModelConfig.from_name("tiny-teacher"), seed=1)
    if train:
        student, teacher, seq_len = teacher, None, 128
    else:
        student, seq_len = build_model(ModelConfig.from_name("tiny-student")), 64
    warm = 2
    pipeline = Pipeline(student, teacher, TrainConfig(steps=warm + steps, seq_len=seq_len))
    times = []
    for i in range(warm + steps):
        start = time.perf_counter()
        pipeline.train_step()
        if i >= warm:
            times.append(time.perf_counter() - start)
    print(
        json.dumps({"sec_per_step": statistics.median(times), "threads": torch.get_num_threads()})
    )


def spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(policy: str, steps: int, train: bool) -> dict:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
        env.pop(key, None)  # every policy starts from torch's defaults
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    args = [sys.executable, __file__, "--child", policy, "--steps", str(steps)]
    out = subprocess.run(args + ["--train"] * train, env=env, check=True, capture_output=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", default="0,1", help="busy-core counts to measure under")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--train", action="store_true", help="time `apr train` on the teacher")
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.train)
        return
    policies = args.policies.split(",")
    levels = [int(b) for b in args.busy.split(",")]
    results: dict[tuple[int, str], list[dict]] = {}
    cores = len(os.sched_getaffinity(0))
    print(f"cores available: {cores}; load average before: {os.getloadavg()[0]:.2f}")
    for r in range(args.rounds):
        for busy in levels:
            spinners = [spinner() for _ in range(busy)]
            try:
                for policy in policies:
                    m = measure(policy, args.steps, args.train)
                    results.setdefault((busy, policy), []).append(m)
                    print(
                        f"round {r + 1} busy={busy} {policy:9s} threads={m['threads']} "
                        f"{m['sec_per_step']:.4f} s/step",
                        flush=True,
                    )
            finally:
                for s in spinners:
                    s.kill()
                    s.wait()
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(f"{'busy cores':>10} {'policy':9s} {'threads':>7} {'s/step':>8} {'vs default':>10}")
    for busy in levels:
        base = statistics.median(m["sec_per_step"] for m in results[(busy, "default")])
        for policy in policies:
            runs = results[(busy, policy)]
            sec = statistics.median(m["sec_per_step"] for m in runs)
            threads = "/".join(sorted({str(m["threads"]) for m in runs}))
            print(f"{busy:>10} {policy:9s} {threads:>7} {sec:8.4f} {base / sec:9.2f}x")


if __name__ == "__main__":
    main()
