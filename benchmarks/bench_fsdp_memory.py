"""Per-rank peak resident memory of a 2-rank CPU run with a large teacher: DDP vs --fsdp.

    python benchmarks/bench_fsdp_memory.py [--layers 16] [--rounds 1]

Writes a random teacher (hidden 1024, `--layers` blocks, vocab 512: ~217M parameters at 16)
to a temporary folder, then runs `apr distill` under torchrun with 2 gloo ranks, DDP and FSDP2
alternately, 2 steps each. The figure is the largest peak resident set of any process the run
started (getrusage's RUSAGE_CHILDREN, taken in a fresh child per run). Under FSDP2 the teacher's
blocks stay sharded at rest, so each rank should hold about half of them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from apr_cli.model.checkpoint import save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

TEACHER = ModelConfig.from_name("tiny-teacher").with_(
    hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=2
)
MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
"""


def peak_mib(teacher: Path, out: Path, fsdp: bool) -> float:
    """Largest peak RSS (MiB) among the processes of one 2-rank run."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "apr_cli", "distill", "--teacher", str(teacher),
               "--student", "tiny-student", "--device", "cpu", "--steps", "2", "--seq-len", "32",
               "--batch-size", "4", "--teacher-warmup", "0", "--overwrite", "--out", str(out),
               *(["--fsdp"] if fsdp else [])]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True
    )
    return int(proc.stdout.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    cfg = TEACHER.with_(num_hidden_layers=args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_model(cfg, seed=1)
        params = sum(p.numel() for p in teacher.parameters())
        save_model(teacher, Path(tmp) / "teacher")
        del teacher
        runs: dict[str, list[float]] = {"ddp": [], "fsdp": []}
        for _ in range(args.rounds):
            for name in runs:
                runs[name].append(peak_mib(Path(tmp) / "teacher", Path(tmp) / name, name == "fsdp"))
    ddp, fsdp = statistics.median(runs["ddp"]), statistics.median(runs["fsdp"])
    print(f"teacher: {params / 1e6:.0f}M parameters (fp32, {params * 4 / 2**20:,.0f} MiB)")
    print("| layout | peak RSS per rank (max over ranks) |")
    print("|---|---|")
    print(f"| DDP | {ddp:,.0f} MiB |")
    print(f"| FSDP2 | {fsdp:,.0f} MiB |")
    print(f"| ratio FSDP2 / DDP | {fsdp / ddp:.3f}x |")


if __name__ == "__main__":
    main()
