"""The sparse attention decode at real V4 dims (64 heads, d 512, top-k 512, window 128), five calls, as a target for
ncu / nsys (on the GPU machine, after gpu_env.sh):
    python3 scripts/attention_once.py csa|hca|window CTX BATCH [variant]
variant: as `dsv4 bench attention --variants` (auto, sync:m32, wg:n32:st4, ...); e.g.
    ncu --kernel-name regex:SparseDecode --launch-skip 2 --launch-count 1 python3 scripts/attention_once.py csa 8192 64"""
import sys

import torch

from dsv4.bench_attention_cmd import KIND_RATIO, make_case, parse_variant
from dsv4.ops.cute_attention import plan_for, prepare_sparse_attention

kind, ctx, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
var = parse_variant(sys.argv[4] if len(sys.argv) > 4 else "auto")
ratio = KIND_RATIO.get(kind, 0)
case = make_case([ctx - 1] * batch, [1] * batch, 64, 512, ratio, poison=False)
f, _ = prepare_sparse_attention(case.q, case.cache, ratio, 128, case.topk, case.sink, case.scale, case.batch,
                                plan_for(case.batch, case.q.device), var["num_splits"], var["heads_cta"],
                                var["part_bf16"], var["block_n"], var["stages"], var["wgmma"], var["cluster"])
for _ in range(5):
    f()
torch.cuda.synchronize()
print("done", kind, ctx, batch, var["name"], "splits", f.splits, "wgmma", f.wgmma, "cluster", f.cluster)
