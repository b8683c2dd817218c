"""The MoE decode ring kernels alone at V4-Flash T = 1 (6 of 256 experts, random NVFP4 weights), each timed inside a
CUDA graph of 40 calls with a different expert set per call (cold L2), for several ring depths / chunks per stage;
next to torch's plain read of the gate_up bytes (the peer) and the whole nvfp4_moe call.
Run on the GPU machine (bundle applied): python3 scripts/moe_ring_probe.py"""
import itertools

import torch

from dsv4.bench_cmd import time_ms
from dsv4.checkpoint.formats import quantize_nvfp4
from dsv4_kernels import nvfp4_moe as MO
from dsv4_kernels import nvfp4_moe_ring as R
from dsv4_kernels.nvfp4_gemm import _call
dev = "cuda"
E, D, I, k, T = 256, 4096, 2048, 6, 1
q1 = quantize_nvfp4(torch.randn(I, D, device=dev))
q2 = quantize_nvfp4(torch.randn(D, I, device=dev))
one = MO.prepare_nvfp4_experts([q1], [q2], [q1], dev)
ex = MO.PackedExperts(*(t.expand(E, *t.shape[1:]).contiguous()
                        for t in (one.w13_codes, one.w13_scales, one.w2_codes, one.w2_scales)),
                      one.alphas.expand(E, 3).contiguous(), E, D, I)
N = 40
g = torch.Generator(device=dev).manual_seed(0)
ids = [torch.randperm(E, device=dev, generator=g)[:k].view(1, k) for _ in range(N)]
w = torch.rand(1, k, device=dev) + 0.1
x = torch.randn(T, D, device=dev).to(torch.bfloat16)
bw_bytes = k * ex.expert_bytes()
gu_bytes = k * (ex.w13_codes[0].numel() * 4 + ex.w13_scales[0].numel() * 2)
dn_bytes = k * (ex.w2_codes[0].numel() * 4 + ex.w2_scales[0].numel() * 2)
print("MB per call", bw_bytes / 1e6, "gate_up", gu_bytes / 1e6, "down", dn_bytes / 1e6)

def graph_time(f) -> float:
    """Per call, in a CUDA graph of N calls whose call i takes f(i) (expert set i)."""
    calls = itertools.count()
    return time_ms(lambda: f(next(calls) % N), reps=5, inner=N) * 1e3


A = k
h = torch.empty((A, I), dtype=torch.bfloat16, device=dev)
yp = torch.empty((1, A, D), dtype=torch.float32, device=dev)
xi = x.view(torch.int32).view(T, D // 16, 8)
wts = w.reshape(-1).float().contiguous()
hi = h.view(torch.int32).view(A, I // 16, 8)
idsf = [i.reshape(-1).contiguous() for i in ids]
peer_bufs = [torch.ones(gu_bytes // 2, dtype=torch.bfloat16, device=dev) for _ in range(3)]
print("read peer gate_up bytes us %.1f" % graph_time(lambda i: peer_bufs[i % 3].sum(dtype=torch.float32)))
for st, dst, u in [(4, 4, 4), (6, 6, 4), (8, 8, 4), (4, 4, 2), (3, 3, 8), (8, 4, 2)]:
    f1 = R.compile_decode_ring("gateup_h", E, 2 * I, D, 1, 1, k, u=u, stages=st)
    f2 = R.compile_decode_ring("down", E, D, I, 1, 1, k, u=u, stages=dst, pdl=True)
    tg = graph_time(lambda i: _call(f1, ex.w13_codes, ex.w13_scales, idsf[i], xi, wts, ex.alphas, h, A, 10.0))
    td = graph_time(lambda i: _call(f2, ex.w2_codes, ex.w2_scales, idsf[i], hi, wts, ex.alphas, yp, A, 10.0))
    def both(i):
        _call(f1, ex.w13_codes, ex.w13_scales, idsf[i], xi, wts, ex.alphas, h, A, 10.0)
        _call(f2, ex.w2_codes, ex.w2_scales, idsf[i], hi, wts, ex.alphas, yp, A, 10.0)
    tb = graph_time(both)
    print(f"stages {st}/{dst} u{u}: gate_up {tg:.1f} us ({gu_bytes / tg / 1e6:.2f} TB/s), down {td:.1f} us "
          f"({dn_bytes / td / 1e6:.2f} TB/s), both {tb:.1f} us ({(gu_bytes + dn_bytes) / tb / 1e6:.2f} TB/s)", flush=True)
print("full nvfp4_moe us %.1f" % graph_time(lambda i: MO.nvfp4_moe(x, ids[i], w, ex, 10.0)))
