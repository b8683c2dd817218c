"""The BF16 decode GEMV (dsv4_kernels.bf16_gemv) against cuBLAS (torch's x @ W^T) on the BF16 projections of V4-Flash
and V4-Pro, M = 1 and 8, cold L2 (the weight is one of enough copies to hold 3x the L2, taken in turn), both inside
one CUDA graph of 40 calls; roofline = weight bytes / time over the measured HBM copy bandwidth.
Run on the GPU machine (bundle applied): python3 scripts/bench_bf16_gemv.py [OUT.json]"""
import itertools
import json
import sys

import torch

from dsv4.bench_cmd import hbm_bandwidth, time_ms
from dsv4_kernels import bf16_gemv as B

SHAPES = {"flash": [("csa compressor wkv", 1024, 4096), ("hca compressor wkv", 512, 4096),
                    ("indexer compressor wkv", 256, 4096), ("indexer weights_proj", 64, 4096)],
          "pro": [("csa compressor wkv", 1024, 7168), ("hca compressor wkv", 512, 7168),
                  ("indexer compressor wkv", 256, 7168), ("indexer weights_proj", 64, 7168)]}
N = 40


def graph_us(f) -> float:
    """Per call, in a CUDA graph of N calls whose call i takes f(i) (the weight copies in turn)."""
    calls = itertools.count()
    return time_ms(lambda: f(next(calls)), reps=7, inner=N) * 1e3


bw = hbm_bandwidth()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
rows = []
print(f"HBM copy {bw / 1e9:.0f} GB/s; {torch.cuda.get_device_name()}")
for model, shapes in SHAPES.items():
    for name, n, k in shapes:
        nbytes = n * k * 2
        copies = max(2, -(-3 * l2 // nbytes))
        ws = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16) for _ in range(copies)]
        pws = [B.prepare_bf16_weight(w) for w in ws]
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            t_k = graph_us(lambda i: B.bf16_linear(x, pws[i % copies]))
            t_c = graph_us(lambda i: x @ ws[i % copies].T)
            row = dict(model=model, weight=name, n=n, k=k, m=m, mb=nbytes / 1e6, kernel_us=round(t_k, 2),
                       cublas_us=round(t_c, 2), speedup=round(t_c / t_k, 2),
                       kernel_hbm_frac=round(nbytes / (t_k * 1e-6) / bw, 3),
                       cublas_hbm_frac=round(nbytes / (t_c * 1e-6) / bw, 3), plan=B.bf16_gemv_plan(n, k))
            rows.append(row)
            print(f"{model:5} {name:24} {n:5d}x{k:<5d} M={m}: kernel {t_k:6.2f} us ({row['kernel_hbm_frac']:.0%} HBM)"
                  f"  cuBLAS {t_c:6.2f} us ({row['cublas_hbm_frac']:.0%})  x{row['speedup']:.2f}", flush=True)
        del ws, pws
if sys.argv[1:]:
    json.dump({"device": torch.cuda.get_device_name(), "hbm_GBps": bw / 1e9, "rows": rows}, open(sys.argv[1], "w"),
              indent=1)
