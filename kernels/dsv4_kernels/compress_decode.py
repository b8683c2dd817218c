"""One decode token per sequence through the KV compressor, in one kernel (TorchOps._compress_decode's ~25 launches).

Per sequence b (one CTA; thread t owns entry channels c = t*V .. t*V+V-1, and for ratio 4 also carry columns d + c):
1. store the token's projections in its carry row cur0 + j (j = pos % ratio; the score plus ape[j]);
2. pool the window as it stands: softmax over rows, per channel, of the current window's rows 0..j (second-half
   columns for ratio 4) and, for ratio 4, the previous window's rows (first-half columns). A window that is not
   closed yet gives a provisional entry nobody can see until the closing step overwrites it (same rule as TorchOps);
3. RMSNorm over the d channels (a CTA reduction), RoPE on the tail at the window's first position;
4. write the entry into the compressed pool through the block table;
5. ratio 4, closing step: the current window's rows become the previous window's.
Each thread touches only its own carry columns, so steps 1, 2 and 5 need no synchronisation.

Rows that repeat row 0's state slot are the padding of a CUDA-graph batch: they return at once (two CTAs updating
one carry would race; the torch path's whole-tensor ops had no such race).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

V = 4
LOG2_E = 1.4426950408889634


class CompressDecode:
    def __init__(self, d: int, ratio: int, rope_dim: int, block_size: int, norm_eps: float):
        assert d % V == 0 and rope_dim % V == 0 and block_size % ratio == 0
        self.d, self.r, self.rd, self.bs, self.eps = d, ratio, rope_dim, block_size, norm_eps
        self.overlap = ratio == 4
        self.coff = 2 if self.overlap else 1
        self.threads = max(32, d // V)
        assert self.threads % 32 == 0
        self.warps = self.threads // 32

    @cute.jit
    def __call__(self, mKV: cute.Tensor, mScore: cute.Tensor, mApe: cute.Tensor, mNorm: cute.Tensor,
                 mPos: cute.Tensor, mSlot: cute.Tensor, mBT: cute.Tensor, mCarryKV: cute.Tensor,
                 mCarryS: cute.Tensor, mCos: cute.Tensor, mSin: cute.Tensor, mOut: cute.Tensor, stream):
        @cute.struct
        class Storage:
            red: cute.struct.Align[cute.struct.MemRange[Float32, self.warps], 16]

        self.kernel(mKV, mScore, mApe, mNorm, mPos, mSlot, mBT, mCarryKV, mCarryS, mCos, mSin, mOut,
                    Storage).launch(grid=(cute.size(mKV.shape[0]), 1, 1), block=[self.threads, 1, 1],
                                    smem=Storage.size_in_bytes(), stream=stream)

    @cute.kernel
    def kernel(self, mKV: cute.Tensor, mScore: cute.Tensor, mApe: cute.Tensor, mNorm: cute.Tensor,
               mPos: cute.Tensor, mSlot: cute.Tensor, mBT: cute.Tensor, mCarryKV: cute.Tensor,
               mCarryS: cute.Tensor, mCos: cute.Tensor, mSin: cute.Tensor, mOut: cute.Tensor,
               Storage: cutlass.Constexpr):
        d, r = self.d, self.r
        tidx, _, _ = cute.arch.thread_idx()
        b, _, _ = cute.arch.block_idx()
        slot = Int64(mSlot[b])
        pad = Int32(0)
        if b > 0:
            if slot == Int64(mSlot[0]):
                pad = Int32(1)
        if pad == 0:
            smem = cutlass.memory.SmemAllocator()
            st = smem.allocate(Storage)
            red = st.red.get_tensor(cute.make_layout((self.warps,)))
            p = Int64(mPos[b])
            j = Int32(p % r)
            start = p - Int64(j)
            cur0 = r if self.overlap else 0
            ccol = d if self.overlap else 0      # column offset of the current window's half
            active = tidx < d // V
            m = cute.make_rmem_tensor((V,), Float32)
            s = cute.make_rmem_tensor((V,), Float32)
            acc = cute.make_rmem_tensor((V,), Float32)
            ent = cute.make_rmem_tensor((V,), Float32)
            ssq = Float32(0.0)
            if active:
                for v in cutlass.range_constexpr(V):
                    c = tidx * V + v
                    for h in cutlass.range_constexpr(self.coff):
                        col = h * d + c
                        mCarryKV[slot, cur0 + j, col] = mKV[b, col].to(Float32)
                        mCarryS[slot, cur0 + j, col] = mScore[b, col].to(Float32) + mApe[j, col]
                    # row j is finite: start the running max there, so -inf rows (an empty previous window)
                    # contribute exp(-inf) = 0 and never -inf - -inf
                    m[v] = mCarryS[slot, cur0 + j, ccol + c]
                    s[v] = Float32(0.0)
                    acc[v] = Float32(0.0)
                for i in cutlass.range(j + 1, unroll=1):
                    for v in cutlass.range_constexpr(V):
                        self._update(m, s, acc, v, mCarryS[slot, cur0 + i, ccol + tidx * V + v],
                                     mCarryKV[slot, cur0 + i, ccol + tidx * V + v])
                if cutlass.const_expr(self.overlap):
                    for i in cutlass.range(r, unroll=1):
                        for v in cutlass.range_constexpr(V):
                            self._update(m, s, acc, v, mCarryS[slot, i, tidx * V + v], mCarryKV[slot, i, tidx * V + v])
                for v in cutlass.range_constexpr(V):
                    e = acc[v] / s[v]
                    ent[v] = e
                    ssq = ssq + e * e
            # RMSNorm: sum of squares over the CTA
            for off in (16, 8, 4, 2, 1):
                ssq = ssq + cute.arch.shuffle_sync_bfly(ssq, offset=off, mask=-1, mask_and_clamp=31)
            if tidx % 32 == 0:
                red[tidx // 32] = ssq
            cute.arch.barrier()
            tot = Float32(0.0)
            for w in cutlass.range_constexpr(self.warps):
                tot = tot + red[w]
            rstd = cute.math.rsqrt(tot / d + Float32(self.eps))
            if active:
                for v in cutlass.range_constexpr(V):
                    ent[v] = ent[v] * rstd * mNorm[tidx * V + v]
                first = tidx * V - (d - self.rd)
                if first >= 0:
                    for k in cutlass.range_constexpr(V // 2):
                        i2 = first // 2 + k
                        cs = mCos[start, i2]
                        sn = mSin[start, i2]
                        ev = ent[2 * k]
                        od = ent[2 * k + 1]
                        ent[2 * k] = ev * cs - od * sn
                        ent[2 * k + 1] = ev * sn + od * cs
                blk = Int64(mBT[b, start // self.bs])
                row = blk * (self.bs // r) + (start % self.bs) // r
                for v in cutlass.range_constexpr(V):
                    mOut[row, tidx * V + v] = ent[v].to(mOut.element_type)
                if cutlass.const_expr(self.overlap):
                    if j == r - 1:           # the window closed: it is the previous one from now on
                        for i in cutlass.range(r, unroll=1):
                            for v in cutlass.range_constexpr(V):
                                for h in cutlass.range_constexpr(self.coff):
                                    col = h * d + tidx * V + v
                                    mCarryKV[slot, i, col] = mCarryKV[slot, r + i, col]
                                    mCarryS[slot, i, col] = mCarryS[slot, r + i, col]

    def _update(self, m: cute.Tensor, s: cute.Tensor, acc: cute.Tensor, v: int, score: Float32,
                val: Float32):
        m_new = cute.arch.fmax(m[v], score)
        a = cute.math.exp2((m[v] - m_new) * LOG2_E)
        e = cute.math.exp2((score - m_new) * LOG2_E)
        s[v] = s[v] * a + e
        acc[v] = acc[v] * a + e * val
        m[v] = m_new
