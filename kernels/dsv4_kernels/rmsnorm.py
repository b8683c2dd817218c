"""RMSNorm over the last dim in one kernel: out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) (* w), out of place.

TorchOps.rms_norm is F.rms_norm on an fp32 copy, then a cast back: 3-7 launches a call, and decode runs ~5 norms per
layer (attention input, q latent, per-head q, kv, ffn input). Here x [R, D] and out [R, D] share the dtype (bf16 or
fp32), w is fp32 [D] (not read by the no-weight variant). Each thread owns one 8-channel vector (16 bytes of bf16)
of one row; a row gets `tpr` threads, D / 8 rounded up to a power of two below a warp and to whole warps above, and a
CTA max(1, 128 / tpr) rows. The sum of squares is a butterfly inside the row's lanes, then, for rows of several warps,
a pass through shared memory: D = 4096 is one row of 512 threads, D = 512 two rows of 64, D = 64 sixteen rows of 8.
Rows are dynamic (grid ceil(R / rows per CTA)). fp32 math, one rounding to x's dtype.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from dsv4_kernels.cute_utils import add, butterfly
from dsv4_kernels import pdl as pdl_flags
from dsv4_kernels.pdl import chain_entry

VEC = 8
CTA = 128            # threads a CTA gets at least when rows are narrow (several rows per CTA)
MAX_DIM = VEC * 1024  # one vector per thread, one row per CTA at most


def _row_threads(vectors: int) -> int:
    if vectors < 32:
        return 1 << (vectors - 1).bit_length()
    return (vectors + 31) // 32 * 32


class RmsNorm:
    def __init__(self, dim: int, eps: float, has_weight: bool, pdl: bool = False, hoist: bool | None = None):
        if dim % VEC or not 0 < dim <= MAX_DIM:
            raise ValueError(f"RmsNorm: dim must be a multiple of {VEC} in [{VEC}, {MAX_DIM}], got {dim}")
        self.d, self.eps, self.has_weight, self.pdl = dim, eps, has_weight, pdl
        self.hoist = pdl_flags.HOIST if hoist is None else hoist     # see dsv4_kernels.pdl.hoist
        self.nv = dim // VEC
        self.tpr = _row_threads(self.nv)
        self.rows = max(1, CTA // self.tpr)
        self.threads = self.tpr * self.rows
        self.wpr = self.tpr // 32                      # warps per row; > 1: the row sum goes through shared memory
        self.offsets = tuple(1 << k for k in reversed(range(min(self.tpr, 32).bit_length() - 1)))

    @cute.jit
    def __call__(self, mX: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor, stream):
        @cute.struct
        class Storage:
            red: cute.struct.Align[cute.struct.MemRange[Float32, max(1, self.rows * self.wpr)], 16]

        R = cute.size(mX.shape[0])
        self.kernel(mX, mW, mOut, Storage).launch(
            grid=((R + self.rows - 1) // self.rows, 1, 1), block=[self.threads, 1, 1],
            smem=Storage.size_in_bytes(), stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor, Storage: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        R = cute.size(mX.shape[0])
        row = bidx * self.rows + tidx // self.tpr
        lane = tidx % self.tpr
        # the weight before the wait (dsv4_kernels.pdl): not one more L2 round trip after the row sum
        if cutlass.const_expr(not self.hoist):
            chain_entry(self.pdl)
        wv = cute.make_rmem_tensor((VEC,), Float32)
        if cutlass.const_expr(self.has_weight and self.hoist):
            if lane < self.nv:
                cute.autovec_copy(cute.local_tile(mW, (VEC,), (lane,)), wv)
        if cutlass.const_expr(self.hoist):
            chain_entry(self.pdl)
        # rows past the end still take part in the barrier (on row R-1) and store nothing
        rc = cutlass.min(row, R - 1)
        frag = cute.make_rmem_tensor((VEC,), mX.element_type)
        xf = cute.make_rmem_tensor((VEC,), Float32)
        xf.fill(0.0)
        if lane < self.nv:
            cute.autovec_copy(cute.local_tile(mX[rc, None], (VEC,), (lane,)), frag)
            xf.store(frag.load().to(Float32))
        ssq = Float32(0.0)
        for k in cutlass.range_constexpr(VEC):
            ssq = ssq + xf[k] * xf[k]
        ssq = butterfly(ssq, add, self.offsets)
        if cutlass.const_expr(self.wpr > 1):
            smem = cutlass.memory.SmemAllocator()
            red = smem.allocate(Storage).red.get_tensor(cute.make_layout((self.rows * self.wpr,)))
            if tidx % 32 == 0:
                red[tidx // 32] = ssq
            cute.arch.barrier()
            first = (tidx // self.tpr) * self.wpr
            ssq = Float32(0.0)
            for w in cutlass.range_constexpr(self.wpr):
                ssq = ssq + red[first + w]
        rstd = cute.math.rsqrt(ssq / Float32(self.d) + Float32(self.eps))
        if row < R:
            if lane < self.nv:
                y = cute.make_rmem_tensor((VEC,), Float32)
                if cutlass.const_expr(self.has_weight):
                    if cutlass.const_expr(not self.hoist):
                        cute.autovec_copy(cute.local_tile(mW, (VEC,), (lane,)), wv)
                    y.store(xf.load() * rstd * wv.load())
                else:
                    y.store(xf.load() * rstd)
                frag.store(y.load().to(mOut.element_type))
                cute.autovec_copy(frag, cute.local_tile(mOut[rc, None], (VEC,), (lane,)))
