"""The SwiGLU activation between the shared expert's projections in one kernel: out = silu(gate) * up.

TorchOps._swiglu casts both projections to fp32, clamps them (gate from above, up both ways, when limit > 0), runs
silu, multiplies, and swiglu_mlp casts back: ~7 launches per call, one call per layer. Here gate, up [R, I] (bf16 or
fp32, the same dtype) and out [R, I] (bf16, or fp32 for an fp32 model), I a multiple of 8. The rows are treated as
one flat run of 8-channel vectors: one vector (16 bytes of bf16) per thread, 128-thread CTAs, so a decode batch of a
few rows still spreads over R * I / 1024 CTAs. fp32 math, one rounding.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from dsv4_kernels.pdl import chain_entry

VEC = 8
THREADS = 128
LOG2_E = 1.4426950408889634


class Swiglu:
    def __init__(self, limit: float, pdl: bool = False):
        self.limit, self.pdl = limit, pdl

    @cute.jit
    def __call__(self, mGate: cute.Tensor, mUp: cute.Tensor, mOut: cute.Tensor, stream):
        total = cute.size(mGate.shape[0]) * (cute.size(mGate.shape[1]) // VEC)
        self.kernel(mGate, mUp, mOut).launch(grid=((total + THREADS - 1) // THREADS, 1, 1), block=[THREADS, 1, 1],
                                             stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mGate: cute.Tensor, mUp: cute.Tensor, mOut: cute.Tensor):
        chain_entry(self.pdl)
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        per_row = cute.size(mGate.shape[1]) // VEC
        v = bidx * THREADS + tidx
        if v < cute.size(mGate.shape[0]) * per_row:
            r = v // per_row
            c = v % per_row
            g = cute.make_rmem_tensor((VEC,), mGate.element_type)
            u = cute.make_rmem_tensor((VEC,), mUp.element_type)
            cute.autovec_copy(cute.local_tile(mGate[r, None], (VEC,), (c,)), g)
            cute.autovec_copy(cute.local_tile(mUp[r, None], (VEC,), (c,)), u)
            gf = cute.make_rmem_tensor((VEC,), Float32)
            uf = cute.make_rmem_tensor((VEC,), Float32)
            gf.store(g.load().to(Float32))
            uf.store(u.load().to(Float32))
            h = cute.make_rmem_tensor((VEC,), Float32)
            for k in cutlass.range_constexpr(VEC):
                a = gf[k]
                b = uf[k]
                if cutlass.const_expr(self.limit > 0):
                    lim = Float32(self.limit)
                    a = cute.arch.fmin(a, lim)
                    b = cute.arch.fmax(cute.arch.fmin(b, lim), -lim)
                h[k] = a / (Float32(1.0) + cute.math.exp2(-a * LOG2_E)) * b
            o = cute.make_rmem_tensor((VEC,), mOut.element_type)
            o.store(h.load().to(mOut.element_type))
            cute.autovec_copy(o, cute.local_tile(mOut[r, None], (VEC,), (c,)))
