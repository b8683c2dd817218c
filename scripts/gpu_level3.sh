#!/usr/bin/env bash
# Level-3 check on a Hopper GPU (after the gpu-bundle parts are applied): the engine with CuTe DSL ops against the
# engine with torch ops on the `small` checkpoint (generated here: it is 330 MB, too big to carry).
#   bash scripts/gpu_level3.sh [STEPS] [PROMPT_LENS...]
#   PAIR=torch:2048,torch:61 bash scripts/gpu_level3.sh ...   # the control: torch against itself, other chunking
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
steps=${1:-64}; shift || true
lens=${*:-17 300 2100}
[ -d /tmp/small ] || python3 -m dsv4.cli make-checkpoint --preset small --out /tmp/small --quiet
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
pair=${PAIR:-torch:2048,cute:2048}
tag=$(echo "$pair" | tr ':,' '-_')
python3 scripts/compare_backends.py --checkpoint /tmp/small --steps "$steps" --prompt-lens $lens --pair "$pair" \
  --json "$OUT/level3_small_${steps}_${tag}.json" 2>&1 | tee "$OUT/level3_small_${steps}_${tag}.log" | grep -v Warning | tail -30
