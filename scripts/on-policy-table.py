"""The table of scripts/on-policy-vs-kd.sh: per run, validation loss, the student's KL to the
teacher on text it generates itself, wall time, and sampling throughput and share of step time.

Usage: python scripts/on-policy-table.py OUT_DIR DATA_DIR TEACHER   (writes OUT_DIR/results.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from apr_cli.data.shards import ShardBatchSource
from apr_cli.distill.checkpoints import load_latest_checkpoint
from apr_cli.distill.evaluate import evaluate
from apr_cli.distill.losses import distill_loss
from apr_cli.distill.on_policy import sequences_batch
from apr_cli.distill.run import model_from_state
from apr_cli.model.checkpoint import load_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.generate import generate_batch

SEQ_LEN = 128
VAL_WINDOWS = 256  # evenly spread over val/ (1,209 windows in all)
PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 64, 64  # val windows' first 64 tokens, 64 sampled


def kl_on_own_samples(student, teacher, val: ShardBatchSource) -> dict[str, float]:
    """Mean per-token KL between student and teacher on the student's own continuations
    (T = 1) of fixed validation prompts, sampled with a fixed seed."""
    step = val.windows_per_epoch(SEQ_LEN) // PROMPTS
    prompts = [val.window(k * step, SEQ_LEN)[:PROMPT_LEN].tolist() for k in range(PROMPTS)]
    g = torch.Generator().manual_seed(0)
    new = generate_batch(student, prompts, NEW_TOKENS, temperature=1.0, generator=g)
    inputs, labels = sequences_batch(prompts, new)
    out = {}
    with torch.inference_mode():
        s, t = student.hidden_states(inputs), teacher.hidden_states(inputs)
        for kind in ("reverse-kl", "forward-kl"):
            parts = distill_loss(s, student.output_weight, t, teacher.output_weight, labels,
                                 kind=kind, temperature=1.0, alpha=1.0)  # fmt: skip
            out[kind] = float(parts.kd)
        # How likely the teacher finds the student's tokens: its NLL of them.
        out["teacher_nll"] = float(
            distill_loss(t, teacher.output_weight, None, None, labels, alpha=0.0).ce
        )
    return out


def trained_student(run: Path, manifest: dict):
    """The saved student, or for a run stopped early the one in its newest checkpoint."""
    if (run / "student-trained.apr").is_dir():
        return load_model(str(run / "student-trained.apr"), dtype=torch.float32)[0]
    _, checkpoint = load_latest_checkpoint(run)
    config = ModelConfig.from_hf(manifest["student"]["config"])
    return model_from_state(config, checkpoint["pipeline"]["student"])


def main(out: Path, data: Path, teacher_path: str) -> None:
    teacher, _ = load_model(teacher_path, dtype=torch.float32)
    val = ShardBatchSource(data / "val")
    rows = []
    for run in sorted(out.glob("on-policy-*"), key=lambda p: float(p.name.split("-")[-1])):
        manifest = json.loads((run / "dispatch.json").read_text())
        steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        student = trained_student(run, manifest)
        sampled = [m for m in steps if m["sample_s"] > 0]
        sample_s = sum(m["sample_s"] for m in sampled)
        generated = (
            sum(m["generated"] for m in sampled) * manifest["options"]["train"]["batch_size"]
        )
        rows.append(
            {
                "run": run.name,
                "on_policy_fraction": manifest["options"]["on_policy"]["on_policy_fraction"],
                "steps": len(steps),
                "sampled_steps": len(sampled),
                "status": manifest["status"],
                "wall_s": manifest["wall_time_s"],
                "sec_per_step": manifest["sec_per_step"],
                "sampling_share": sample_s / sum(m["sec_per_step"] for m in steps),
                "sampling_tokens_per_s": generated / sample_s if sample_s else None,
                "val_loss": evaluate(student, val, seq_len=SEQ_LEN, windows=VAL_WINDOWS).loss,
                **{
                    f"own_samples_{k}": v
                    for k, v in kl_on_own_samples(student, teacher, val).items()
                },
            }
        )
    teacher_val = evaluate(teacher, val, seq_len=SEQ_LEN, windows=VAL_WINDOWS).loss
    (out / "results.json").write_text(
        json.dumps({"teacher_val_loss": teacher_val, "runs": rows}, indent=2)
    )
    print(f"teacher val loss {teacher_val:.4f} ({VAL_WINDOWS} val windows of {SEQ_LEN})\n")
    print(
        "| --on-policy | steps (sampled), status | val loss | KL(s‖t) own | KL(t‖s) own "
        "| teacher NLL own | wall s | s/step | sampling share | sampling tok/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tps = "" if r["sampling_tokens_per_s"] is None else f"{r['sampling_tokens_per_s']:,.0f}"
        print(
            f"| {r['on_policy_fraction']:g} | {r['steps']} ({r['sampled_steps']}), {r['status']} | "
            f"{r['val_loss']:.4f} | "
            f"{r['own_samples_reverse-kl']:.4f} | {r['own_samples_forward-kl']:.4f} | "
            f"{r['own_samples_teacher_nll']:.4f} | {r['wall_s']:.0f} | {r['sec_per_step']:.3f} | "
            f"{r['sampling_share']:.0%} | {tps} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
