#!/usr/bin/env python3
"""Print the KD-vs-CE results table (markdown) from an experiment's manifests and eval JSONs.

Usage: scripts/kd-vs-ce-table.py DIR, where DIR is what scripts/kd-vs-ce.sh wrote (or its copy
under evidence/): teacher/ and seed-N/{kd,ce}/ (dispatch.json, launch-victory.txt,
metrics.jsonl), eval-teacher.json, seed-N/eval-{kd,ce}.json and experiment.json; with
TEACHER_CACHE also seed-N/kd-KIND/, seed-N/eval-kd-KIND.json and cache-KIND.json. Every figure
comes from them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

STUDENTS = ("kd", "ce")
CACHE_KINDS = ("topk", "hidden")  # students distilled from a teacher cache: seed-N/kd-KIND
# What must be identical between the KD and the CE student for the comparison to be fair.
SAME = ("steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup", "weight_decay", "seed")
STEP_ONE_CE = re.compile(r"^step +1/\d+ .*\bce=([0-9.]+)", re.MULTILINE)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def completed(run: Path) -> dict:
    manifest = load(run / "dispatch.json")
    if manifest["status"] != "completed":
        raise SystemExit(f"{run}: run is {manifest['status']}, not completed")
    return manifest


def step_one_ce(run: Path) -> str:
    """CE of the first step: equal for two runs that start from the same init on the same batch.
    From metrics.jsonl; evidence copied without it has the step line's ce= (which apr train and
    cache runs do not print)."""
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        return f"{json.loads(metrics.read_text().splitlines()[0])['ce_loss']:.4f}"
    found = STEP_ONE_CE.search((run / "launch-victory.txt").read_text())
    return found.group(1) if found else "?"


def row(seed: str, name: str, run: Path, manifest: dict, evaluation: dict) -> str:
    return (
        f"| {seed} | {name} | {manifest['student']['parameters']:,} | {manifest['steps']:,} "
        f"| {manifest['tokens']:,} | {manifest['wall_time_s']:.0f} | {step_one_ce(run)} "
        f"| {evaluation['loss']:.4f} | {evaluation['perplexity']:.2f} |"
    )


def cache_name(manifest: dict) -> str:
    layout = manifest["teacher"]["cache"]["layout"]
    if layout["kind"] == "topk":
        return f"top-{layout['top_k']} teacher cache"
    return f"hidden-state teacher cache ({layout['cache_dtype']})"


def seed_rows(seed_dir: Path, teacher_path: str) -> tuple[list[str], dict[str, float]]:
    """The rows of one seed, after checking the runs differ only in the teacher (online, cached
    or none)."""
    cached = tuple(f"kd-{k}" for k in CACHE_KINDS if (seed_dir / f"kd-{k}").is_dir())
    roles = STUDENTS + cached
    runs = {role: completed(seed_dir / role) for role in roles}
    evals = {role: load(seed_dir / f"eval-{role}.json") for role in roles}
    kd, ce = runs["kd"]["hyperparameters"], runs["ce"]["hyperparameters"]
    differ = [k for k in SAME if kd[k] != ce[k]]
    if differ or runs["kd"]["student"]["spec"] != runs["ce"]["student"]["spec"]:
        raise SystemExit(f"{seed_dir}: KD and CE students differ in {differ or ['student']}")
    if runs["kd"]["data"]["path"] != runs["ce"]["data"]["path"]:
        raise SystemExit(f"{seed_dir}: KD and CE students trained on different data")
    if runs["kd"]["teacher"]["path"] != teacher_path or runs["ce"]["teacher"] is not None:
        raise SystemExit(f"{seed_dir}: the KD student's teacher is not the experiment's teacher")
    for role in cached:
        other = runs[role]["hyperparameters"]
        differ = [k for k in (*SAME, "temperature", "alpha", "loss") if other[k] != kd[k]]
        if differ or runs[role]["data"]["path"] != runs["kd"]["data"]["path"]:
            raise SystemExit(f"{seed_dir}: {role} and kd differ in {differ or ['data']}")
        if runs[role]["teacher"]["spec"] != runs["kd"]["teacher"]["spec"]:
            raise SystemExit(f"{seed_dir}: {role}'s cache is not of the experiment's teacher")
    seed = seed_dir.name.removeprefix("seed-")
    names = {
        "kd": f"KD student `{runs['kd']['student']['spec']}` (apr distill, "
        f"T={kd['temperature']:g}, alpha={kd['alpha']:g})",
        "ce": f"CE student `{runs['ce']['student']['spec']}` (apr train)",
        **{r: f"KD student, {cache_name(runs[r])} (apr distill --teacher-cache)" for r in cached},
    }
    rows = [row(seed, names[r], seed_dir / r, runs[r], evals[r]) for r in roles]
    return rows, {role: evals[role]["loss"] for role in roles}


def main(root: Path) -> None:
    seed_dirs = sorted(root.glob("seed-*"), key=lambda p: int(p.name.removeprefix("seed-")))
    if not seed_dirs:
        raise SystemExit(f"{root}: no seed-N folders")
    teacher = completed(root / "teacher")
    teacher_eval = load(root / "eval-teacher.json")
    print(
        "| seed | model | params | steps | train tokens | train time (s) | step-1 CE "
        "| val loss | val ppl |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    name = f"teacher `{teacher['student']['spec']}` (apr train)"
    print(
        row(str(teacher["hyperparameters"]["seed"]), name, root / "teacher", teacher, teacher_eval)
    )
    verdicts = []
    for seed_dir in seed_dirs:
        rows, loss = seed_rows(seed_dir, teacher["run_dir"] + "/student-trained.apr")
        print("\n".join(rows))
        gap = loss["ce"] - loss["kd"]
        ok = teacher_eval["loss"] < loss["kd"] < loss["ce"]
        verdicts.append(
            f"- seed {seed_dir.name.removeprefix('seed-')}: CE student's val loss minus the KD "
            f"student's: {gap:+.4f} nats/token ({100 * gap / loss['ce']:+.1f}%, positive means "
            "KD is better); "
            f"teacher < KD < CE: {'yes' if ok else 'NO'}"
        )
        for kind in CACHE_KINDS:
            if f"kd-{kind}" in loss:
                cached = loss[f"kd-{kind}"]
                diff = cached - loss["kd"]
                verdicts.append(
                    f"- seed {seed_dir.name.removeprefix('seed-')}: {kind} cache student's val "
                    f"loss minus the online-KD student's: {diff:+.4f} nats/token "
                    f"({100 * diff / loss['kd']:+.2f}%); below the CE student: "
                    f"{'yes' if cached < loss['ce'] else 'NO'}"
                )
    print()
    print("\n".join(verdicts))
    print(
        f"\nValidation: {teacher_eval['data']['tokens']:,} tokens in "
        f"{teacher_eval['data']['path']}; {teacher_eval['windows']:,} windows of "
        f"{teacher_eval['seq_len']} tokens ({teacher_eval['selection']}), "
        f"{teacher_eval['tokens']:,} labels scored."
    )
    for kind in CACHE_KINDS:
        if (root / f"cache-{kind}.json").is_file():
            cache = load(root / f"cache-{kind}.json")
            print(
                f"Cache {kind}: {cache['bytes_per_token']} bytes/token, windows "
                f"{cache['windows'][0]:,}..{cache['windows'][1] - 1:,} ({cache['tokens']:,} "
                f"tokens), {cache['size_bytes'] / 2**20:,.0f} MiB."
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
