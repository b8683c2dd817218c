#!/usr/bin/env bash
# Issue-7 style end-to-end check on a GPU machine with the gpu-bundle applied (p1, p2, p3 with --triton):
#   bash scripts/gpu_check.sh OUT_DIR [gpu_check.py flags]
# Carry .gpu/tvmffi and .gpu/mpl too (tvm-ffi launch path; matplotlib for the PNG).
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
out=${1:-$OUT}; shift || true
python3 scripts/gpu_check.py "$out" "$@"
