#!/usr/bin/env bash
# The reduced comparison that fit the time left on a shared, loaded 2-core machine: the same
# data, teacher and KD settings as commands.sh (seq_len 128, batch 16, lr 8e-4, seed 0, T=1,
# alpha=0.9, every validation window), but 100 steps over the first 1,600 windows in order (no
# --shuffle), so a top-k cache of windows 0:1600 (205k tokens) covers the run. Three students:
# online KD, KD from the top-k cache (K=32), CE only.
# Usage: reduced.sh OUT (OUT/data and OUT/teacher from commands.sh).
set -euo pipefail
out=$1
apr=${APR:-apr}
data=$out/data
teacher=$out/teacher/student-trained.apr
common=(--dataset "$data/train" --seq-len 128 --batch-size 16 --steps 100 --lr 8e-4 --seed 0
    --save-every 0 --overwrite)
kd=(--student tiny-student --temperature 1.0 --alpha 0.9)
evaluate() { "$apr" eval "$1" --dataset "$data/val" --seq-len 128 --windows 0 --json >"$2"; }

"$apr" distill --teacher "$teacher" "${kd[@]}" "${common[@]}" --out "$out/r-kd" >"$out/r-kd.log" 2>&1 &
"$apr" train --model tiny-student "${common[@]}" --out "$out/r-ce" >"$out/r-ce.log" 2>&1 &
python -m torch.distributed.run --standalone --nproc-per-node 2 -m apr_cli teacher-cache build \
    --teacher "$teacher" --dataset "$data/train" --seq-len 128 --kind topk --top-k 32 \
    --temperature 1.0 --windows 0:1600 --shard-windows 400 --out "$out/r-cache-topk" --device cpu
"$apr" teacher-cache inspect "$out/r-cache-topk" --json >"$out/r-cache-topk.json"
"$apr" distill --teacher-cache "$out/r-cache-topk" "${kd[@]}" "${common[@]}" \
    --out "$out/r-kd-topk" >"$out/r-kd-topk.log" 2>&1
wait
for run in r-kd r-kd-topk r-ce; do evaluate "$out/$run/student-trained.apr" "$out/eval-$run.json"; done
echo done
