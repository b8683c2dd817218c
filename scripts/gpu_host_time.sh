#!/usr/bin/env bash
# Engine host time on the GPU (gpu-bundle parts applied; carry .gpu/tvmffi): the `small` checkpoint, cute ops, one
# batch of greedy requests at each of $BATCHES, then a cProfile of the engine thread at the last batch size.
#   bash scripts/gpu_host_time.sh            logs in $OUT/host_time_*.log
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
ckpt=${CHECKPOINT:-/tmp/dsv4-small}
[ -f "$ckpt/config.json" ] || python3 -m dsv4.cli make-checkpoint --preset small --out "$ckpt" --quiet
last=1
for b in ${BATCHES:-1 32}; do
  python3 scripts/engine_host_time.py --checkpoint "$ckpt" --device cuda --backend cute --batch "$b" --tokens 64 \
    --warmup 2 --prompt-repeat 4 ${HOST_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/host_time_b$b.log" | tail -3
  last=$b
done
python3 scripts/engine_host_time.py --checkpoint "$ckpt" --device cuda --backend cute --batch "$last" --tokens 64 \
  --warmup 2 --prompt-repeat 4 --profile ${HOST_ARGS:-} > "$OUT/host_profile_b$last.log" 2>&1
grep -v Warning "$OUT/host_profile_b$last.log" | grep -A45 "tottime" | tail -46 | cut -c1-160
