#!/usr/bin/env bash
# One-call GPU check of the decode CUDA graphs (device machine, repo root, gpu-bundle parts applied):
#   bash scripts/gpu_graphs_check.sh [tests] [small] [flash]
# tests: tests/gpu/test_cuda_graphs.py; small / flash: `dsv4 bench decode` on the `small` preset (7 layers) and on
# `flash-layers` (real V4-Flash dims, 4 layers), random weights drawn on the GPU. Logs and JSON in $OUT.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for step in ${*:-tests small flash}; do
  case $step in
    tests) timeout 500 python3 -m pytest -q -rA -m gpu ${TESTS:-tests/gpu/test_cuda_graphs.py} -p no:cacheprovider \
             2>&1 | tee "$OUT/pytest_graphs.log" | grep -v Warning | tail -25 ;;
    small) timeout 300 python3 -m dsv4.cli bench decode --preset small --layers 7 --context ${CONTEXT:-1024} \
             --json-out "$OUT/bench_decode_small.json" 2>&1 | tee "$OUT/bench_decode_small.log" | grep -v Warning | tail -20 ;;
    flash) timeout 400 python3 -m dsv4.cli bench decode --preset flash-layers --layers 4 --context ${CONTEXT:-1024} \
             --batches ${FLASH_BATCHES:-1,8,32} ${FLASH_ARGS:-} --json-out "$OUT/bench_decode_flash.json" 2>&1 \
             | tee "$OUT/bench_decode_flash.log" | grep -v Warning | tail -20 ;;
  esac
done
