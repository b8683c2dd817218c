"""Does a bulk L2 prefetch of a weight, issued before a stretch of latency-bound work, make the GEMV after it faster?

For each FP8 weight: L2 emptied of it (a read of 256 MB, so no dirty lines are left to write back), then a 20 us
GPU sleep standing for a chain of small kernels, then the W8A16 GEMV (M = 1), timed with events. `cold`: nothing
else; `same`: `l2_prefetch` of the weight's codes and scales on the same stream before the sleep; `side`: on a second
stream beside the sleep. Run on the GPU machine: python3 scripts/l2_prefetch_probe.py
"""
import statistics

import torch

from dsv4.checkpoint.formats import quantize_fp8_block
from dsv4_kernels.fp8_gemm import prepare_fp8_weight, fp8_linear
from dsv4_kernels.l2_prefetch import l2_prefetch
dev = torch.device("cuda")
flush = torch.ones(128 << 20, dtype=torch.bfloat16, device=dev)
res = {}
for (n, k) in [(4096, 8192), (32768, 1024), (4096, 2048)]:
    w = prepare_fp8_weight(quantize_fp8_block(torch.randn(n, k, device=dev) * 0.02, ue8m0_scale=True), dev)
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    y = fp8_linear(x, w)
    mb = (w.codes.numel() * w.codes.element_size() + w.scales.numel() * w.scales.element_size()) / 1e6
    side = torch.cuda.Stream()
    def run(mode, cfg, sleep_us=20):
        ts = []
        for _ in range(25):
            flush.sum()
            s0, s1, e0, e1 = (torch.cuda.Event(enable_timing=True) for _ in range(4))
            cur = torch.cuda.current_stream()
            if mode == "side":
                side.wait_stream(cur)
                with torch.cuda.stream(side):
                    s0.record(); l2_prefetch(w.codes, *cfg); l2_prefetch(w.scales, *cfg); e0.record()
            elif mode == "same":
                s0.record(); l2_prefetch(w.codes, *cfg); l2_prefetch(w.scales, *cfg); e0.record()
            torch.cuda._sleep(int(sleep_us * 1755))
            if mode == "side":
                cur.wait_stream(side)
            s1.record(); fp8_linear(x, w, out=y); e1.record()
            torch.cuda.synchronize()
            ts.append((s1.elapsed_time(e1) * 1e3, s0.elapsed_time(e0) * 1e3 if mode != "cold" else 0))
        return statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
    cold, _ = run("cold", None)
    line = f"W {n}x{k} {mb:.1f} MB: cold GEMV {cold:.1f} us (floor {mb/2.98e-3*1e-3:.1f})"
    for cfg in [(8192, 32), (32768, 128)]:
        for mode in ("same", "side"):
            g, p = run(mode, cfg)
            line += (f"\n   {mode} {cfg}: GEMV after prefetch {g:.1f} us ({cold / g:.2f}x faster), "
                     f"prefetch kernel {p:.1f} us")
    print(line, flush=True)
