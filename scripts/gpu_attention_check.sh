#!/usr/bin/env bash
# One-call GPU check of the CuTe attention-side kernels (run on the device machine from the repo root after the
# gpu-bundle parts are applied):  bash scripts/gpu_attention_check.sh [tests] [bench] [sweep] [indexer] [ptxas]
# Logs and JSON go to $OUT (default ./gpu_out). Unpacks the wheels in .gpu/tvmffi/whl (apache-tvm-ffi, pytest).
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import tvm_ffi; print('tvm_ffi', tvm_ffi.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
steps=${*:-tests bench sweep indexer}
REPS=${REPS:-15}
for step in $steps; do
  t0=$(date +%s)
  case $step in
    tests)
      timeout ${T_TESTS:-240} python3 -m pytest -q -rA --maxfail=6 -m gpu tests/gpu/test_attention.py \
        tests/gpu/test_indexer.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_attention.log" \
        | grep -E "passed|failed|error|Error|assert" | tail -30 ;;
    bench)   # the decode table: default plan and the previous one (m64), SDPA, host costs
      timeout ${T_BENCH:-170} python3 -m dsv4.cli bench attention --reps $REPS --variants ${BENCH_VARIANTS:-auto m64} \
        --json "$OUT/bench_attention.json" > "$OUT/bench_attention.log" 2>&1; tail -3 "$OUT/bench_attention.log" ;;
    sweep)   # head-group and split variants at 64k context
      timeout ${T_SWEEP:-120} python3 -m dsv4.cli bench attention --reps $REPS --ctx 65536 --batch 16 64 \
        --kinds hca csa --no-sdpa --no-host \
        --variants ${SWEEP_VARIANTS:-auto m64 m64:bf16 m16 m16:st3 m32:s2 m32:bf16} \
        --json "$OUT/sweep_attention.json" > "$OUT/sweep_attention.log" 2>&1; tail -2 "$OUT/sweep_attention.log" ;;
    indexer)
      timeout ${T_INDEXER:-90} python3 -m dsv4.cli bench attention --indexer --reps $REPS --ctx 8192 65536 \
        --batch 1 16 64 --json "$OUT/bench_indexer.json" > "$OUT/bench_indexer.log" 2>&1
      tail -2 "$OUT/bench_indexer.log" ;;
  esac
  echo "step $step: $(( $(date +%s) - t0 )) s"
done
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
for name in ("bench_attention.json", "sweep_attention.json", "bench_indexer.json"):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        continue
    print("==", name)
    for r in json.load(open(p)):
        if "op" in r:
            print(f"idx ctx={r['ctx']:>6} B={r['batch']:>2} {r['us']:>8.1f}us {r['pct_hbm']:>5.1f}% torch={r['torch_us']:>8.1f} host={r['host_us']}")
        else:
            extra = f" call={r.get('call_us')} dl={r.get('call_us_dlpack')} plan={r.get('plan_us')}" if "call_us" in r else ""
            print(f"{r['kind']} ctx={r['ctx']:>6} B={r['batch']:>2} {r['variant']:>7} s={r['splits']:>2} {r['us']:>7.1f}us {r['pct_hbm']:>5.1f}% sdpa={r['sdpa_us']}{extra}")
PY
