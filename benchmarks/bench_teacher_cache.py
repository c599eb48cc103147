"""Distill steps/s from a teacher cache vs the online teacher; the build vs a plain forward.

    python benchmarks/bench_teacher_cache.py [--rounds 5] [--steps 4] [--device cpu|cuda]

A teacher ~8x the student's parameters, random tokens on disk. In one process: the cache build
(`hidden` bf16 and `topk` K=32) against plain teacher forwards over the same windows (tokens/s),
then training steps of the same student with the online teacher, the hidden cache and the top-k
cache, alternated round by round so that a shared machine's load falls on all alike; medians of
the rounds' steps/s and their ratios to online are printed. Target on the CPU: cached >= 3x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from apr_cli.data.shards import ShardBatchSource, write_shard
from apr_cli.distill.backend import select_backend
from apr_cli.distill.pipeline import Pipeline, TrainConfig
from apr_cli.model.checkpoint import load_model, save_model
from apr_cli.model.config import PRESETS
from apr_cli.model.qwen2 import build_model, count_parameters
from apr_cli.teacher_cache.build import BuildOptions, build_cache
from apr_cli.teacher_cache.reader import TeacherCache

# A small vocabulary keeps the embeddings (free lookups) from counting as much of either model,
# and bodies large enough that matmuls, not per-op overhead, take the time.
STUDENT = PRESETS["tiny-student"].with_(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
)
TEACHER = STUDENT.with_(
    hidden_size=512, intermediate_size=2048, num_hidden_layers=9, num_attention_heads=8
)
SEQ_LEN, BATCH = 128, 4


def build_seconds(teacher: Path, data: Path, out: Path, kind: str, device: str) -> float:
    options = BuildOptions(
        teacher=str(teacher),
        dataset=data,
        seq_len=SEQ_LEN,
        out=out,
        kind=kind,
        batch_size=BATCH,
        temperature=1.0,
        device=device,
    )
    start = time.perf_counter()
    build_cache(options)
    return time.perf_counter() - start


def forward_seconds(teacher: Path, data: Path, device: str) -> float:
    """Plain teacher forwards (final hidden states) over every window, BATCH at a time."""
    backend = select_backend(device)
    model = load_model(str(teacher), dtype=backend.teacher_dtype, device=backend.device)[0].eval()
    source = ShardBatchSource(data)
    n = source.check_seq_len(SEQ_LEN)
    start = time.perf_counter()
    for lo in range(0, n, BATCH):
        rows = np.stack([source.window(k, SEQ_LEN)[:-1] for k in range(lo, min(lo + BATCH, n))])
        inputs = torch.from_numpy(rows.astype(np.int64)).to(backend.device)
        with torch.inference_mode(), backend.autocast():
            model.hidden_states(inputs)
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def pipeline(teacher: Path, data: Path, cache: Path | None, device: str) -> Pipeline:
    backend = select_backend(device)
    config = TrainConfig(steps=10**6, batch_size=BATCH, seq_len=SEQ_LEN, temperature=1.0)
    model = None
    if cache is None:
        model = load_model(str(teacher), dtype=backend.teacher_dtype, device=backend.device)[0]
    return Pipeline(
        build_model(STUDENT, seed=0),
        model,
        config,
        ShardBatchSource(data),
        backend,
        teacher_cache=None if cache is None else TeacherCache(cache),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each variant")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    student_params = count_parameters(build_model(STUDENT))
    teacher_params = count_parameters(build_model(TEACHER))
    print(
        f"student {student_params:,} params, teacher {teacher_params:,} "
        f"({teacher_params / student_params:.1f}x); batch {BATCH} x seq {SEQ_LEN}; "
        f"device {args.device}, torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        # Enough windows for the warm-up and every timed step of every round, no wrap-around.
        windows = (args.rounds * args.steps + 2) * BATCH
        tokens = np.random.default_rng(0).integers(0, STUDENT.vocab_size, windows * SEQ_LEN + 1)
        write_shard(root / "data" / "train.bin", tokens)
        save_model(build_model(TEACHER, seed=1), root / "teacher")
        cached_tokens = windows * SEQ_LEN
        forward = forward_seconds(root / "teacher", root / "data", args.device)
        print(f"plain teacher forward: {cached_tokens / forward:,.0f} tokens/s")
        results = {"forward_tokens_per_s": cached_tokens / forward}
        for kind in ("hidden", "topk"):
            seconds = build_seconds(root / "teacher", root / "data", root / kind, kind, args.device)
            report = TeacherCache(root / kind).describe()
            rate = cached_tokens / seconds
            results[f"build_{kind}_tokens_per_s"] = rate
            results[f"{kind}_bytes_per_token"] = report["bytes_per_token"]
            print(
                f"build {kind}: {rate:,.0f} tokens/s ({rate * forward / cached_tokens:.2f}x the "
                f"plain forward), {report['bytes_per_token']} bytes/token"
            )
        variants = {"online": None, "hidden": root / "hidden", "topk": root / "topk"}
        pipelines = {name: pipeline(root / "teacher", root / "data", c, args.device)
                     for name, c in variants.items()}  # fmt: skip
        for p in pipelines.values():
            p.train_step()  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, p in pipelines.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    p.train_step()
                rates[name].append(args.steps / (time.perf_counter() - start))
        online = statistics.median(rates["online"])
        for name in variants:
            rate = statistics.median(rates[name])
            results[f"{name}_steps_per_s"] = rate
            print(f"distill {name:>6}: {rate:.2f} steps/s (median of {args.rounds}), "
                  f"{rate / online:.2f}x online")  # fmt: skip
        print(json.dumps(results))


if __name__ == "__main__":
    main()
