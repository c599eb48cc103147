#!/usr/bin/env python3
"""Print the KD-vs-CE results table (markdown) from an experiment's manifests and eval JSONs.

Usage: scripts/kd-vs-ce-table.py DIR, where DIR is what scripts/kd-vs-ce.sh wrote (or its copy
under evidence/): seed-N/{teacher,kd,ce}/dispatch.json and launch-victory.txt,
seed-N/eval-{teacher,kd,ce}.json and experiment.json. Every figure comes from those files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROLES = ("teacher", "kd", "ce")
# What must be identical between the KD and the CE student for the comparison to be fair.
SAME = ("steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup", "weight_decay", "seed")
STEP_ONE_CE = re.compile(r"^step +1/\d+ .*\bce=([0-9.]+)", re.MULTILINE)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def step_one_ce(run: Path) -> str:
    """CE of the first step: equal for two runs that start from the same init on the same batch."""
    found = STEP_ONE_CE.search((run / "launch-victory.txt").read_text())
    return found.group(1) if found else "?"


def seed_rows(seed_dir: Path) -> tuple[list[str], dict[str, float]]:
    runs = {role: load(seed_dir / role / "dispatch.json") for role in ROLES}
    evals = {role: load(seed_dir / f"eval-{role}.json") for role in ROLES}
    for role, manifest in runs.items():
        if manifest["status"] != "completed":
            raise SystemExit(f"{seed_dir / role}: run is {manifest['status']}, not completed")
    kd, ce = runs["kd"]["hyperparameters"], runs["ce"]["hyperparameters"]
    differ = [k for k in SAME if kd[k] != ce[k]]
    if differ or runs["kd"]["student"]["spec"] != runs["ce"]["student"]["spec"]:
        raise SystemExit(f"{seed_dir}: KD and CE students differ in {differ or ['student']}")
    if runs["kd"]["data"]["path"] != runs["ce"]["data"]["path"]:
        raise SystemExit(f"{seed_dir}: KD and CE students trained on different data")
    names = {
        "teacher": f"teacher `{runs['teacher']['student']['spec']}` (apr train)",
        "kd": f"KD student `{runs['kd']['student']['spec']}` (apr distill, "
        f"T={kd['temperature']:g}, alpha={kd['alpha']:g})",
        "ce": f"CE student `{runs['ce']['student']['spec']}` (apr train)",
    }
    rows = []
    for role in ROLES:
        m, e = runs[role], evals[role]
        rows.append(
            f"| {seed_dir.name.removeprefix('seed-')} | {names[role]} "
            f"| {m['student']['parameters']:,} | {m['steps']:,} | {m['tokens']:,} "
            f"| {m['wall_time_s']:.0f} | {step_one_ce(seed_dir / role)} "
            f"| {e['loss']:.4f} | {e['perplexity']:.2f} |"
        )
    return rows, {role: evals[role]["loss"] for role in ROLES}


def main(root: Path) -> None:
    seed_dirs = sorted(root.glob("seed-*"), key=lambda p: int(p.name.removeprefix("seed-")))
    if not seed_dirs:
        raise SystemExit(f"{root}: no seed-N folders")
    print(
        "| seed | model | params | steps | train tokens | train time (s) | step-1 CE "
        "| val loss | val ppl |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for seed_dir in seed_dirs:
        rows, loss = seed_rows(seed_dir)
        print("\n".join(rows))
        gap = loss["ce"] - loss["kd"]
        ok = loss["teacher"] < loss["kd"] < loss["ce"]
        verdicts.append(
            f"- seed {seed_dir.name.removeprefix('seed-')}: KD student {gap:+.4f} nats/token "
            f"better than the CE student ({100 * gap / loss['ce']:.1f}% of its loss); "
            f"teacher < KD < CE: {'yes' if ok else 'NO'}"
        )
    first = load(seed_dirs[0] / "eval-teacher.json")
    print()
    print("\n".join(verdicts))
    print(
        f"\nValidation: {first['data']['tokens']:,} tokens in {first['data']['path']}; "
        f"{first['windows']:,} windows of {first['seq_len']} tokens ({first['selection']}), "
        f"{first['tokens']:,} labels scored."
    )
    experiment = root / "experiment.json"
    if experiment.is_file():
        info = load(experiment)
        print(
            f"Experiment: size {info['size']}, seeds {info['seeds']}, {info['files']} source "
            f"files, {info['wall_s']:,} s wall time in all (data, training and evaluation)."
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
