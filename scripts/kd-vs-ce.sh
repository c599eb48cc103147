#!/usr/bin/env bash
# Does distillation help? On the Python standard library: train a teacher with `apr train`
# (seeded with the first seed), then per seed the same student (same init, batches and steps)
# once with `apr distill` from that teacher and once with `apr train` on the labels alone;
# `apr eval` all of them on held-out files; print the table (scripts/kd-vs-ce-table.py).
# With TEACHER_CACHE, also per seed a student distilled from a teacher cache of each kind
# (docs/teacher-cache.md). See docs/experiment.md.
#
# Usage: scripts/kd-vs-ce.sh OUT_DIR [SEED...]          (seeds default to 0 1)
# Environment:
#   SIZE=full|tiny   full: the documented experiment; tiny: seconds, for the tests
#   CORPUS=DIR       .py files to use instead of the standard library
#   EVIDENCE=DIR     also copy the small files (manifests, logs, evals, table) there
#   TEMPERATURE, ALPHA   the KD settings (default 1.0 and 0.9)
#   TEACHER_CACHE="topk hidden"   cache kinds (either or both): after the teacher, build its cache
#                    of every training window (apr teacher-cache build, top-k at K=32), then per
#                    seed one more KD student from each cache, same settings as the online one
#   APR, PYTHON      the apr command and the Python that finds the standard library
#   PLAN_ONLY=1      print the plan (what runs, how many steps, rough time) and stop
# apr lets idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE), so a machine shared with other
# jobs does not stall the runs; the runs in evidence/kd-vs-ce used OMP_NUM_THREADS=1 instead.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0"
    exit 2
fi
out=$1
shift
seeds=("$@")
[[ ${#seeds[@]} -gt 0 ]] || seeds=(0 1)
for seed in "${seeds[@]}"; do
    if [[ ! $seed =~ ^[0-9]+$ ]]; then
        echo "error: seeds are non-negative integers, got ${seed}" >&2
        exit 2
    fi
done
apr=${APR:-apr}
python=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Both models are the built-in presets (vocab 512), so the tokenizer is a BPE of that size:
# tiny-teacher is 4 layers at hidden 256 (3.1M params), tiny-student 2 layers at 128 (0.4M).
vocab=512
case ${SIZE:-full} in
    full)
        seq_len=128 batch=16 teacher_steps=1500 teacher_lr=2e-3
        student_steps=400 student_lr=8e-4 eval_windows=0 val_fraction=0.05
        teacher_s=550 seed_s=110 # measured on an idle 2-core CPU (evidence/kd-vs-ce)
        ;;
    tiny)
        seq_len=32 batch=4 teacher_steps=30 teacher_lr=3e-3
        student_steps=12 student_lr=3e-3 eval_windows=16 val_fraction=0.25
        teacher_s=10 seed_s=20 # mostly starting apr (importing torch) 5 times
        ;;
    *)
        echo "error: SIZE must be full or tiny, got ${SIZE}" >&2
        exit 2
        ;;
esac
# Chosen on this train/val split; docs/experiment.md lists what else was tried.
temperature=${TEMPERATURE:-1.0}
alpha=${ALPHA:-0.9}
read -ra caches <<<"${TEACHER_CACHE:-}"
for kind in "${caches[@]}"; do
    if [[ $kind != topk && $kind != hidden ]]; then
        echo "error: TEACHER_CACHE kinds are topk and hidden, got ${kind}" >&2
        exit 2
    fi
done

corpus=${CORPUS:-$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}
start=$SECONDS

# The library's .py files without site-packages and test suites, in a fixed order keyed by a
# hash of each relative path: training batches and the evenly spread validation files then come
# from the whole library, not from its alphabetically first packages.
mapfile -t files < <("$python" - "$corpus" <<'PY'
import hashlib
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
paths = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1])]
for p in sorted(paths, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).digest()):
    print(p)
PY
)
if [[ ${#files[@]} -eq 0 ]]; then
    echo "error: no .py files under ${corpus}" >&2
    exit 2
fi

# The plan and each phase go to stderr (stdout is the table).
data=$out/data
say() { echo "kd-vs-ce: $*" >&2; }
# Rough time on an idle 2-core CPU: BPE and shards at ~40 s for the standard library's 12 MB.
shards_s=0
if [[ ! -f $data/val/meta.json ]]; then
    shards_s=$(($(cat "${files[@]}" | wc -c) * 40 / 12000000))
fi
total_s=$((shards_s + teacher_s + ${#seeds[@]} * seed_s))
say "plan (SIZE=${SIZE:-full}): ${#files[@]} .py files from ${corpus}, seeds ${seeds[*]}"
say "  1. shards in ${data}: BPE vocab ${vocab}, ${val_fraction} held out (kept if built)"
say "  2. teacher: apr train tiny-teacher, ${teacher_steps} steps of ${batch} x ${seq_len}, evaluated"
[[ ${#caches[@]} -eq 0 ]] || say "     and its cache (${caches[*]}) of every training window"
say "     (one already in ${out}/teacher is kept, or continued if it was stopped)"
say "  3. per seed: apr distill (T=${temperature}, alpha=${alpha}) and apr train,"
say "     ${student_steps} steps each, both evaluated"
say "  4. the table of validation losses"
say "  rough time on an idle 2-core CPU: $(((total_s + 59) / 60)) min (shards ${shards_s} s," \
    "teacher ${teacher_s} s, ${seed_s} s per seed)"
[[ ${PLAN_ONLY:-} == 1 ]] && exit 0
mkdir -p "$out"

# A file is wholly in train or in val (the builder splits by document).
say "1. shards"
if [[ ! -f $data/val/meta.json ]]; then
    "$apr" shards build "${files[@]}" --out "$data" --train-bpe "$vocab" \
        --val-fraction "$val_fraction" --force
fi

# Shuffled windows (seeded by --seed): consecutive windows of one file make correlated batches.
common=(--dataset "$data/train" --shuffle --seq-len "$seq_len" --batch-size "$batch"
    --save-every 0 --overwrite)
evaluate() { # MODEL JSON_OUT
    "$apr" eval "$1" --dataset "$data/val" --seq-len "$seq_len" --windows "$eval_windows" \
        --json >"$2"
}

# A teacher already in OUT is kept if it completed ("nothing to do") and continued if it was
# stopped, so the script can run again on the same OUT (say, with TEACHER_CACHE) without
# retraining it. Another SIZE needs another OUT.
say "2. training the teacher"
if [[ -f $out/teacher/dispatch.json ]]; then
    "$apr" train --resume "$out/teacher" --steps "$teacher_steps"
else
    "$apr" train --model tiny-teacher "${common[@]}" --steps "$teacher_steps" \
        --lr "$teacher_lr" --seed "${seeds[0]}" --out "$out/teacher"
fi
teacher=$out/teacher/student-trained.apr
evaluate "$teacher" "$out/eval-teacher.json"
# The students read shuffled windows from the whole epoch, so a cache holds all of them.
cache_info=()
for kind in "${caches[@]}"; do
    say "2. teacher cache (${kind})"
    "$apr" teacher-cache build --teacher "$teacher" --dataset "$data/train" --seq-len "$seq_len" \
        --kind "$kind" --temperature "$temperature" --out "$out/cache-$kind"
    "$apr" teacher-cache inspect "$out/cache-$kind" --json >"$out/cache-$kind.json"
    cache_info+=("cache-$kind.json")
done
for seed in "${seeds[@]}"; do
    run=$out/seed-$seed
    say "3. seed ${seed}: distilled and cross-entropy students"
    # The same preset student, seeded alike, on the same batches for the same steps.
    "$apr" distill --teacher "$teacher" --student tiny-student "${common[@]}" \
        --steps "$student_steps" --lr "$student_lr" --seed "$seed" \
        --temperature "$temperature" --alpha "$alpha" --out "$run/kd"
    "$apr" train --model tiny-student "${common[@]}" --steps "$student_steps" \
        --lr "$student_lr" --seed "$seed" --out "$run/ce"
    for kind in "${caches[@]}"; do
        "$apr" distill --teacher-cache "$out/cache-$kind" --student tiny-student "${common[@]}" \
            --steps "$student_steps" --lr "$student_lr" --seed "$seed" \
            --temperature "$temperature" --alpha "$alpha" --out "$run/kd-$kind"
    done
    for role in kd ce "${caches[@]/#/kd-}"; do
        evaluate "$run/$role/student-trained.apr" "$run/eval-$role.json"
    done
done

say "4. table"
seed_list=$(IFS=,; echo "${seeds[*]}")
printf '{"size": "%s", "seeds": [%s], "files": %d, "wall_s": %d}\n' \
    "${SIZE:-full}" "$seed_list" "${#files[@]}" $((SECONDS - start)) >"$out/experiment.json"
"$python" "$here/kd-vs-ce-table.py" "$out" | tee "$out/table.md"

if [[ -n ${EVIDENCE:-} ]]; then
    evidence=$(mkdir -p "$EVIDENCE" && cd "$EVIDENCE" && pwd)
    (
        cd "$out"
        cp --parents experiment.json table.md data/train/meta.json data/val/meta.json \
            eval-teacher.json teacher/dispatch.json teacher/launch-victory.txt \
            teacher/metrics.jsonl seed-*/eval-*.json seed-*/*/dispatch.json \
            seed-*/*/launch-victory.txt seed-*/*/metrics.jsonl \
            "${cache_info[@]}" "$evidence"
    )
fi
