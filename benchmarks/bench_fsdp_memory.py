"""Per-rank resident memory of a 2-rank CPU run with a large teacher: DDP vs --fsdp.

    python benchmarks/bench_fsdp_memory.py [--layers 16] [--rounds 1]

Writes a random teacher (hidden 1024, `--layers` blocks, vocab 512: ~181M parameters at 16)
to a temporary folder, then, for DDP and FSDP2 alternately, with 2 gloo ranks under torchrun:
- `apr distill`, 2 steps: the largest peak resident set of any process the run started
  (getrusage's RUSAGE_CHILDREN, taken in a fresh child per run);
- the same models through prepare() and Pipeline, 4 steps: each rank's current resident set
  (split into anonymous memory and mapped file pages) after each phase, and its peak.
Under FSDP2 the teacher's blocks stay sharded at rest, so each rank should hold about half.
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
# One rank's resident set after each phase: "phase rss peak anon file" (MiB) per line.
PHASES = """
import sys
import torch
from apr_cli.distill.options import DistillOptions, TrainConfig
from apr_cli.distill.pipeline import Pipeline
from apr_cli.distill.prepare import prepare


def report(phase):
    kib = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        kib[key] = value.split()[0] if key.startswith(("Vm", "Rss")) else None
    values = [int(kib[k]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")]
    print(phase, *(f"{v:.0f}" for v in values), flush=True)


fsdp = sys.argv[2] == "fsdp"
train = TrainConfig(steps=4, seq_len=32, batch_size=4)
options = DistillOptions(teacher=sys.argv[1], student="tiny-student", fsdp=fsdp, device="cpu",
                         train=train, teacher_warmup=0)  # fmt: skip
report("imported")
p = prepare(options)
report("loaded")
pipe = Pipeline(p.student, p.teacher, train, p.source, p.backend, "fsdp" if fsdp else "ddp")
pipe.teacher_hidden(torch.zeros(2, 32, dtype=torch.long))
report("teacher-forward")
for step in range(train.steps):
    pipe.train_step()
report(f"step-{train.steps}")
"""


def peak_mib(teacher: Path, out: Path, fsdp: bool) -> float:
    """Largest peak RSS (MiB) among the processes of one 2-rank `apr distill` run."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "apr_cli", "distill", "--teacher", str(teacher),
               "--student", "tiny-student", "--device", "cpu", "--steps", "2", "--seq-len", "32",
               "--batch-size", "4", "--teacher-warmup", "0", "--overwrite", "--out", str(out),
               *(["--fsdp"] if fsdp else [])]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True
    )
    return int(proc.stdout.split()[-1]) / 1024


def phases_mib(teacher: Path, script: Path, fsdp: bool) -> dict[str, list[float]]:
    """phase -> [rss, peak, anon, file] (MiB), each the largest over the 2 ranks."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), str(teacher), "fsdp" if fsdp else "ddp"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found: dict[str, list[float]] = {}
    for line in proc.stdout.splitlines():
        phase, *values = line.split()
        found[phase] = [max(a, float(b)) for a, b in zip(found.get(phase, [0.0] * 4), values)]
    return found


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
        script = Path(tmp) / "phases.py"
        script.write_text(PHASES)
        peaks: dict[str, list[float]] = {"ddp": [], "fsdp": []}
        phases: dict[str, list[dict[str, list[float]]]] = {"ddp": [], "fsdp": []}
        for _ in range(args.rounds):
            for name in peaks:
                fsdp = name == "fsdp"
                peaks[name].append(peak_mib(Path(tmp) / "teacher", Path(tmp) / name, fsdp))
                phases[name].append(phases_mib(Path(tmp) / "teacher", script, fsdp))
    ddp, fsdp = statistics.median(peaks["ddp"]), statistics.median(peaks["fsdp"])
    print(f"teacher: {params / 1e6:.0f}M parameters (fp32, {params * 4 / 2**20:,.0f} MiB)")
    print(f"apr distill, 2 steps, peak RSS per rank (max over ranks, median of {args.rounds}):")
    print(f"  DDP {ddp:,.0f} MiB, FSDP2 {fsdp:,.0f} MiB, FSDP2 / DDP {fsdp / ddp:.3f}x")
    print("| phase | DDP RSS (anon + file) | DDP peak | FSDP2 RSS (anon + file) | FSDP2 peak |")
    print("|---|---|---|---|---|")
    for phase in phases["ddp"][0]:
        cells = []
        for name in ("ddp", "fsdp"):
            rss, peak, anon, file = (
                statistics.median(run[phase][i] for run in phases[name]) for i in range(4)
            )
            cells += [f"{rss:,.0f} ({anon:,.0f} + {file:,.0f})", f"{peak:,.0f}"]
        print(f"| {phase} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
