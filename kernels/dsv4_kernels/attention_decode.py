"""Sparse (CSA / HCA / window) attention over the paged caches, one CTA per (query token, KV split, head group).

DeepSeek-V4 attention has one shared KV head (keys = values, dim d = 512) and H query heads, so for one query token
the work is two small GEMMs over the rows it may see: S = Q Kᵀ ([M heads, BN rows] per tile, K = d) and O += P V
([M, d], K = BN). Each query token owns a *virtual list* of KV rows:

    rows 0 .. n_win-1           window positions max(0, p-W+1) .. p, read from the window pool through the block
                                table of its sequence;
    rows n_win .. n_win+n_c-1   compressed entries: HCA every entry w < (p+1) // ratio, CSA the indexer's top-k
                                entry numbers (-1 = none, masked), read from the compressed pool through its table.

That is the same function for a decode token and for every token of a prefill chunk (each sees its own window and
top-k), so this one kernel serves both; for prefill it re-reads shared rows per query token (mostly from L2).

Design (Hopper, no TMA gather): rows are gathered with 16-byte cp.async into a swizzled shared-memory tile of
BN rows x d, double buffered; the row address of each virtual row is computed by the loading threads from the block
tables. Tensor cores through mma.sync m16n8k16 (bf16 in, fp32 accumulate); warps tile (M/16) x wn. P goes through
shared memory (S columns are split across the wn warps that share rows); the row max is exchanged between those warps
through shared memory, so all of them rescale with the same maximum. Softmax in the log2 domain; the per-head sink
logit joins the softmax at the end (it only adds exp(sink - m) to the denominator). Invalid rows (past the end, top-k
-1) are loaded from a safe row (the token's own window row, always present) and masked with -inf, so no NaN from
stale memory can leak in.

Split-KV: the grid is (head groups, splits, T), head groups fastest so the CTAs reading the same rows run together
(the second group's rows come from L2); each split writes its normalised partial O / l (fp32, or bf16 with
part_bf16: half the bytes but measured slower on H100) with its row max and sum, and a second kernel merges the splits
and the sink. With one split the CTA writes the final bf16 output itself.
"""

from __future__ import annotations

import math
import os

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warp

from dsv4_kernels.cute_utils import add, mn_view
from dsv4_kernels import pdl as pdl_flags
from dsv4_kernels.pdl import chain_entry
from dsv4_kernels.rope import rotate_tail

LOG2_E = 1.4426950408889634
# Programmatic dependent launch of the split combine: its launch overlaps the attention kernel's tail instead of
# following it (env DSV4_ATTN_PDL=0 turns it off)
ATTN_PDL = os.environ.get("DSV4_ATTN_PDL", "1") != "0"
# The split combine's loops over the splits, unrolled this many times: one thread's loads of several splits are then
# in flight together instead of one L2 round trip after another (the arithmetic keeps its order, so the bits are the
# same). H100, batch-1 CSA with 10 splits: docs/PERF.md, session 29. 1 gives the loop as it was, for A/B runs.
COMBINE_UNROLL = int(os.environ.get("DSV4_ATTN_COMBINE_UNROLL", "4"))

MODE_WINDOW, MODE_HCA, MODE_CSA = 0, 1, 2




def _quad(val, op):
    val = op(val, cute.arch.shuffle_sync_bfly(val, offset=2, mask=-1, mask_and_clamp=31))
    val = op(val, cute.arch.shuffle_sync_bfly(val, offset=1, mask=-1, mask_and_clamp=31))
    return val


class SparseDecodeAttention:
    """Compile-time configuration of one kernel variant."""

    # the P tile goes through a swizzled (8, 64) smem atom: rows of 64 (BN = 32 fails to compile, seen 2026-11-23)
    BN_MULTIPLE = 64

    def __init__(self, head_dim: int, heads_per_cta: int, mode: int, window: int, block_size: int, ratio: int,
                 topk: int, split: bool, block_n: int = 64, stages: int = 2, part_bf16: bool = True,
                 topk_i64: bool = False, row_table: bool = True, table_tiles: int = 16, pdl: bool = False):
        assert head_dim % 64 == 0 and heads_per_cta in (16, 32, 64)
        self.d = head_dim
        self.pdl = pdl
        self.M = heads_per_cta
        self.wm = heads_per_cta // 16
        self.wn = 4 if heads_per_cta <= 32 else 2
        self.threads = 32 * self.wm * self.wn
        self.BN = block_n
        assert self.BN % self.BN_MULTIPLE == 0 and self.d % (16 * self.wn) == 0
        # the loop keeps one tile in flight whatever `stages` is (> 2 only adds buffers); the wgmma kernel keeps
        # stages - 1 in flight, and that measured no faster either (docs/PERF.md, session 19)
        self.stages = stages
        self.mode = mode
        self.W = window
        self.bs = block_size
        self.ratio = ratio
        self.per_block = block_size // ratio if ratio else 1
        self.topk = topk
        self.split = split
        self.part_bf16 = part_bf16      # split partials: O / l in bf16 (else fp32)
        self.topk_i64 = topk_i64        # CSA top-k given as int64 (TorchOps' dtype) instead of int32
        # Row table: the physical row of every virtual row of the next `table_tiles` tiles is looked up once (all
        # threads at once, one dependent top-k -> block-table round trip) into shared memory, instead of per tile
        # right before its cp.async, which put that round trip between every two tiles.
        self.row_table = row_table
        self.TT = table_tiles if row_table else 0

    def smem_bytes(self) -> int:
        return 2 * (self.M * self.d + self.stages * self.BN * self.d + self.M * self.BN) + 4 * (
            self.stages * self.BN + self.wn * self.M + self.TT * self.BN) + 4 * 1024

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mSwa: cute.Tensor, mComp: cute.Tensor, mPos: cute.Tensor,
                 mSeq: cute.Tensor, mSwaBT: cute.Tensor, mCompBT: cute.Tensor, mTopk: cute.Tensor,
                 mSink: cute.Tensor, mOut: cute.Tensor, mOpart: cute.Tensor, mML: cute.Tensor,
                 scale_log2: Float32, tiles_per_split: Int32, num_splits: Int32, stream):
        dt = cutlass.BFloat16
        atom = cute.make_composed_layout(cute.make_swizzle(3, 3, 3), 0,
                                         cute.make_layout((8, 64), stride=(64, 1)))
        sQ_layout = cute.tile_to_shape(atom, (self.M, self.d), (0, 1))
        sK_layout = cute.tile_to_shape(atom, (self.BN, self.d, self.stages), (0, 1, 2))
        sP_layout = cute.tile_to_shape(atom, (self.M, self.BN), (0, 1))

        @cute.struct
        class Storage:
            sQ: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sK_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sP_layout)], 1024]
            sBias: cute.struct.Align[cute.struct.MemRange[Float32, self.BN * self.stages], 16]
            sRed: cute.struct.Align[cute.struct.MemRange[Float32, self.wn * self.M], 16]
            sRowT: cute.struct.Align[cute.struct.MemRange[Int32, max(self.TT * self.BN, 4)], 16]

        g2s = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dt,
                                  num_bits_per_copy=128)
        tiled_g2s = cute.make_tiled_copy_tv(g2s, cute.make_layout((self.threads // 8, 8), stride=(8, 1)),
                                            cute.make_layout((1, 8)))
        tiled_mma = cute.make_tiled_mma(warp.MmaF16BF16Op(dt, Float32, (16, 8, 16)), (self.wm, self.wn, 1),
                                        permutation_mnk=(self.M, 16 * self.wn, 16))
        # head groups fastest, then splits: the CTAs that read the same rows run side by side (L2 reuse)
        grid = (cute.size(mQ.shape[1]) // self.M, num_splits, cute.size(mQ.shape[0]))
        self.kernel(mQ, mSwa, mComp, mPos, mSeq, mSwaBT, mCompBT, mTopk, mSink, mOut, mOpart, mML, scale_log2,
                    tiles_per_split, sQ_layout, sK_layout, sP_layout, tiled_g2s, tiled_mma, Storage).launch(
            grid=grid, block=[self.threads, 1, 1], smem=Storage.size_in_bytes(), stream=stream, use_pdl=self.pdl)

    @cute.jit
    def _row_list(self, t: Int32, split_idx: Int32, tiles_per_split: Int32, mPos: cute.Tensor, mSeq: cute.Tensor,
                  mSwa: cute.Tensor, mComp: cute.Tensor, mSwaBT: cute.Tensor):
        """Token t's virtual row list and this split's tiles -> (sequence, window rows, first window position, rows,
        first tile, end tile, window pool base, compressed pool base, address of the safe row)."""
        p = mPos[t]
        b = mSeq[t]
        n_win = cutlass.min(p + 1, self.W)
        lo = p - n_win + 1
        n_total = n_win
        if cutlass.const_expr(self.mode == MODE_HCA):
            n_total = n_win + (p + 1) // self.ratio
        if cutlass.const_expr(self.mode == MODE_CSA):
            n_total = n_win + self.topk
        n_tiles = (n_total + self.BN - 1) // self.BN
        tile_lo = split_idx * tiles_per_split
        tile_hi = cutlass.min(tile_lo + tiles_per_split, n_tiles)
        swa_base = mSwa.iterator.toint()
        comp_base = mComp.iterator.toint()
        safe = swa_base + Int64(mSwaBT[b, p // self.bs] * self.bs + p % self.bs) * (self.d * 2)
        return b, n_win, lo, n_total, tile_lo, tile_hi, swa_base, comp_base, safe

    @cute.jit
    def _row_code(self, n: Int32, n_win: Int32, n_total: Int32, lo: Int32, b: Int32, t: Int32,
                  mSwaBT: cute.Tensor, mCompBT: cute.Tensor, mTopk: cute.Tensor):
        """Physical row of virtual row n in its pool (window rows: n < n_win), or -1 (masked)."""
        code = Int32(-1)
        if n < n_win:
            pos = lo + n
            code = mSwaBT[b, pos // self.bs] * self.bs + pos % self.bs
        if cutlass.const_expr(self.mode != MODE_WINDOW):
            if n >= n_win and n < n_total:
                ent = n - n_win
                if cutlass.const_expr(self.mode == MODE_CSA):
                    ent = Int32(mTopk[t, n - n_win])
                if ent >= 0:
                    code = mCompBT[b, ent // self.per_block] * self.per_block + ent % self.per_block
        return code

    @cute.jit
    def _fill_table(self, t0: Int32, t_end: Int32, sRowT: cute.Tensor, tidx: Int32, n_win: Int32, n_total: Int32,
                    lo: Int32, b: Int32, t: Int32, mSwaBT: cute.Tensor, mCompBT: cute.Tensor, mTopk: cute.Tensor):
        """sRowT[i] = row code of virtual row t0 * BN + i for the tiles t0 .. min(t0 + TT, t_end) - 1 (the caller
        syncs the CTA after)."""
        n_rows = cutlass.min(t_end - t0, self.TT) * self.BN
        for j in cutlass.range_constexpr((self.TT * self.BN + self.threads - 1) // self.threads):
            i = j * self.threads + tidx
            if i < n_rows:
                sRowT[i] = self._row_code(t0 * self.BN + i, n_win, n_total, lo, b, t, mSwaBT, mCompBT, mTopk)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mSwa: cute.Tensor, mComp: cute.Tensor, mPos: cute.Tensor,
               mSeq: cute.Tensor, mSwaBT: cute.Tensor, mCompBT: cute.Tensor, mTopk: cute.Tensor,
               mSink: cute.Tensor, mOut: cute.Tensor, mOpart: cute.Tensor, mML: cute.Tensor,
               scale_log2: Float32, tiles_per_split: Int32, sQ_layout: cute.ComposedLayout,
               sK_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout, tiled_g2s: cute.TiledCopy,
               tiled_mma: cute.TiledMma, Storage: cutlass.Constexpr):
        chain_entry(self.pdl)
        dt = cutlass.BFloat16
        tidx, _, _ = cute.arch.thread_idx()
        g, split_idx, t = cute.arch.block_idx()
        lane = tidx % 32
        warp_n = (tidx // 32) // self.wm

        b, n_win, lo, n_total, tile_lo, tile_hi, swa_base, comp_base, safe = self._row_list(
            t, split_idx, tiles_per_split, mPos, mSeq, mSwa, mComp, mSwaBT)

        smem = cutlass.memory.SmemAllocator()
        st = smem.allocate(Storage)
        sQ = st.sQ.get_tensor(sQ_layout)
        sK = st.sK.get_tensor(sK_layout)
        sP = st.sP.get_tensor(sP_layout)
        sBias = st.sBias.get_tensor(cute.make_layout((self.BN, self.stages)))
        sRed = st.sRed.get_tensor(cute.make_layout((self.wn, self.M)))
        sRowT = st.sRowT.get_tensor(cute.make_layout((max(self.TT * self.BN, 4),)))
        sVt = cute.composition(sK, cute.make_layout((self.d, self.BN, self.stages),
                                                    stride=(self.BN, 1, self.BN * self.d)))

        # ---- global -> shared copies ----
        thr_g2s = tiled_g2s.get_slice(tidx)
        gQ = cute.local_tile(mQ[t, None, None], (self.M, self.d), (g, 0))
        cute.copy(tiled_g2s, thr_g2s.partition_S(gQ), thr_g2s.partition_D(sQ))

        tKsK = thr_g2s.partition_D(sK)                      # (CPY, rows, chunks, stages)
        tKcK = thr_g2s.partition_S(cute.make_identity_tensor((self.BN, self.d)))
        n_rows_thr = cute.size(tKsK, mode=[1])
        n_chunks_thr = cute.size(tKsK, mode=[2])

        # ---- MMA partitions ----
        thr_mma = tiled_mma.get_slice(tidx)
        tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
        tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK[None, None, 0]))
        tOrP = thr_mma.make_fragment_A(thr_mma.partition_A(sP))
        tOrVt = thr_mma.make_fragment_B(thr_mma.partition_B(sVt[None, None, 0]))
        acc_O = cute.make_rmem_tensor(thr_mma.partition_shape_C((self.M, self.d)), Float32)
        acc_O.fill(0.0)

        ld_a = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt)
        ld_b = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dt)
        ld_bt = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4), dt)
        s2r_A = cute.make_tiled_copy_A(ld_a, tiled_mma)
        s2r_B = cute.make_tiled_copy_B(ld_b, tiled_mma)
        s2r_Bt = cute.make_tiled_copy_B(ld_bt, tiled_mma)
        thr_A = s2r_A.get_slice(tidx)
        thr_B = s2r_B.get_slice(tidx)
        thr_Bt = s2r_Bt.get_slice(tidx)
        tSsQ = thr_A.partition_S(sQ)
        tSrQ_v = thr_A.retile(tSrQ)
        tSsK = thr_B.partition_S(sK)                        # (CPY, N, K, stages)
        tSrK_v = thr_B.retile(tSrK)
        tOsP = thr_A.partition_S(sP)
        tOrP_v = thr_A.retile(tOrP)
        tOsVt = thr_Bt.partition_S(sVt)
        tOrVt_v = thr_Bt.retile(tOrVt)

        st_P = cute.make_tiled_copy_C(cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dt), tiled_mma)
        thr_stP = st_P.get_slice(tidx)
        tPsP = thr_stP.partition_D(sP)

        cS = cute.make_identity_tensor((self.M, self.BN))
        tScS_mn = mn_view(thr_mma.partition_C(cS))
        acc_O_mn = mn_view(acc_O)
        n_r = cute.size(tScS_mn, mode=[0])
        row_max = cute.make_rmem_tensor((n_r,), Float32)
        row_sum = cute.make_rmem_tensor((n_r,), Float32)
        row_max.fill(-1.0e30)
        row_sum.fill(0.0)

        # ---- prologue: first tile ----
        if cutlass.const_expr(self.row_table):
            self._fill_table(tile_lo, tile_hi, sRowT, tidx, n_win, n_total, lo, b, t, mSwaBT, mCompBT, mTopk)
            cute.arch.barrier()
        if tile_lo < tile_hi:
            self._load_tile(tile_lo, 0, tKsK, tKcK, sBias, n_rows_thr, n_chunks_thr, tiled_g2s, tidx, n_win,
                            n_total, lo, b, t, safe, swa_base, comp_base, mSwaBT, mCompBT, mTopk, sRowT, tile_lo)
        cute.arch.cp_async_commit_group()

        for tile in cutlass.range(tile_lo, tile_hi, unroll=1):
            stage = (tile - tile_lo) % self.stages
            if tile + 1 < tile_hi:
                tbase = tile_lo
                if cutlass.const_expr(self.row_table):
                    tbase = tile_lo + ((tile + 1 - tile_lo) // self.TT) * self.TT
                    if tbase == tile + 1:
                        # every earlier entry was consumed when its tile was issued, before the last barrier
                        self._fill_table(tbase, tile_hi, sRowT, tidx, n_win, n_total, lo, b, t, mSwaBT, mCompBT,
                                         mTopk)
                        cute.arch.barrier()
                self._load_tile(tile + 1, (tile + 1 - tile_lo) % self.stages, tKsK, tKcK, sBias, n_rows_thr,
                                n_chunks_thr, tiled_g2s, tidx, n_win, n_total, lo, b, t, safe, swa_base,
                                comp_base, mSwaBT, mCompBT, mTopk, sRowT, tbase)
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(1)
            cute.arch.barrier()

            # S = Q K^T
            acc_S = cute.make_rmem_tensor(thr_mma.partition_shape_C((self.M, self.BN)), Float32)
            acc_S.fill(0.0)
            for k in cutlass.range_constexpr(cute.size(tSsQ.shape[2])):
                cute.copy(s2r_A, tSsQ[None, None, k], tSrQ_v[None, None, k])
                cute.copy(s2r_B, tSsK[None, None, k, stage], tSrK_v[None, None, k])
                cute.gemm(tiled_mma, acc_S, tSrQ[None, None, k], tSrK[None, None, k], acc_S)

            # online softmax, log2 domain, row max shared by the wn warps of a row
            self._online_softmax(mn_view(acc_S), acc_O_mn, row_max, row_sum, tScS_mn, sBias, sRed, warp_n, lane,
                                 stage, scale_log2)

            rP = cute.make_fragment_like(acc_S, dt)
            rP.store(acc_S.load().to(dt))
            cute.copy(st_P, thr_stP.retile(rP), tPsP)
            cute.arch.barrier()

            # O += P V
            for k in cutlass.range_constexpr(cute.size(tOsP.shape[2])):
                cute.copy(s2r_A, tOsP[None, None, k], tOrP_v[None, None, k])
                cute.copy(s2r_Bt, tOsVt[None, None, k, stage], tOrVt_v[None, None, k])
                cute.gemm(tiled_mma, acc_O, tOrP[None, None, k], tOrVt[None, None, k], acc_O)
            cute.arch.barrier()

        cute.arch.cp_async_wait_group(0)
        if cutlass.const_expr(self.split):
            # the combine kernel may be scheduled once every CTA is here; it still waits for this grid's writes
            cute.arch.griddepcontrol_launch_dependents()

        self._finish(acc_O, row_max, row_sum, tScS_mn, thr_mma, sRed, warp_n, lane, g, split_idx, t, mSink, mOut,
                     mOpart, mML)

    @cute.jit
    def _finish(self, acc_O: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor, tScS_mn: cute.Tensor,
                thr_mma: cute.ThrMma, sRed: cute.Tensor, warp_n: Int32, lane: Int32, g: Int32, split_idx: Int32,
                t: Int32, mSink: cute.Tensor, mOut: cute.Tensor, mOpart: cute.Tensor, mML: cute.Tensor):
        """Row sums across the quad and the wn column-warps (slot warp_n of sRed), then the split partial (O / l,
        row max, row sum) or, unsplit, the sink merge and the bf16 output. tScS_mn: the thread's (head, column)
        coordinates, rows in the order of mn_view(acc_O)."""
        dt = cutlass.BFloat16
        acc_O_mn = mn_view(acc_O)
        n_r = cute.size(tScS_mn, mode=[0])
        self._rows_across_slices(row_sum, tScS_mn, sRed, warp_n, lane, add)

        if cutlass.const_expr(self.split):
            for r in cutlass.range_constexpr(n_r):
                if warp_n == 0 and lane % 4 == 0:
                    h = g * self.M + tScS_mn[r, 0][0]
                    mML[t, split_idx, h, 0] = row_max[r]
                    mML[t, split_idx, h, 1] = row_sum[r]
                # normalised partial O / l (l = 0 only where O = 0: an empty split)
                inv = 1.0 / cute.arch.fmax(row_sum[r], Float32(1.0e-30))
                acc_O_mn[r, None] = acc_O_mn[r, None].load() * inv
            gO = cute.local_tile(mOpart[t, split_idx, None, None], (self.M, self.d), (g, 0))
            tOgO = thr_mma.partition_C(gO)
            if cutlass.const_expr(self.part_bf16):
                rOp = cute.make_fragment_like(acc_O, dt)
                rOp.store(acc_O.load().to(dt))
                cute.autovec_copy(rOp, tOgO)
            else:
                cute.autovec_copy(acc_O, tOgO)
        else:
            for r in cutlass.range_constexpr(n_r):
                h = g * self.M + tScS_mn[r, 0][0]
                sink2 = mSink[h] * LOG2_E
                m = row_max[r]
                mm = cute.arch.fmax(m, sink2)
                alpha = cute.math.exp2(m - mm, fastmath=True)
                denom = row_sum[r] * alpha + cute.math.exp2(sink2 - mm, fastmath=True)
                acc_O_mn[r, None] = acc_O_mn[r, None].load() * (alpha / denom)
            rO = cute.make_fragment_like(acc_O, dt)
            rO.store(acc_O.load().to(dt))
            gO = cute.local_tile(mOut[t, None, None], (self.M, self.d), (g, 0))
            cute.autovec_copy(rO, thr_mma.partition_C(gO))

    @cute.jit
    def _online_softmax(self, acc_S_mn: cute.Tensor, acc_O_mn: cute.Tensor, row_max: cute.Tensor,
                        row_sum: cute.Tensor, tScS_mn: cute.Tensor, sBias: cute.Tensor, sRed: cute.Tensor,
                        slot: Int32, lane: Int32, stage: Int32, scale_log2: Float32):
        """One tile of the online softmax, log2 domain, in place: S -> P = 2^(S - m) with the running row max m and
        row sum updated and O rescaled. This thread's columns are one of self.wn slices of the tile; their row maxima
        meet in sRed[slot] across a CTA barrier."""
        n_r = cute.size(tScS_mn, mode=[0])
        n_c = cute.size(tScS_mn, mode=[1])
        tile_max = cute.make_rmem_tensor((n_r,), Float32)
        for r in cutlass.range_constexpr(n_r):
            mx = -Float32.inf
            for c in cutlass.range_constexpr(n_c):
                v = acc_S_mn[r, c] * scale_log2 + sBias[tScS_mn[0, c][1], stage]
                acc_S_mn[r, c] = v
                mx = cute.arch.fmax(mx, v)
            tile_max[r] = mx
        self._rows_across_slices(tile_max, tScS_mn, sRed, slot, lane, cute.arch.fmax)
        for r in cutlass.range_constexpr(n_r):
            mt = tile_max[r]
            m_old = row_max[r]
            m_new = cute.arch.fmax(m_old, mt)
            alpha = cute.math.exp2(m_old - m_new, fastmath=True)
            row_max[r] = m_new
            ssum = Float32(0.0)
            for c in cutlass.range_constexpr(n_c):
                e = cute.math.exp2(acc_S_mn[r, c] - m_new, fastmath=True)
                acc_S_mn[r, c] = e
                ssum = ssum + e
            row_sum[r] = row_sum[r] * alpha + ssum
            acc_O_mn[r, None] = acc_O_mn[r, None].load() * alpha

    @cute.jit
    def _rows_across_slices(self, vals: cute.Tensor, tScS_mn: cute.Tensor, sRed: cute.Tensor, slot: Int32,
                            lane: Int32, op):
        """vals[r] (this thread's value for its row r) becomes the row's total under `op` over the whole CTA: over
        the quad of threads sharing the row by shuffles, then over the self.wn column-warps through sRed[slot]
        across one CTA barrier."""
        n_r = cute.size(tScS_mn, mode=[0])
        for r in cutlass.range_constexpr(n_r):
            v = _quad(vals[r], op)
            if lane % 4 == 0:
                sRed[slot, tScS_mn[r, 0][0]] = v
        cute.arch.barrier()
        for r in cutlass.range_constexpr(n_r):
            row = tScS_mn[r, 0][0]
            v = sRed[0, row]
            for j in cutlass.range_constexpr(1, self.wn):
                v = op(v, sRed[j, row])
            vals[r] = v

    @cute.jit
    def _load_tile(self, tile: Int32, stage: Int32, tKsK: cute.Tensor, tKcK: cute.Tensor, sBias: cute.Tensor,
                   n_rows_thr: cutlass.Constexpr, n_chunks_thr: cutlass.Constexpr, tiled_g2s: cute.TiledCopy,
                   tidx: Int32, n_win: Int32, n_total: Int32, lo: Int32, b: Int32, t: Int32, safe: Int64,
                   swa_base: Int64, comp_base: Int64, mSwaBT: cute.Tensor, mCompBT: cute.Tensor,
                   mTopk: cute.Tensor, sRowT: cute.Tensor, tbase: Int32):
        for m in cutlass.range_constexpr(n_rows_thr):
            row = tKcK[0, m, 0][0]
            n = tile * self.BN + row
            if cutlass.const_expr(self.row_table):
                code = sRowT[(tile - tbase) * self.BN + row]
            else:
                code = self._row_code(n, n_win, n_total, lo, b, t, mSwaBT, mCompBT, mTopk)
            # masked rows read a safe row (the token's own window row) and get -inf
            addr = safe
            valid = Int32(0)
            if code >= 0:
                valid = Int32(1)
                base = comp_base
                if n < n_win:
                    base = swa_base
                addr = base + Int64(code) * (self.d * 2)
            if tidx % 8 == 0:
                sBias[row, stage] = 0.0 if valid == 1 else -Float32.inf
            src_row = cute.make_tensor(cute.make_ptr(cutlass.BFloat16, addr, cute.AddressSpace.gmem,
                                                     assumed_align=16), cute.make_layout((self.d,)))
            src_chunks = cute.tiled_divide(src_row, (8,))
            for k in cutlass.range_constexpr(n_chunks_thr):
                ki = tKcK[0, 0, k][1] // 8
                dst = tKsK[None, m, k, stage]
                src = cute.make_tensor(src_chunks[None, ki].iterator, dst.layout)
                cute.copy(tiled_g2s, src, dst)


class SplitCombine:
    """out[t, h] = (sum_s w_s O_s) / (2^(sink - M) + sum_s w_s), w_s = 2^(m_s - M) l_s, M = max(sink, m_s);
    O_s are the normalised split partials (bf16 or fp32), (m_s, l_s) their row max (log2 domain) and sum."""

    VEC = 8

    def __init__(self, head_dim: int, pdl: bool | None = None, unroll: int | None = None, hoist: bool | None = None):
        assert head_dim % self.VEC == 0
        self.d = head_dim
        self.threads = head_dim // self.VEC
        self.pdl = ATTN_PDL if pdl is None else pdl
        self.unroll = COMBINE_UNROLL if unroll is None else unroll
        self.hoist = pdl_flags.HOIST if hoist is None else hoist     # see dsv4_kernels.pdl.hoist

    @cute.jit
    def __call__(self, mOpart: cute.Tensor, mML: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor,
                 num_splits: Int32, stream):
        self.kernel(mOpart, mML, mSink, mOut, num_splits).launch(
            grid=(cute.size(mOut.shape[1]), cute.size(mOut.shape[0]), 1), block=[self.threads, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mOpart: cute.Tensor, mML: cute.Tensor, mSink: cute.Tensor, mOut: cute.Tensor,
               num_splits: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        h, t, _ = cute.arch.block_idx()
        res = self._merge(mOpart, mML, mSink, num_splits, h, t, tidx)
        cute.autovec_copy(res, cute.local_tile(mOut[t, h, None], (self.VEC,), (tidx,)))

    @cute.jit
    def _merge(self, mOpart: cute.Tensor, mML: cute.Tensor, mSink: cute.Tensor, num_splits: Int32, h: Int32,
               t: Int32, tidx: Int32) -> cute.Tensor:
        """-> this thread's VEC channels of out[t, h] (bf16 registers)."""
        sink2 = mSink[h] * LOG2_E if cutlass.const_expr(self.hoist) else None    # a weight: before the wait
        if cutlass.const_expr(self.pdl):
            cute.arch.griddepcontrol_launch_dependents()     # the next kernel may wait resident (dsv4_kernels.pdl)
        # launched as a programmatic dependent: the partials are complete only after this (a no-op otherwise)
        cute.arch.griddepcontrol_wait()
        if cutlass.const_expr(not self.hoist):
            sink2 = mSink[h] * LOG2_E
        mx = sink2
        for s in cutlass.range(num_splits, unroll=self.unroll):
            mx = cute.arch.fmax(mx, mML[t, s, h, 0])
        denom = cute.math.exp2(sink2 - mx, fastmath=True)
        acc = cute.make_rmem_tensor((self.VEC,), Float32)
        acc.fill(0.0)
        for s in cutlass.range(num_splits, unroll=self.unroll):
            w = cute.math.exp2(mML[t, s, h, 0] - mx, fastmath=True) * mML[t, s, h, 1]
            denom = denom + w
            src = cute.local_tile(mOpart[t, s, h, None], (self.VEC,), (tidx,))
            frag = cute.make_rmem_tensor((self.VEC,), mOpart.element_type)
            cute.autovec_copy(src, frag)
            acc.store(acc.load() + frag.load().to(Float32) * w)
        inv = 1.0 / denom
        res = cute.make_rmem_tensor((self.VEC,), cutlass.BFloat16)
        res.store((acc.load() * inv).to(cutlass.BFloat16))
        return res


class SplitCombineRope(SplitCombine):
    """SplitCombine, then the inverse RoPE of the output's last `rope_dim` channels at the token's position: the
    attention output's rotation back (RopeTail inverse) in the same launch, with its bits (the bf16 output rotated
    in fp32, rounded once). cos / sin: the RopeTail tables [positions, rope_dim / 2]."""

    def __init__(self, head_dim: int, rope_dim: int, pdl: bool | None = None, unroll: int | None = None,
                 hoist: bool | None = None):
        super().__init__(head_dim, pdl, unroll, hoist)
        assert rope_dim % self.VEC == 0 and 0 < rope_dim <= head_dim
        self.rd = rope_dim

    @cute.jit
    def __call__(self, mOpart: cute.Tensor, mML: cute.Tensor, mSink: cute.Tensor, mPos: cute.Tensor,
                 mCos: cute.Tensor, mSin: cute.Tensor, mOut: cute.Tensor, num_splits: Int32, stream):
        self.kernel(mOpart, mML, mSink, mPos, mCos, mSin, mOut, num_splits).launch(
            grid=(cute.size(mOut.shape[1]), cute.size(mOut.shape[0]), 1), block=[self.threads, 1, 1],
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mOpart: cute.Tensor, mML: cute.Tensor, mSink: cute.Tensor, mPos: cute.Tensor,
               mCos: cute.Tensor, mSin: cute.Tensor, mOut: cute.Tensor, num_splits: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        h, t, _ = cute.arch.block_idx()
        res = self._merge(mOpart, mML, mSink, num_splits, h, t, tidx)
        first = tidx * self.VEC - (self.d - self.rd)
        if first >= 0:
            rotate_tail(res, first, mPos[t], mCos, mSin, True)
        cute.autovec_copy(res, cute.local_tile(mOut[t, h, None], (self.VEC,), (tidx,)))


def plan_splits(max_rows: int, n_tokens: int, head_groups: int, block_n: int = 64, num_sms: int = 132,
                min_tiles: int = 2) -> tuple[int, int]:
    """-> (num_splits, tiles_per_split): about one wave of CTAs when the token count alone does not fill the GPU.
    One tile per split when even that fits in one wave (small batch: the kernel is latency-bound per tile), else at
    least `min_tiles` tiles per split (each split writes a [M, d] fp32 partial that the combine kernel reads back).
    Measured on H100 (docs/PERF_ATTENTION.md): H=64 as 2 groups of 32 heads, batch 64: 1 split; batch 16: 4."""
    tiles = max(1, math.ceil(max_rows / block_n))
    ctas = n_tokens * head_groups
    if ctas * tiles <= num_sms:
        return tiles, 1
    want = max(1, num_sms // max(1, ctas))
    splits = max(1, min(want, tiles // min_tiles))
    per = math.ceil(tiles / splits)
    return math.ceil(tiles / per), per
