"""Lightning-indexer scores over the paged index keys, written as top-k sort keys.

score(t, s) = sum_h w[t, h] * relu(q[t, h] . k[s]) for the entries s < (p_t + 1) // 4 the query token t may see
(CSA, ratio 4). One CTA per (tile of BN entries, query token): the tile's key rows are gathered from the paged pool
with 16-byte cp.async (row address from the sequence's compressed block table, as in attention_decode), Q [M, dk]
(heads padded to M with zero rows and zero weights) goes to shared memory too, S = Q K^T runs on mma.sync
m16n8k16 (bf16 in, fp32 accumulate), relu and the head weight are applied per element and the column sums are
reduced over the heads (lane shuffles, then the M/16 warps of a column through shared memory).

Each score is written as an int64 sort key:  (orderable int32 of the fp32 score) << 32 | (2^32 - 1 - s), with -0.0
folded into +0.0. Keys are unique and order like (score descending, entry ascending), so `torch.topk` on them gives
exactly the stable descending sort's first k (ties toward the earlier entry, as TorchOps.indexer_topk does).
Entries the token may not see (s >= its visible count, and the buffer's tail) get INT64_MIN, which the host maps to -1.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64
from cutlass._mlir import ir  # noqa: F401
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.cute.nvgpu import cpasync, warp

from dsv4_kernels.cute_utils import mn_view
from dsv4_kernels.pdl import chain_entry

INT64_MIN = -(1 << 63)


@dsl_user_op
def _order_bits(x: Float32, *, loc=None, ip=None) -> Int32:
    """fp32 -> int32 whose signed order is the float order (-0.0 -> +0.0 first)."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(x).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 b;\n\t.reg .pred z, n;\n\tmov.b32 b, $1;\n\tsetp.eq.f32 z, $1, 0f00000000;\n\t"
        "selp.b32 b, 0, b, z;\n\tsetp.lt.s32 n, b, 0;\n\t@n xor.b32 b, b, 0x7FFFFFFF;\n\tmov.b32 $0, b;\n\t}",
        "=r,f", loc=loc, ip=ip))




class IndexerScores:
    """Compile-time configuration: key dim dk (multiple of 64), M padded heads (16/32/64), pool block size."""

    def __init__(self, head_dim: int, heads_per_cta: int, block_size: int, block_n: int = 64):
        assert head_dim % 64 == 0 and heads_per_cta in (16, 32, 64) and block_size % 4 == 0
        self.d = head_dim
        self.M = heads_per_cta
        self.wm = heads_per_cta // 16
        self.wn = 4 if heads_per_cta <= 32 else 2
        self.threads = 32 * self.wm * self.wn
        self.BN = block_n
        assert self.BN % (16 * self.wn) == 0 and self.BN <= self.threads
        self.bs = block_size
        self.per_block = block_size // 4

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mW: cute.Tensor, mK: cute.Tensor, mPos: cute.Tensor, mSeq: cute.Tensor,
                 mCompBT: cute.Tensor, mKeys: cute.Tensor, stream):
        dt = cutlass.BFloat16
        atom = cute.make_composed_layout(cute.make_swizzle(3, 3, 3), 0,
                                         cute.make_layout((8, 64), stride=(64, 1)))
        sQ_layout = cute.tile_to_shape(atom, (self.M, self.d), (0, 1))
        sK_layout = cute.tile_to_shape(atom, (self.BN, self.d), (0, 1))

        @cute.struct
        class Storage:
            sQ: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sK_layout)], 1024]
            sRed: cute.struct.Align[cute.struct.MemRange[Float32, self.wm * self.BN], 16]

        g2s = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dt,
                                  num_bits_per_copy=128)
        tiled_g2s = cute.make_tiled_copy_tv(g2s, cute.make_layout((self.threads // 8, 8), stride=(8, 1)),
                                            cute.make_layout((1, 8)))
        tiled_mma = cute.make_tiled_mma(warp.MmaF16BF16Op(dt, Float32, (16, 8, 16)), (self.wm, self.wn, 1),
                                        permutation_mnk=(self.M, 16 * self.wn, 16))
        n_tiles = (cute.size(mKeys.shape[1]) + self.BN - 1) // self.BN
        self.kernel(mQ, mW, mK, mPos, mSeq, mCompBT, mKeys, sQ_layout, sK_layout, tiled_g2s, tiled_mma,
                    Storage).launch(grid=(n_tiles, cute.size(mQ.shape[0]), 1), block=[self.threads, 1, 1],
                                    smem=Storage.size_in_bytes(), stream=stream)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mW: cute.Tensor, mK: cute.Tensor, mPos: cute.Tensor, mSeq: cute.Tensor,
               mCompBT: cute.Tensor, mKeys: cute.Tensor, sQ_layout: cute.ComposedLayout,
               sK_layout: cute.ComposedLayout, tiled_g2s: cute.TiledCopy, tiled_mma: cute.TiledMma,
               Storage: cutlass.Constexpr):
        dt = cutlass.BFloat16
        tidx, _, _ = cute.arch.thread_idx()
        tile, t, _ = cute.arch.block_idx()
        lane = tidx % 32
        warp_m = (tidx // 32) % self.wm
        p = mPos[t]
        b = mSeq[t]
        n_vis = (p + 1) // 4
        width = cute.size(mKeys.shape[1])
        base = mK.iterator.toint()
        row_bytes = self.d * 2

        smem = cutlass.memory.SmemAllocator()
        st = smem.allocate(Storage)
        sQ = st.sQ.get_tensor(sQ_layout)
        sK = st.sK.get_tensor(sK_layout)
        sRed = st.sRed.get_tensor(cute.make_layout((self.wm, self.BN)))

        if tile * self.BN < n_vis:
            thr_g2s = tiled_g2s.get_slice(tidx)
            gQ = cute.local_tile(mQ[t, None, None], (self.M, self.d), (0, 0))
            cute.copy(tiled_g2s, thr_g2s.partition_S(gQ), thr_g2s.partition_D(sQ))
            tKsK = thr_g2s.partition_D(sK)
            tKcK = thr_g2s.partition_S(cute.make_identity_tensor((self.BN, self.d)))
            for m in cutlass.range_constexpr(cute.size(tKsK, mode=[1])):
                e = tile * self.BN + tKcK[0, m, 0][0]
                addr = base        # invisible rows read row 0 of the pool; their columns are discarded
                if e < n_vis:
                    blk = mCompBT[b, e // self.per_block]
                    addr = base + Int64(blk * self.per_block + e % self.per_block) * row_bytes
                src_row = cute.make_tensor(cute.make_ptr(dt, addr, cute.AddressSpace.gmem, assumed_align=16),
                                           cute.make_layout((self.d,)))
                src_chunks = cute.tiled_divide(src_row, (8,))
                for k in cutlass.range_constexpr(cute.size(tKsK, mode=[2])):
                    ki = tKcK[0, 0, k][1] // 8
                    dst = tKsK[None, m, k]
                    cute.copy(tiled_g2s, cute.make_tensor(src_chunks[None, ki].iterator, dst.layout), dst)
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(0)
            cute.arch.barrier()

            thr_mma = tiled_mma.get_slice(tidx)
            tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
            tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK))
            ld = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt)
            s2r_A = cute.make_tiled_copy_A(ld, tiled_mma)
            s2r_B = cute.make_tiled_copy_B(ld, tiled_mma)
            thr_A = s2r_A.get_slice(tidx)
            thr_B = s2r_B.get_slice(tidx)
            tSsQ = thr_A.partition_S(sQ)
            tSrQ_v = thr_A.retile(tSrQ)
            tSsK = thr_B.partition_S(sK)
            tSrK_v = thr_B.retile(tSrK)
            acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((self.M, self.BN)), Float32)
            acc.fill(0.0)
            for k in cutlass.range_constexpr(cute.size(tSsQ.shape[2])):
                cute.copy(s2r_A, tSsQ[None, None, k], tSrQ_v[None, None, k])
                cute.copy(s2r_B, tSsK[None, None, k], tSrK_v[None, None, k])
                cute.gemm(tiled_mma, acc, tSrQ[None, None, k], tSrK[None, None, k], acc)

            cS = cute.make_identity_tensor((self.M, self.BN))
            tScS = mn_view(thr_mma.partition_C(cS))
            acc_mn = mn_view(acc)
            n_r = cute.size(tScS, mode=[0])
            n_c = cute.size(tScS, mode=[1])
            wrow = cute.make_rmem_tensor((n_r,), Float32)
            for r in cutlass.range_constexpr(n_r):
                wrow[r] = mW[t, tScS[r, 0][0]]
            for c in cutlass.range_constexpr(n_c):
                s = Float32(0.0)
                for r in cutlass.range_constexpr(n_r):
                    s = s + cute.arch.fmax(acc_mn[r, c], Float32(0.0)) * wrow[r]
                for off in cutlass.range_constexpr(3):
                    s = s + cute.arch.shuffle_sync_bfly(s, offset=4 << off, mask=-1, mask_and_clamp=31)
                if lane < 4:
                    sRed[warp_m, tScS[0, c][1]] = s
            cute.arch.barrier()

        if tidx < self.BN:
            e = tile * self.BN + tidx
            if e < width:
                key = Int64(INT64_MIN)
                if e < n_vis:
                    s = sRed[0, tidx]
                    for j in cutlass.range_constexpr(1, self.wm):
                        s = s + sRed[j, tidx]
                    key = (Int64(_order_bits(s)) << 32) + (Int64(4294967295) - Int64(e))
                mKeys[t, e] = key


class VisibleEntries:
    """The indexer's selection where nothing has to be selected: while a step's positions (or, in a CUDA graph,
    those it was captured for) reach at most 4 x top-k, every entry a query may see is taken, so the scores are not
    needed at all. For e in [0, topk): out[t, e] = e for e < (pos[t] + 1) // 4 (its visible count, capped at
    `width`, a runtime argument: one compiled kernel for every step), else -1. That is what indexer_topk built from
    the scores' keys with four torch launches and the scoring kernel before (H100, session 27: ~8 us of a CSA
    layer's critical path at batch 1). One CTA per token."""

    THREADS = 256

    def __init__(self, pdl: bool = False):
        self.pdl = pdl

    @cute.jit
    def __call__(self, mPos: cute.Tensor, mOut: cute.Tensor, width: Int32, stream):
        self.kernel(mPos, mOut, width).launch(grid=(cute.size(mOut.shape[0]), 1, 1), block=[self.THREADS, 1, 1],
                                              stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mPos: cute.Tensor, mOut: cute.Tensor, width: Int32):
        chain_entry(self.pdl)
        tidx, _, _ = cute.arch.thread_idx()
        t, _, _ = cute.arch.block_idx()
        n_vis = cutlass.min((Int32(mPos[t]) + 1) // 4, width)
        for e in cutlass.range(tidx, cute.size(mOut.shape[1]), self.THREADS):
            v = Int64(-1)
            if e < n_vis:
                v = Int64(e)
            mOut[t, e] = v
