"""ShardBatchSource throughput against bare memmap slicing, and start-up time on a 1 GB corpus.

Run by hand: `python benchmarks/bench_shards.py [--gb 1] [--batch 16] [--seq-len 1024]`.
The corpus is generated in a temporary folder and deleted afterwards. It was just written, so it
is in the page cache: the figures are for a warm cache (a cold read is bounded by the disk).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from apr_cli.data.shards import ShardBatchSource, write_shard

VOCAB = 151_936  # Qwen2.5's, so ids need uint32
FILES = 4


def make_corpus(folder: Path, tokens: int) -> None:
    """Write `tokens` random ids over FILES raw shards, 16M tokens at a time to keep RAM low."""
    rng = np.random.default_rng(0)
    per_file = tokens // FILES
    for f in range(FILES):
        path = folder / f"shard_{f:03d}.bin"
        for start in range(0, per_file, 1 << 24):
            ids = rng.integers(0, VOCAB, min(1 << 24, per_file - start), dtype=np.uint32)
            write_shard(path, ids, append=start > 0)


def bare_rate(path: Path, batches: int, batch: int, seq_len: int, view: bool = False) -> float:
    """Windows/s copying the same windows out of one np.memmap (or its ndarray view) into int64."""
    mm = np.memmap(path, dtype="<u4", mode="r")
    if view:
        mm = np.asarray(mm)  # what ShardBatchSource slices: no np.memmap.__getitem__ overhead
    out = np.empty((batch, seq_len + 1), dtype=np.int64)  # (B, T+1)
    t0 = time.perf_counter()
    for step in range(batches):
        for r in range(batch):
            start = (step * batch + r) * seq_len
            out[r] = mm[start : start + seq_len + 1]
    return batches * batch / (time.perf_counter() - t0)


def source_rate(source: ShardBatchSource, batches: int, batch: int, seq_len: int) -> float:
    """Windows/s through next_batch, tensors included."""
    t0 = time.perf_counter()
    for _ in range(batches):
        source.next_batch(batch, seq_len)
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    """Generate the corpus, time start-up and throughput, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size in GB (1e9 bytes)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    tokens = int(args.gb * 1e9) // 4
    # The bare baseline reads one file, so every timed window must lie inside the first one.
    assert args.batches * args.batch * args.seq_len < tokens // FILES

    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        make_corpus(folder, tokens)
        print(f"corpus: {tokens * 4 / 1e9:.2f} GB, {tokens:,} tokens in {FILES} files, "
              f"written in {time.perf_counter() - t0:.1f} s")  # fmt: skip

        t0 = time.perf_counter()
        ShardBatchSource(folder)
        print(f"start-up, no id check:        {time.perf_counter() - t0:.3f} s")
        t0 = time.perf_counter()
        source = ShardBatchSource(folder, vocab_size=VOCAB)
        print(f"start-up with vocab id check: {time.perf_counter() - t0:.3f} s")

        # Best of three interleaved rounds, so load from other processes hits both sides alike.
        shape = (args.batches, args.batch, args.seq_len)
        shuffled_source = ShardBatchSource(folder, shuffle=True)
        bare = view = ours = shuffled = 0.0
        for _ in range(3):
            source.reset()
            bare = max(bare, bare_rate(folder / "shard_000.bin", *shape))
            view = max(view, bare_rate(folder / "shard_000.bin", *shape, view=True))
            ours = max(ours, source_rate(source, *shape))
            shuffled = max(shuffled, source_rate(shuffled_source, *shape))
        print(f"bare np.memmap slices:     {bare:12,.0f} windows/s")
        print(f"bare ndarray-view slices:  {view:12,.0f} windows/s")
        for name, rate in [("ShardBatchSource", ours), ("ShardBatchSource shuffled", shuffled)]:
            print(
                f"{name + ':':26} {rate:12,.0f} windows/s  ratio {rate / bare:.2f} "
                f"(to the view: {rate / view:.2f})"
            )
        print(f"(batch {args.batch}, seq_len {args.seq_len}, {args.batches} batches each)")


if __name__ == "__main__":
    main()
