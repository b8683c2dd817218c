"""How much of a PDL-launched FP8 GEMV's weight stream does its early start (loads issued before
griddepcontrol.wait) take off the time after its predecessor ends?

A one-CTA spin kernel lets its dependents launch at its start and then spins SPIN_US microseconds: it stands for
the latency-bound chain (attention, combine) in front of wo_a. CUDA graphs of 4 (spin, GEMV) pairs, each GEMV on its
own copy of the weight (4 x 33.5 MB, so no GEMV finds its weight in the 50 MB L2), against graphs of the 4 spins
alone: pair - spin (per call) is the GEMV's time after its predecessor's end. `alone` is the GEMVs without spins.
Timed with dsv4.bench_cmd.time_ms (graphs of 4 calls, median of 30 replays).
Per plan (splits, unroll) and CTAs an SM (min_ctas), with and without PDL.
Run on the GPU machine (bundle applied): python3 scripts/gemv_pdl_probe.py
"""
import itertools
import os

import torch

import cutlass.cute as cute
from cutlass import Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

import dsv4_kernels.fp8_gemm as F
import dsv4_kernels.pdl as pdl
from dsv4.bench_cmd import time_ms
from dsv4.checkpoint.formats import quantize_fp8_block
from dsv4_kernels.nvfp4_gemm import _call, _fake, _options, _stream_arg

SPIN_US = float(os.environ.get("SPIN_US", "8"))
dev = torch.device("cuda")


@dsl_user_op
def _globaltimer(*, loc=None, ip=None) -> Int64:
    return Int64(llvm.inline_asm(T.i64(), [], "mov.u64 $0, %globaltimer;", "=l", has_side_effects=True,
                                 loc=loc, ip=ip))


class _Spin:
    @cute.kernel
    def kernel(self, mDummy: cute.Tensor, ns: Int32):
        cute.arch.griddepcontrol_launch_dependents()
        t0 = _globaltimer()
        t = t0
        while t - t0 < Int64(ns):
            t = _globaltimer()

    @cute.jit
    def launch(self, mDummy: cute.Tensor, ns: Int32, stream):     # a tensor: TVM FFI finds the stream by it
        self.kernel(mDummy, ns).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream)


spin = cute.compile(_Spin().launch, _fake(Int32, (1,), 4), Int32(1), _stream_arg(), options=_options())


def per_call_us(f) -> float:
    """Per call, in a CUDA graph of 4 calls whose call i takes f(i) (weight copy i % 4)."""
    calls = itertools.count()
    return time_ms(lambda: f(next(calls) % 4), reps=30, inner=4) * 1e3


SHAPES = {"wo_a": (8192, 4096, 8), "wo_b": (4096, 8192, 1), "wq_b": (32768, 1024, 1)}
PLANS = {"wo_a": [(4, 8, 4), (4, 8, 0), (2, 8, 0), (8, 8, 0), (4, 4, 0), (4, 2, 0)],
         "wo_b": [(8, 8, 0), (8, 8, 4), (4, 8, 0), (16, 8, 0)],
         "wq_b": [(1, 8, 0), (1, 8, 4), (1, 4, 0), (1, 16, 0)]}
ns = int(SPIN_US * 1000)
dummy = torch.zeros(1, dtype=torch.int32, device=dev)
t_spin = per_call_us(lambda i: _call(spin, dummy, ns))
print(f"spin {SPIN_US} us: {t_spin:.1f} us a call", flush=True)
for name, (n, k, groups) in SHAPES.items():
    ws = [F.prepare_fp8_weight(quantize_fp8_block(torch.randn(n, k, device=dev) * 0.02, ue8m0_scale=True), dev,
                               groups=groups) for _ in range(4)]
    x = torch.randn(1, groups * k, device=dev, dtype=torch.bfloat16)
    ys = [torch.empty(1, n, device=dev, dtype=torch.bfloat16) for _ in range(4)]
    mb = ws[0].codes.numel() * 4 / 1e6
    for splits, unroll, min_ctas in PLANS[name]:
        F.MIN_CTAS_PER_SM, F.GROUPED_ONLY = min_ctas, False
        line = f"{name} {mb:.1f} MB plan ({splits}, {unroll}) min_ctas {min_ctas}:"
        for chain in (True, False):
            pdl.CHAIN = chain
            for w in ws:
                w.cache["plan"] = (splits, unroll, 0)
            alone = per_call_us(lambda i: F.fp8_linear(x, ws[i], out=ys[i]))
            after = per_call_us(lambda i: (_call(spin, dummy, ns), F.fp8_linear(x, ws[i], out=ys[i]))) - t_spin
            line += f" | pdl={int(chain)}: alone {alone:.1f} us, after spin {after:.1f} us ({after / alone:.2f})"
        print(line, flush=True)
