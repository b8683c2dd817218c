#!/usr/bin/env bash
# The engine under desynchronised arrivals on the GPU (gpu-bundle parts applied; carry .gpu/tvmffi): `small`,
# cute ops, scripts/staggered_load.py at each of $CONCURRENCY with $WAITS as max_waiting_steps ("auto": the
# engine's default), then a cProfile of the steps with prompt tokens at the first concurrency. Logs in $OUT.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
ckpt=${CHECKPOINT:-/tmp/dsv4-small}
[ -f "$ckpt/config.json" ] || python3 -m dsv4.cli make-checkpoint --preset small --out "$ckpt" --quiet
conc=(${CONCURRENCY:-32})
for c in "${conc[@]}"; do
  for w in ${WAITS:-auto}; do
    extra=""; [ "$w" = auto ] || extra="--max-waiting-steps $w"
    python3 scripts/staggered_load.py --checkpoint "$ckpt" --device cuda --backend cute --concurrency "$c" \
      --requests $((c * 8)) $extra ${STAGGER_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/staggered_c${c}_w$w.log" | head -5
  done
done
if [ "${PROFILE:-1}" = 1 ]; then
  python3 scripts/staggered_load.py --checkpoint "$ckpt" --device cuda --backend cute --concurrency "${conc[0]}" \
    --requests $((conc[0] * 8)) --profile ${STAGGER_ARGS:-} > "$OUT/staggered_profile.log" 2>&1
  grep -v Warning "$OUT/staggered_profile.log" | grep -B2 -A75 "cProfile of" | cut -c1-150
fi
