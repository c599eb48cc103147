#!/usr/bin/env bash
# Off-policy KD vs on-policy distillation at equal optimizer steps, on the kd-vs-ce setup
# (scripts/kd-vs-ce.sh's shards, teacher and student; docs/on-policy.md): the same student,
# seed and batches distilled with --on-policy 0 (corpus windows only), 0.5 and 1; then each
# student's validation loss and its KL to the teacher on text it generates itself
# (scripts/on-policy-table.py).
#
# Usage: scripts/on-policy-vs-kd.sh OUT_DIR DATA_DIR TEACHER
#   DATA_DIR   kd-vs-ce.sh's OUT/data (train/ and val/ shards)
#   TEACHER    kd-vs-ce.sh's OUT/teacher/student-trained.apr
# Environment: STEPS (200), SEED (0), MAX_NEW_TOKENS (64), FRACTIONS ("0 0.5 1"),
#   STUDENT (tiny-student, freshly initialised): the student to start from, e.g. a trained
#   student's folder, to compare the three on a student that already writes text;
#   EVIDENCE=DIR also copies the small files there; APR, PYTHON.
set -euo pipefail

if [[ $# -ne 3 ]]; then
    sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0"
    exit 2
fi
out=$1 data=$2 teacher=$3
apr=${APR:-apr}
python=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
steps=${STEPS:-200} seed=${SEED:-0} new=${MAX_NEW_TOKENS:-64} student=${STUDENT:-tiny-student}
mkdir -p "$out"

# kd-vs-ce.sh's student settings: 16 windows of 128 tokens, lr 8e-4, T = 1, alpha = 0.9.
for fraction in ${FRACTIONS:-0 0.5 1}; do
    "$apr" distill --teacher "$teacher" --student "$student" --dataset "$data/train" --shuffle \
        --seq-len 128 --batch-size 16 --steps "$steps" --lr 8e-4 --seed "$seed" \
        --temperature 1.0 --alpha 0.9 --save-every 0 --overwrite \
        --on-policy "$fraction" --max-new-tokens "$new" --out "$out/on-policy-$fraction"
done
"$python" "$here/on-policy-table.py" "$out" "$data" "$teacher" | tee "$out/table.md"

if [[ -n ${EVIDENCE:-} ]]; then
    mkdir -p "$EVIDENCE"
    (cd "$out" && cp --parents table.md results.json on-policy-*/dispatch.json \
        on-policy-*/launch-victory.txt on-policy-*/metrics.jsonl "$EVIDENCE")
fi
