"""The routed-expert bookkeeping of nvfp4_moe's grouped path in one kernel: assignments sorted by expert.

For A = T * topk (token, expert) assignments with expert ids `ids` [A] and routing weights `w` [A], the grouped
GEMMs need them grouped by expert, stably (by assignment index within an expert, what torch.argsort(stable=True)
gives):
    offs [E + 1]   start of each expert's group (exclusive prefix sum of the per-expert counts),
    perm [A]       assignment index at each sorted position,
    rows [A]       its token (perm // topk),
    wts  [A]       its weight (fp32).
nvfp4_moe computes these with ~10 torch launches (argsort, scatter_add, cumsum, casts, a gather): ~30 µs at batch 1
on H100 (docs/PERF.md), more than the down projection. Here one warp does it, for A up to MAX_ASSIGN:
two passes over chunks of 32 assignments; in a chunk `match.any` groups the lanes with the same expert, a lane's
rank in its group is the popcount of the lower lanes of the group, and the group's last lane advances the expert's
counter in shared memory (pass 1: counts; between the passes a warp scan turns them into offsets; pass 2: each lane
writes its assignment at offset + rank). No atomics, deterministic, stable.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32

MAX_ASSIGN = 2048
MAX_EXPERTS = 1024
FULL = 0xFFFFFFFF


class MoeSort:
    def __init__(self, n_experts: int, topk: int):
        if n_experts % 32 or not 32 <= n_experts <= MAX_EXPERTS or topk < 1:
            raise ValueError(f"MoeSort: n_experts must be a multiple of 32 in [32, {MAX_EXPERTS}], topk >= 1; got "
                             f"{n_experts}, {topk}")
        self.e, self.k = n_experts, topk
        self.per_lane = n_experts // 32

    @cute.jit
    def __call__(self, mIds: cute.Tensor, mW: cute.Tensor, mOffs: cute.Tensor, mPerm: cute.Tensor,
                 mRows: cute.Tensor, mWts: cute.Tensor, stream):
        @cute.struct
        class Storage:
            cnt: cute.struct.Align[cute.struct.MemRange[Int32, self.e], 16]

        self.kernel(mIds, mW, mOffs, mPerm, mRows, mWts, Storage).launch(
            grid=(1, 1, 1), block=[32, 1, 1], smem=Storage.size_in_bytes(), stream=stream)

    @cute.kernel
    def kernel(self, mIds: cute.Tensor, mW: cute.Tensor, mOffs: cute.Tensor, mPerm: cute.Tensor,
               mRows: cute.Tensor, mWts: cute.Tensor, Storage: cutlass.Constexpr):
        lane = cute.arch.lane_idx()
        A = cute.size(mIds.shape[0])
        smem = cutlass.memory.SmemAllocator()
        cnt = smem.allocate(Storage).cnt.get_tensor(cute.make_layout((self.e,)))
        for i in cutlass.range_constexpr(self.per_lane):
            cnt[lane * self.per_lane + i] = Int32(0)
        cute.arch.sync_warp()
        lt = cute.arch.lanemask_lt()
        gt = cute.arch.lanemask_gt()
        chunks = (A + 31) // 32
        # pass 1: per-expert counts
        for c in cutlass.range(chunks, unroll=1):
            a = c * 32 + lane
            e = Int32(self.e)                          # lanes past the end form their own group and write nothing
            if a < A:
                e = Int32(mIds[a])
            same = cute.arch.match_sync(FULL, e)
            if a < A:
                if (same & gt) == 0:
                    cnt[e] = cnt[e] + Int32(cute.arch.popc(same))
            cute.arch.sync_warp()
        # counts -> start offsets: each lane owns per_lane consecutive experts
        local = Int32(0)
        for i in cutlass.range_constexpr(self.per_lane):
            local = local + cnt[lane * self.per_lane + i]
        incl = local
        for off in (1, 2, 4, 8, 16):
            v = cute.arch.shuffle_sync_up(incl, offset=off)
            if lane >= off:
                incl = incl + v
        run = incl - local
        for i in cutlass.range_constexpr(self.per_lane):
            j = lane * self.per_lane + i
            n = cnt[j]
            mOffs[j] = run
            cnt[j] = run
            run = run + n
        if lane == 31:
            mOffs[self.e] = run
        cute.arch.sync_warp()
        # pass 2: each assignment at its expert's next free position, in assignment order
        for c in cutlass.range(chunks, unroll=1):
            a = c * 32 + lane
            e = Int32(self.e)
            if a < A:
                e = Int32(mIds[a])
            same = cute.arch.match_sync(FULL, e)
            if a < A:
                pos = cnt[e] + Int32(cute.arch.popc(same & lt))
                mPerm[pos] = a
                mRows[pos] = a // self.k
                mWts[pos] = mW[a]
            cute.arch.sync_warp()
            if a < A:
                if (same & gt) == 0:
                    cnt[e] = cnt[e] + Int32(cute.arch.popc(same))
            cute.arch.sync_warp()
