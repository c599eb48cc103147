#!/usr/bin/env bash
# The GPU figures in one go (< 8 minutes on one H100-class GPU): loss, step, a Qwen-shaped
# 0.5B <- 1.5B distill step (tokens/s, MFU, peak memory), generation cached vs uncached.
# Prints one table and writes it to $1 (default gpu-results.md). Run from the repository root
# with the project's environment active:  benchmarks/gpu.sh [OUT.md] [--peak-tflops N]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results.md}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 900 python benchmarks/bench_gpu.py --out "$out" "$@"
