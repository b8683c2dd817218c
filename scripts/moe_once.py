"""The NVFP4 MoE at real V4 dims, five calls, as a target for ncu / nsys (on the GPU machine, after gpu_env.sh):
    python3 scripts/moe_once.py flash|pro TOKENS auto|chain|fused|sorted|GxD
e.g. ncu --kernel-name regex:Decode --launch-skip 8 --launch-count 4 python3 scripts/moe_once.py flash 1 chain"""
import sys

import torch

from dsv4.checkpoint.formats import quantize_nvfp4
from dsv4_kernels import nvfp4_moe as MO

model, T, variant = sys.argv[1], int(sys.argv[2]), sys.argv[3]
D, I, E, k = {"flash": (4096, 2048, 256, 6), "pro": (7168, 3072, 384, 6)}[model]
q1 = quantize_nvfp4(torch.randn(I, D, device="cuda"))
q2 = quantize_nvfp4(torch.randn(D, I, device="cuda"))
one = MO.prepare_nvfp4_experts([q1], [q2], [q1], "cuda")
ex = MO.PackedExperts(*(t.expand(E, *t.shape[1:]).contiguous() for t in
                        (one.w13_codes, one.w13_scales, one.w2_codes, one.w2_scales, one.alphas)), E, D, I)
x = torch.randn(T, D, device="cuda").to(torch.bfloat16)
ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)])
w = torch.rand(T, k, device="cuda")
MO._set_variant(variant)
for _ in range(5):
    MO.nvfp4_moe(x, ids, w, ex, 10.0)
torch.cuda.synchronize()
print("done", model, T, variant)
