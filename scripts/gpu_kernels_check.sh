#!/usr/bin/env bash
# One-call GPU check of the CuTe DSL kernels (run on the device machine from the repo root after the gpu-bundle
# parts are applied):  bash scripts/gpu_kernels_check.sh [tests|bench-gemm|bench-moe|all] ...
# Logs and JSON go to $OUT (default ./gpu_out). Unpacks the wheels in .gpu/tvmffi/whl (apache-tvm-ffi, pytest)
# when present.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import tvm_ffi; print('tvm_ffi', tvm_ffi.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
steps=${*:-all}
for step in $steps; do
  case $step in
    tests|all)
      timeout 420 python3 -m pytest -q -rA --maxfail=4 -m gpu ${TESTS:-tests/gpu} -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;&
    bench-gemm|all)
      timeout 400 python3 -m dsv4.cli bench gemm --json-out "$OUT/bench_gemm.json" ${GEMM_ARGS:-} 2>&1 | tee "$OUT/bench_gemm.log" | tail -80 ;;&
    bench-moe|all)
      timeout 300 python3 -m dsv4.cli bench moe --json-out "$OUT/bench_moe.json" ${MOE_ARGS:-} 2>&1 | tee "$OUT/bench_moe.log" | tail -40 ;;
  esac
done
