#!/usr/bin/env bash
# A/B of the decode-glue kernels (DSV4_CUTE_FUSED_GLUE=1 vs 0) on the small and flash-layers decode benches,
# with the per-kernel profile; logs and JSON in $OUT/glue and $OUT/base.
set -uo pipefail
. scripts/gpu_env.sh
base=$OUT
for v in glue base; do
  if [ $v = glue ]; then export DSV4_CUTE_FUSED_GLUE=1; else export DSV4_CUTE_FUSED_GLUE=0; fi
  echo "=== $v"
  OUT=$base/$v FLASH_ARGS="--profile --profile-stack" FLASH_BATCHES=${FLASH_BATCHES:-1,8,32} bash scripts/gpu_graphs_check.sh ${STEPS:-small flash}
done
