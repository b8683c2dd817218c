"""Sparse (CSA / HCA / window) attention decode on Hopper warpgroup MMA: 64 heads per CTA, two warpgroups.

Same function, row lists, masks and launch signature as `SparseDecodeAttention` (attention_decode.py, which
documents the row lists); the math engine and the split merge differ. The mma.sync kernel re-reads its slices of Q, K
and V from shared memory through ldmatrix in every warp; here a tile of BN rows is one pass of wgmma over shared
memory:

    S = Q Kᵀ   wgmma m64 x n(BN/2) x k16, A = Q (64 heads x d) and B = the tile's rows, both K-major in smem;
               warpgroup w takes tile rows [w BN/2, (w+1) BN/2).
    P          the two warpgroups exchange their row maxima through smem (one barrier) and write P (bf16) into a
               64 x BN smem tile with stmatrix.
    O += P V   wgmma m64 x n(d/2) x k16, A = P from smem, B = the same rows read as V (MN-major view of the tile);
               warpgroup w owns output columns [w d/2, (w+1) d/2): 64 x 256 fp32 = 128 registers a thread.

Keys and values are the same rows, so a tile is gathered once (16-byte cp.async through the block tables and the
parent's shared-memory row table) and read by both GEMMs; `stages - 1` tiles are in flight. Q (64 KiB) + 2 stages of
64 rows (128 KiB) + P fill one SM's shared memory: one CTA per SM.

64-head CTAs need splits to fill the GPU, and fp32 split partials through global memory cost what the faster math
saved (H100, docs/PERF.md session 19). With `cluster` = C > 1 the C splits of a token run as one thread-block cluster:
each CTA stages its unnormalised O, row max and row sum in its own (now free) shared memory, and after a cluster
barrier each CTA merges its share of the head rows from all C through distributed shared memory and writes the
output. What bounds the kernel now is the gather itself (cp.async through the LSU, ncu: barrier and lg_throttle
stalls), not the math.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.cute.nvgpu import cpasync, warp, warpgroup

from dsv4_kernels.attention_decode import LOG2_E, SparseDecodeAttention
from dsv4_kernels.cute_utils import add, mn_view
from dsv4_kernels.pdl import chain_entry

HEADS = 64          # wgmma's M: one CTA serves 64 query heads
MAX_CLUSTER = 8     # portable cluster size: the most splits merged through distributed shared memory


@dsl_user_op
def _ld_cluster_f32(addr: Int32, rank: Int32, *, loc=None, ip=None) -> Float32:
    """fp32 at shared address `addr` of the cluster's CTA `rank` (mapa + ld.shared::cluster)."""
    return Float32(llvm.inline_asm(
        T.f32(), [Int32(addr).ir_value(loc=loc, ip=ip), Int32(rank).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 ra;\n\tmapa.shared::cluster.u32 ra, $1, $2;\n\tld.shared::cluster.f32 $0, [ra];\n\t}",
        "=f,r,r", has_side_effects=True, loc=loc, ip=ip))


@dsl_user_op
def _ld_cluster_v4(addr: Int32, rank: Int32, *, loc=None, ip=None):
    """4 consecutive fp32 (16-byte aligned) at shared address `addr` of the cluster's CTA `rank`."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.f32()] * 4),
        [Int32(addr).ir_value(loc=loc, ip=ip), Int32(rank).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 ra;\n\tmapa.shared::cluster.u32 ra, $4, $5;\n\t"
        "ld.shared::cluster.v4.f32 {$0, $1, $2, $3}, [ra];\n\t}",
        "=f,=f,=f,=f,r,r", has_side_effects=True, loc=loc, ip=ip)
    return tuple(Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))


class SparseDecodeAttentionWgmma(SparseDecodeAttention):
    """Compile-time configuration of one wgmma kernel variant (64 heads per CTA, 256 threads)."""

    BN_MULTIPLE = 32    # P's smem atom: 128B swizzle for 64-row tiles, 64B for 32-row ones

    def __init__(self, head_dim: int, mode: int, window: int, block_size: int, ratio: int, topk: int, split: bool,
                 block_n: int = 64, stages: int = 2, part_bf16: bool = False, topk_i64: bool = False,
                 table_tiles: int = 16, cluster: int = 1, pdl: bool = False):
        assert 2 <= stages <= table_tiles
        # cluster > 1: the token's `cluster` splits run as one thread-block cluster and merge their partials through
        # distributed shared memory (no fp32 partials through global memory, no second kernel); split then is False
        assert 1 <= cluster <= MAX_CLUSTER and not (cluster > 1 and split)
        # the fp32 O staging buffer (64 x (d + 8)) reuses Q's and the stages' shared memory once the tiles are done
        assert 64 * (head_dim + 8) * 4 <= 2 * 64 * head_dim + 2 * stages * block_n * head_dim
        self.cluster = cluster
        super().__init__(head_dim, HEADS, mode, window, block_size, ratio, topk, split, block_n=block_n,
                         stages=stages, part_bf16=part_bf16, topk_i64=topk_i64, row_table=True,
                         table_tiles=table_tiles, pdl=pdl)
        # wgmma n of the P V product is d / 2 per warpgroup (at most 256), of Q Kᵀ BN / 2 (a multiple of 8)
        assert head_dim // 2 <= 256
        self.threads = 256
        self.wn = 2                     # slots of the cross-warpgroup row reductions (sRed)

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mSwa: cute.Tensor, mComp: cute.Tensor, mPos: cute.Tensor,
                 mSeq: cute.Tensor, mSwaBT: cute.Tensor, mCompBT: cute.Tensor, mTopk: cute.Tensor,
                 mSink: cute.Tensor, mOut: cute.Tensor, mOpart: cute.Tensor, mML: cute.Tensor,
                 scale_log2: Float32, tiles_per_split: Int32, num_splits: Int32, stream):
        dt = cutlass.BFloat16
        kind_k = warpgroup.SmemLayoutAtomKind.K_SW128
        atom_k = warpgroup.make_smem_layout_atom(kind_k, dt)             # 8 rows x 64 elements, 128B swizzle
        sQ_layout = cute.tile_to_shape(atom_k, (self.M, self.d), (0, 1))
        sK_layout = cute.tile_to_shape(atom_k, (self.BN, self.d, self.stages), (0, 1, 2))
        p_kind = kind_k if self.BN % 64 == 0 else warpgroup.SmemLayoutAtomKind.K_SW64
        sP_layout = cute.tile_to_shape(warpgroup.make_smem_layout_atom(p_kind, dt), (self.M, self.BN), (0, 1))

        @cute.struct
        class Storage:
            sQ: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sK_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dt, cute.cosize(sP_layout)], 1024]
            sBias: cute.struct.Align[cute.struct.MemRange[Float32, self.BN * self.stages], 16]
            sRed: cute.struct.Align[cute.struct.MemRange[Float32, self.wn * self.M], 16]
            sRowT: cute.struct.Align[cute.struct.MemRange[Int32, self.TT * self.BN], 16]
            sML: cute.struct.Align[cute.struct.MemRange[Float32, 2 * self.M], 16]

        g2s = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dt,
                                  num_bits_per_copy=128)
        tiled_g2s = cute.make_tiled_copy_tv(g2s, cute.make_layout((self.threads // 8, 8), stride=(8, 1)),
                                            cute.make_layout((1, 8)))
        K_major = warpgroup.OperandMajorMode.K
        mma_s = sm90_utils.make_trivial_tiled_mma(dt, dt, K_major, K_major, Float32, (1, 2, 1),
                                                  (self.M, self.BN // 2))
        mma_o = sm90_utils.make_trivial_tiled_mma(dt, dt, K_major, warpgroup.OperandMajorMode.MN, Float32,
                                                  (1, 2, 1), (self.M, self.d // 2))
        grid = (cute.size(mQ.shape[1]) // self.M, num_splits, cute.size(mQ.shape[0]))
        self.kernel(mQ, mSwa, mComp, mPos, mSeq, mSwaBT, mCompBT, mTopk, mSink, mOut, mOpart, mML, scale_log2,
                    tiles_per_split, sQ_layout, sK_layout, sP_layout, tiled_g2s, mma_s, mma_o, Storage).launch(
            grid=grid, block=[self.threads, 1, 1], cluster=[1, self.cluster, 1], smem=Storage.size_in_bytes(),
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mSwa: cute.Tensor, mComp: cute.Tensor, mPos: cute.Tensor,
               mSeq: cute.Tensor, mSwaBT: cute.Tensor, mCompBT: cute.Tensor, mTopk: cute.Tensor,
               mSink: cute.Tensor, mOut: cute.Tensor, mOpart: cute.Tensor, mML: cute.Tensor,
               scale_log2: Float32, tiles_per_split: Int32, sQ_layout: cute.ComposedLayout,
               sK_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout, tiled_g2s: cute.TiledCopy,
               mma_s: cute.TiledMma, mma_o: cute.TiledMma, Storage: cutlass.Constexpr):
        chain_entry(self.pdl)
        dt = cutlass.BFloat16
        tidx, _, _ = cute.arch.thread_idx()
        g, split_idx, t = cute.arch.block_idx()
        lane = tidx % 32
        wg = cute.arch.make_warp_uniform(tidx // 128)

        b, n_win, lo, n_total, tile_lo, tile_hi, swa_base, comp_base, safe = self._row_list(
            t, split_idx, tiles_per_split, mPos, mSeq, mSwa, mComp, mSwaBT)

        # the swizzle lives on the pointers (wgmma descriptors need plain layouts over swizzled smem)
        smem = cutlass.memory.SmemAllocator()
        st = smem.allocate(Storage)
        sQ = st.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = st.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sP = st.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        sBias = st.sBias.get_tensor(cute.make_layout((self.BN, self.stages)))
        sRed = st.sRed.get_tensor(cute.make_layout((self.wn, self.M)))
        sRowT = st.sRowT.get_tensor(cute.make_layout((self.TT * self.BN,)))
        # V = the same rows, read as the (d x BN) MN-major B operand of P V
        sVt = cute.composition(sK, cute.make_ordered_layout((self.d, self.BN, self.stages), order=(1, 0, 2)))

        # ---- global -> shared gathers ----
        thr_g2s = tiled_g2s.get_slice(tidx)
        gQ = cute.local_tile(mQ[t, None, None], (self.M, self.d), (g, 0))
        cute.copy(tiled_g2s, thr_g2s.partition_S(gQ), thr_g2s.partition_D(sQ))
        tKsK = thr_g2s.partition_D(sK)
        tKcK = thr_g2s.partition_S(cute.make_identity_tensor((self.BN, self.d)))
        n_rows_thr = cute.size(tKsK, mode=[1])
        n_chunks_thr = cute.size(tKsK, mode=[2])

        # ---- warpgroup MMA operands: smem descriptors per warpgroup, accumulators per thread ----
        wg_s = mma_s.get_slice(wg * 128)
        wg_o = mma_o.get_slice(wg * 128)
        thr_s = mma_s.get_slice(tidx)
        thr_o = mma_o.get_slice(tidx)
        tSrQ = wg_s.make_fragment_A(wg_s.partition_A(sQ))                # (MMA, 1, d/16)
        tSrK = wg_s.make_fragment_B(wg_s.partition_B(sK))                # (MMA, 1, d/16, stages)
        tOrP = wg_o.make_fragment_A(wg_o.partition_A(sP))                # (MMA, 1, BN/16)
        tOrV = wg_o.make_fragment_B(wg_o.partition_B(sVt))               # (MMA, 1, BN/16, stages)
        acc_O = cute.make_rmem_tensor(wg_o.partition_shape_C((self.M, self.d)), Float32)
        acc_O.fill(0.0)
        acc_O_mn = mn_view(acc_O)

        st_P = cute.make_tiled_copy_C(
            cute.make_copy_atom(warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4), dt), mma_s)
        thr_stP = st_P.get_slice(tidx)
        tPsP = thr_stP.partition_D(sP)

        tScS_mn = mn_view(thr_s.partition_C(cute.make_identity_tensor((self.M, self.BN))))
        n_r = cute.size(tScS_mn, mode=[0])
        row_max = cute.make_rmem_tensor((n_r,), Float32)
        row_sum = cute.make_rmem_tensor((n_r,), Float32)
        row_max.fill(-1.0e30)
        row_sum.fill(0.0)

        # ---- prologue: Q and the first stages-1 tiles, one cp.async group per tile (Q joins the first) ----
        S = self.stages
        self._fill_table(tile_lo, tile_hi, sRowT, tidx, n_win, n_total, lo, b, t, mSwaBT, mCompBT, mTopk)
        cute.arch.barrier()
        for j in cutlass.range_constexpr(S - 1):
            if tile_lo + j < tile_hi:
                self._load_tile(tile_lo + j, j, tKsK, tKcK, sBias, n_rows_thr, n_chunks_thr, tiled_g2s, tidx,
                                n_win, n_total, lo, b, t, safe, swa_base, comp_base, mSwaBT, mCompBT, mTopk, sRowT,
                                tile_lo)
            cute.arch.cp_async_commit_group()

        for tile in cutlass.range(tile_lo, tile_hi, unroll=1):
            stage = (tile - tile_lo) % S
            # this tile's rows landed (stages-2 newer groups may still fly); cp.async wrote them through the generic
            # proxy and wgmma reads through the async one: fence, then the barrier also tells every thread that the
            # last tile's P V is done, so its stage, sP and sRed are free
            cute.arch.cp_async_wait_group(S - 2)
            cute.arch.fence_view_async_shared()
            cute.arch.barrier()
            # keep stages-1 tiles in flight: the gather latency, not bandwidth, bounds one CTA per SM
            nxt = tile + S - 1
            if nxt < tile_hi:
                tbase = tile_lo + ((nxt - tile_lo) // self.TT) * self.TT
                if tbase == nxt:
                    # every earlier entry was consumed when its tile was issued, before the last barrier
                    self._fill_table(tbase, tile_hi, sRowT, tidx, n_win, n_total, lo, b, t, mSwaBT, mCompBT,
                                     mTopk)
                    cute.arch.barrier()
                self._load_tile(nxt, (nxt - tile_lo) % S, tKsK, tKcK, sBias, n_rows_thr, n_chunks_thr, tiled_g2s,
                                tidx, n_win, n_total, lo, b, t, safe, swa_base, comp_base, mSwaBT, mCompBT, mTopk,
                                sRowT, tbase)
            cute.arch.cp_async_commit_group()

            # S = Q Kᵀ over this warpgroup's half of the tile rows
            acc_S = cute.make_rmem_tensor(wg_s.partition_shape_C((self.M, self.BN)), Float32)
            # fresh atoms per tile: their ACCUMULATE field is mutated inside this loop
            atom_s = cute.make_mma_atom(mma_s.op)
            atom_s.set(warpgroup.Field.ACCUMULATE, False)
            warpgroup.fence()
            for k in cutlass.range_constexpr(cute.size(tSrQ.shape[2])):
                cute.gemm(atom_s, acc_S, tSrQ[None, None, k], tSrK[None, None, k, stage], acc_S)
                atom_s.set(warpgroup.Field.ACCUMULATE, True)
            warpgroup.commit_group()
            warpgroup.wait_group(0)

            # online softmax in the log2 domain; both warpgroups take the maximum over the whole tile
            self._online_softmax(mn_view(acc_S), acc_O_mn, row_max, row_sum, tScS_mn, sBias, sRed, wg, lane, stage,
                                 scale_log2)
            rP = cute.make_fragment_like(acc_S, dt)
            rP.store(acc_S.load().to(dt))
            cute.copy(st_P, thr_stP.retile(rP), tPsP)
            cute.arch.fence_view_async_shared()
            cute.arch.barrier()

            # O += P V over this warpgroup's half of the output columns
            atom_o = cute.make_mma_atom(mma_o.op)
            atom_o.set(warpgroup.Field.ACCUMULATE, True)
            warpgroup.fence()
            for k in cutlass.range_constexpr(cute.size(tOrP.shape[2])):
                cute.gemm(atom_o, acc_O, tOrP[None, None, k], tOrV[None, None, k, stage], acc_O)
            warpgroup.commit_group()
            warpgroup.wait_group(0)

        cute.arch.cp_async_wait_group(0)
        if cutlass.const_expr(self.split):
            cute.arch.griddepcontrol_launch_dependents()       # as in the mma.sync kernel: the combine's PDL
        # the row sums are split across the two warpgroups' columns of S: both paths add the sRed slots
        cute.arch.barrier()
        if cutlass.const_expr(self.cluster > 1):
            # Q and the stages are free now: they hold this CTA's fp32 O for the cluster merge
            sO = cute.make_tensor(cute.recast_ptr(st.sQ.data_ptr(), dtype=Float32),
                                  cute.make_layout((self.M, self.d), stride=(self.d + 8, 1)))
            sML = st.sML.get_tensor(cute.make_layout((self.M, 2), stride=(2, 1)))
            self._cluster_merge(acc_O, row_max, row_sum, tScS_mn, thr_o, sRed, sML, sO, wg, lane, tidx, g, t,
                                mSink, mOut)
        else:
            self._finish(acc_O, row_max, row_sum, tScS_mn, thr_o, sRed, wg, lane, g, split_idx, t, mSink, mOut,
                         mOpart, mML)

    @cute.jit
    def _cluster_merge(self, acc_O: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor, tScS_mn: cute.Tensor,
                       thr_o: cute.ThrMma, sRed: cute.Tensor, sML: cute.Tensor, sO: cute.Tensor, wg: Int32,
                       lane: Int32, tidx: Int32, g: Int32, t: Int32, mSink: cute.Tensor, mOut: cute.Tensor):
        """Every CTA of the cluster (one per split) stages its unnormalised O, row max and row sum in its shared
        memory; then CTA `rank` merges head rows [rank R, (rank + 1) R) of all of them with the sink,
        out = sum_c 2^(m_c - M) O_c / (2^(sink - M) + sum_c 2^(m_c - M) l_c), M = max(sink, m_c), reading the
        peers' shared memory directly, and writes the bf16 output rows."""
        n_r = cute.size(tScS_mn, mode=[0])
        self._rows_across_slices(row_sum, tScS_mn, sRed, wg, lane, add)
        for r in cutlass.range_constexpr(n_r):
            if wg == 0 and lane % 4 == 0:
                row = tScS_mn[r, 0][0]
                sML[row, 0] = row_max[r]
                sML[row, 1] = row_sum[r]
        cute.autovec_copy(acc_O, thr_o.partition_C(sO))
        # release this CTA's stores, acquire the peers'
        cute.arch.cluster_arrive()
        cute.arch.cluster_wait()

        C = self.cluster
        rows_per = (self.M + C - 1) // C
        tpr = self.d // 8                       # threads per output row, 8 columns each
        rpp = self.threads // tpr               # rows per pass
        rank = cute.arch.block_idx_in_cluster()
        col = (tidx % tpr) * 8
        h_lo = rank * rows_per
        h_hi = cutlass.min(h_lo + rows_per, self.M)
        ml_base = Int32(sML.iterator.toint())
        o_base = Int32(sO.iterator.toint())
        for hh in cutlass.range(h_lo + tidx // tpr, h_hi, rpp, unroll=1):
            h = g * self.M + hh
            sink2 = mSink[h] * LOG2_E
            mx = sink2
            for c in cutlass.range_constexpr(C):
                mx = cute.arch.fmax(mx, _ld_cluster_f32(ml_base + hh * 8, c))
            denom = cute.math.exp2(sink2 - mx, fastmath=True)
            acc = cute.make_rmem_tensor((8,), Float32)
            acc.fill(0.0)
            for c in cutlass.range_constexpr(C):
                w = cute.math.exp2(_ld_cluster_f32(ml_base + hh * 8, c) - mx, fastmath=True)
                denom = denom + w * _ld_cluster_f32(ml_base + hh * 8 + 4, c)
                for half in cutlass.range_constexpr(2):
                    v = _ld_cluster_v4(o_base + (hh * (self.d + 8) + col + 4 * half) * 4, c)
                    for i in cutlass.range_constexpr(4):
                        acc[4 * half + i] = acc[4 * half + i] + w * v[i]
            inv = 1.0 / denom
            res = cute.make_rmem_tensor((8,), cutlass.BFloat16)
            res.store((acc.load() * inv).to(cutlass.BFloat16))
            cute.autovec_copy(res, cute.local_tile(mOut[t, h, None], (8,), (tidx % tpr,)))
        # peers keep their shared memory until every CTA of the cluster has read it
        cute.arch.cluster_arrive()
        cute.arch.cluster_wait()
