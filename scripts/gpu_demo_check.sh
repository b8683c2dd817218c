#!/usr/bin/env bash
# Issue-8 check on a GPU machine (gpu-bundle parts p1, p2 applied; carry .gpu/tvmffi): the embedded demo
# checkpoint answers the same fresh task instances through the engine with CuTe DSL ops as with torch ops.
#   bash scripts/gpu_demo_check.sh [N]
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
n=${1:-200}
for b in torch cute; do
  python3 scripts/eval_demo.py --checkpoint checkpoints/demo --n "$n" --backend "$b" --device cuda \
    --json "$OUT/demo_$b.json" 2>&1 | grep -v -i warn | tail -6
done
python3 - "$OUT/demo_torch.json" "$OUT/demo_cute.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
ra, rb = a["items"], b["items"]
assert [x["prompt"] for x in ra] == [y["prompt"] for y in rb], "different instances"
same = sum(x["output"] == y["output"] for x, y in zip(ra, rb))
print(f"cute vs torch: {same}/{len(ra)} identical answers")
PY
