"""The table of reduced.sh's comparison, from OUT's eval JSONs and manifests: table.py OUT."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
teacher = json.loads((out / "eval-teacher.json").read_text())
rows = [("teacher `tiny-teacher` (apr train, 600 steps)", "teacher", teacher)]
names = {
    "r-kd": "KD student, online teacher",
    "r-kd-topk": "KD student, top-k cache (K=32)",
    "r-ce": "CE student (apr train)",
}
for run, label in names.items():
    rows.append((label, run, json.loads((out / f"eval-{run}.json").read_text())))
print("| model | steps | train time (s) | step-1 loss | final train loss | val loss | val ppl |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label, run, ev in rows:
    if run == "teacher":
        m = json.loads((out / "teacher" / "dispatch.json").read_text())
    else:
        m = json.loads((out / run / "dispatch.json").read_text())
    print(
        f"| {label} | {m['steps']} | {m['wall_time_s']:.0f} | {m['initial_loss']:.4f} | "
        f"{m['final_loss']:.4f} | {ev['loss']:.4f} | {ev['perplexity']:.2f} |"
    )
kd = json.loads((out / "eval-r-kd.json").read_text())["loss"]
topk = json.loads((out / "eval-r-kd-topk.json").read_text())["loss"]
ce = json.loads((out / "eval-r-ce.json").read_text())["loss"]
cache = json.loads((out / "r-cache-topk.json").read_text())
print()
print(
    f"- top-k student's val loss vs the online-KD student's: {topk - kd:+.4f} nats/token "
    f"({(topk - kd) / kd * 100:+.2f}%; goal within 2%)"
)
print(
    f"- top-k student below the CE student: {'yes' if topk < ce else 'no'} "
    f"({topk:.4f} vs {ce:.4f}); online KD below CE: {'yes' if kd < ce else 'no'}"
)
print(
    f"- cache: {cache['bytes_per_token']} bytes/token, windows {cache['windows'][0]}.."
    f"{cache['windows'][1] - 1} ({cache['tokens']:,} tokens), "
    f"{cache['size_bytes'] / 2**20:.1f} MiB"
)
windows = json.loads((out / "eval-r-kd.json").read_text())["windows"]
print(f"- validation: {windows} windows of 128 tokens (all)")
