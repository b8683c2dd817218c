"""Scatter of [T, d] KV rows into a paged pool by slot mapping: pool.view(-1, d)[slot[t]] = kv[t] (slot < 0: skip).

One CTA per token, d / 8 threads, one 16-byte load and store each. The pool keeps the model dtype (BF16 on the GPU,
as TorchOps does), so the row is copied bit-exactly.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

from dsv4_kernels.cute_utils import butterfly
from dsv4_kernels.pdl import chain_entry


class _RowScatter:
    """The launch both scatters share: one CTA of `self.threads` per token row."""

    pdl = False         # an instance sets it (dsv4_kernels.pdl)

    @cute.jit
    def __call__(self, mKV: cute.Tensor, mSlot: cute.Tensor, mPool: cute.Tensor, stream):
        self.kernel(mKV, mSlot, mPool).launch(grid=(cute.size(mKV.shape[0]), 1, 1), block=[self.threads, 1, 1],
                                              stream=stream, use_pdl=self.pdl)


class KVScatter(_RowScatter):
    def __init__(self, head_dim: int, pdl: bool = False):
        assert head_dim % 8 == 0
        self.d, self.pdl = head_dim, pdl
        self.threads = head_dim // 8

    @cute.kernel
    def kernel(self, mKV: cute.Tensor, mSlot: cute.Tensor, mPool: cute.Tensor):
        chain_entry(self.pdl)
        tidx, _, _ = cute.arch.thread_idx()
        t, _, _ = cute.arch.block_idx()
        slot = Int64(mSlot[t])
        if slot >= 0:
            frag = cute.make_rmem_tensor((8,), mKV.element_type)
            cute.autovec_copy(cute.local_tile(mKV[t, None], (8,), (tidx,)), frag)
            addr = mPool.iterator.toint() + slot * (self.d * mPool.element_type.width // 8)
            row = cute.make_tensor(cute.make_ptr(mPool.element_type, addr, cute.AddressSpace.gmem, assumed_align=16),
                                   cute.make_layout((self.d,)))
            cute.autovec_copy(frag, cute.local_tile(row, (8,), (tidx,)))


E4M3_MAX = 448.0
EXP_BIAS = 127


class KVScatterFp8(_RowScatter):
    """The same scatter into a pool of FP8 rows (dsv4.ops.fp8_rows, FlashMLA's V4 entry): per row, the dim -
    rope_dim non-RoPE channels as e4m3 with one power-of-two scale per 64 (its exponent + 127 as a byte after the
    RoPE part), the RoPE channels as BF16. Bit-exact with Fp8Rows.quantize: the exponent is the smallest e with
    amax <= 448 * 2^e, taken from amax's fp32 bits (amax = (1 + f) 2^A: e = A - 8, + 1 when f > 0.75), the values
    are scaled by the exact 2^-e, clamped to +-448 and rounded to nearest even. One CTA per token, dim / 8 threads of
    8 channels; the 8 threads of a 64-channel group share their max by butterfly. The pad byte is never written.
    """

    def __init__(self, dim: int, rope_dim: int, row_bytes: int):
        nope = dim - rope_dim
        if nope % 64 or rope_dim % 8 or nope <= 0:
            raise ValueError(f"KVScatterFp8: needs dim - rope_dim a multiple of 64 and rope_dim of 8, got {dim}, "
                             f"{rope_dim}")
        self.d, self.rd, self.nope, self.rb = dim, rope_dim, nope, row_bytes
        self.groups = nope // 64
        self.vecs = dim // 8
        self.threads = -(-self.vecs // 32) * 32    # whole warps: the butterfly's shuffles name all 32 lanes

    @cute.kernel
    def kernel(self, mKV: cute.Tensor, mSlot: cute.Tensor, mPool: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        t, _, _ = cute.arch.block_idx()
        slot = Int64(mSlot[t])
        if slot >= 0:      # uniform per CTA: the shuffles below see every thread
            x = cute.make_rmem_tensor((8,), Float32)
            x.fill(0.0)
            if tidx < self.vecs:
                frag = cute.make_rmem_tensor((8,), mKV.element_type)
                cute.autovec_copy(cute.local_tile(mKV[t, None], (8,), (tidx,)), frag)
                x.store(frag.load().to(Float32))
            amax = Float32(0.0)
            for k in cutlass.range_constexpr(8):
                amax = cute.arch.fmax(amax, cute.math.absf(x[k]))
            amax = butterfly(amax, cute.arch.fmax, (4, 2, 1))
            base = mPool.iterator.toint() + slot * self.rb
            c0 = tidx * 8
            if c0 < self.nope:
                ab = cute.make_rmem_tensor((1,), Float32)
                ab[0] = amax
                bits = ab.load().bitcast(Int32)[0]
                a = ((bits >> 23) & 0xFF) - EXP_BIAS
                e = a - 8
                if (bits & 0x7FFFFF) > 0x600000:
                    e = e + 1
                if a == -EXP_BIAS:
                    e = Int32(-EXP_BIAS)
                ib = cute.make_rmem_tensor((1,), Int32)
                ib[0] = (EXP_BIAS - e) << 23
                inv = ib.load().bitcast(Float32)[0]
                y = cute.make_rmem_tensor((8,), Float32)
                for k in cutlass.range_constexpr(8):
                    y[k] = cute.arch.fmin(cute.arch.fmax(x[k] * inv, Float32(-E4M3_MAX)), Float32(E4M3_MAX))
                q = cute.make_rmem_tensor((8,), cutlass.Float8E4M3FN)
                q.store(y.load().to(cutlass.Float8E4M3FN))
                row = cute.make_tensor(cute.make_ptr(cutlass.Float8E4M3FN, base, cute.AddressSpace.gmem,
                                                     assumed_align=8), cute.make_layout((self.nope,)))
                cute.autovec_copy(q, cute.local_tile(row, (8,), (tidx,)))
                if tidx % 8 == 0:
                    sc = cute.make_tensor(cute.make_ptr(cutlass.Uint8, base + self.nope + 2 * self.rd,
                                                        cute.AddressSpace.gmem, assumed_align=1),
                                          cute.make_layout((self.groups,)))
                    sc[tidx // 8] = cutlass.Uint8(e + EXP_BIAS)
            elif tidx < self.vecs:
                h = cute.make_rmem_tensor((8,), cutlass.BFloat16)
                h.store(x.load().to(cutlass.BFloat16))
                rope = cute.make_tensor(cute.make_ptr(cutlass.BFloat16, base + self.nope, cute.AddressSpace.gmem,
                                                      assumed_align=8), cute.make_layout((self.rd,)))
                cute.autovec_copy(h, cute.local_tile(rope, (8,), (tidx - self.nope // 8,)))
