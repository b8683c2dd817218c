"""NVFP4 decode GEMV (one token, or up to 8 on long K streams) whose weight stream goes through cp.async into a
shared-memory ring.

nvfp4_gemm._Gemv loads each lane's weight words into registers, then decodes them: a warp's loads return in order,
so a warp holds only the loads it issued before its math (ncu: ~70 % of warp time on the long scoreboard). Here each
lane copies its 16 B per chunk with cp.async (no registers held) into a STAGES-deep ring per warp, STAGES - 1 stages
ahead of the math; the CTA's x split is staged in shared memory once; the math reads shared memory. Same per-lane
accumulation order as _Gemv, so with the same K splits the output is bit-identical (tested).

H100, cold L2 (a probe of session 17 with 10 weight copies per graph replay, docs/PERF.md), µs register GEMV ->
ring (U = 4 chunks per stage, 4 stages): Flash wq_b 12.0 -> 10.3, wo_b 14.3 -> 12.0, Pro wq_b 25.1 -> 22.9, Pro wo_b
36.9 -> 27.9, head 117.6 -> 106.8; Flash expert w1 (4.7 MB) 6.3 -> 6.6, so the ring is used from 16 MB of weights up
(`use_ring`). `dsv4 bench gemm --cold-l2` on the final code: Pro wo_b 36.2 -> 27.7 us (3.19x cuBLAS BF16).
"""

from __future__ import annotations

import os

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

from cutlass.cutlass_dsl import dsl_user_op
from cutlass._mlir.dialects import llvm

from dsv4_kernels.nvfp4_gemm import (KCHUNK, ROWTILE, WARPS, _fake, _options, _stream_arg, decode_chunk,
                                     mma_block)

_COMPILED: dict = {}


@dsl_user_op
def _cp_async16(dst_smem: Int32, src: Int64, *, loc=None, ip=None):
    llvm.inline_asm(None, [Int32(dst_smem).ir_value(loc=loc, ip=ip), Int64(src).ir_value(loc=loc, ip=ip)],
                    "cp.async.cg.shared.global [$0], [$1], 16;", "r,l", has_side_effects=True, loc=loc, ip=ip)


def ring_smem(st, stages: int, u: int) -> tuple:
    """A ring's shared memory (Storage fields sw, ss: WARPS x stages x u chunks of 32 lanes' 16 B codes and 2 B
    scales) -> (sw, ss, their addresses)."""
    sw = st.sw.get_tensor(cute.make_layout((WARPS, stages, u, 32, 4),
                                           stride=(stages * u * 128, u * 128, 128, 4, 1)))
    ss = st.ss.get_tensor(cute.make_layout((WARPS, stages, u, 32), stride=(stages * u * 32, u * 32, 32, 1)))
    return sw, ss, sw.iterator.toint(), ss.iterator.toint()


@cute.jit
def issue_stage(w0: Int64, s0: Int64, sw0: Int32, ss0: Int32, chunk0, warp: Int32, lane: Int32, slot: Int32,
                U: cutlass.Constexpr, S: cutlass.Constexpr):
    """cp.async of one ring stage: U chunks (global chunk index chunk0 on) of this lane's 16 B of weights into the
    warp's slot, and the stage's scales (16 B per lane of the first 4U lanes). Shared by every ring kernel."""
    for u in cutlass.range_constexpr(U):
        _cp_async16(sw0 + (((warp * S + slot) * U + u) * 32 + lane) * 16,
                    w0 + (Int64(chunk0 + u) * 32 + Int64(lane)) * 16)
    if lane < 4 * U:
        _cp_async16(ss0 + (((warp * S + slot) * U + lane // 4) * 32 + (lane % 4) * 8) * 2,
                    s0 + (Int64(chunk0 + lane // 4) * 32 + Int64((lane % 4) * 8)) * 2)


class _GemvAsync:
    """y = x @ W^T. Grid (16-row tile groups of WARPS, K splits); each warp streams its tile's split through its own
    ring; partials P[split, m, n] when split (summed by nvfp4_gemm's split reduce), else y.

    mt = 0: one token, its x split staged in shared memory. mt >= 1: up to 8 * mt tokens (m_rows at run time), x
    read per chunk from global memory (L1/L2-resident: every warp of the grid reads the same rows), as
    nvfp4_gemm._Gemv does; same per-lane order as _Gemv, so bit-identical to it at equal splits."""

    def __init__(self, n: int, k: int, splits: int, u: int, stages: int, mt: int = 0, pdl: bool = False):
        self.n, self.k, self.splits, self.u, self.stages, self.mt, self.pdl = n, k, splits, u, stages, mt, pdl
        self.nchunk = k // KCHUNK
        self.cps = self.nchunk // splits
        if self.cps % u or u > 8 or stages < 2:
            raise ValueError(f"ring GEMV: a split of {self.cps} chunks needs whole stages of U <= 8 chunks (U={u}) "
                             f"and >= 2 stages (got {stages})")
        self.nit = self.cps // u

    @cute.jit
    def _issue(self, w0: Int64, s0: Int64, sw0: Int32, ss0: Int32, tl: Int32, warp: Int32, lane: Int32,
               slot: Int32, cb: Int32):
        issue_stage(w0, s0, sw0, ss0, tl * self.nchunk + cb, warp, lane, slot, self.u, self.stages)

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mS: cute.Tensor, mX: cute.Tensor, mY: cute.Tensor, mP: cute.Tensor,
               m_rows: Int32, alpha: Float32, Storage: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        bx, by, _ = cute.arch.block_idx()
        lane = tidx % 32
        warp = tidx // 32
        g = lane // 4
        t = lane % 4
        tile = bx * WARPS + warp
        U, S = self.u, self.stages
        smem = cutlass.memory.SmemAllocator()
        st = smem.allocate(Storage)
        sw, ss, sw0, ss0 = ring_smem(st, S, U)
        MT = self.mt
        w0 = mW.iterator.toint()
        s0 = mS.iterator.toint()
        c0 = by * self.cps
        valid = tile < self.n // ROWTILE
        tl = cutlass.min(tile, self.n // ROWTILE - 1)

        for s in cutlass.range_constexpr(S - 1):
            if cutlass.const_expr(s < self.nit):
                self._issue(w0, s0, sw0, ss0, tl, warp, lane, Int32(s), c0 + s * U)
            cute.arch.cp_async_commit_group()
        # PDL: launched while the kernel that writes x still runs; the weights depend on nothing it writes, so the
        # first stages went out above, and x is read only after the wait (a no-op without PDL)
        cute.arch.griddepcontrol_wait()
        if cutlass.const_expr(MT == 0):
            sx = st.sx.get_tensor(cute.make_layout((self.cps, 4, 8), stride=(32, 8, 1)))
            for i in cutlass.range((self.cps * 32 + WARPS * 32 - 1) // (WARPS * 32)):
                idx = i * (WARPS * 32) + tidx
                if idx < self.cps * 32:
                    c = idx // 32
                    r = idx % 32
                    sx[c, r // 8, r % 8] = mX[0, (c0 + c) * 4 + r // 8, r % 8]
            cute.arch.barrier()
        acc = cute.make_rmem_tensor((max(MT, 1) * 4,), Float32)
        for q in cutlass.range_constexpr(max(MT, 1) * 4):
            acc[q] = Float32(0.0)
        wreg = cute.make_rmem_tensor((4, U), Int32)
        sreg = cute.make_rmem_tensor((U,), Int32)
        xreg = cute.make_rmem_tensor((8,), Int32)
        for it in cutlass.range(self.nit):
            cute.arch.cp_async_wait_group(S - 2)
            cute.arch.sync_warp()
            slot = it % S
            for u in cutlass.range_constexpr(U):
                cute.autovec_copy(sw[warp, slot, u, lane, None], wreg[None, u])
                sreg[u] = Int32(ss[warp, slot, u, lane])
            nxt = it + S - 1
            if nxt < self.nit:
                self._issue(w0, s0, sw0, ss0, tl, warp, lane, nxt % S, c0 + nxt * U)
            cute.arch.cp_async_commit_group()
            for u in cutlass.range_constexpr(U):
                a = decode_chunk(wreg, sreg, u)
                if cutlass.const_expr(MT == 0):
                    cute.autovec_copy(sx[it * U + u, t, None], xreg)
                    mma_block(a, xreg, acc, 0)
                else:
                    kx = (c0 + it * U + u) * 4 + t
                    for j in cutlass.range_constexpr(MT):
                        cute.autovec_copy(mX[cutlass.min(j * 8 + g, m_rows - 1), kx, None], xreg)
                        mma_block(a, xreg, acc, j)
        cute.arch.cp_async_wait_group(0)
        # the next kernel may be scheduled once every CTA is past its stream (as nvfp4_gemm._Gemv)
        cute.arch.griddepcontrol_launch_dependents()
        if valid:
            # lane (g, t) holds rows g, g + 8 of tokens j * 8 + 2t, + 1; one token (mt = 0, m_rows = 1): lanes t = 0
            n0 = tile * ROWTILE + g
            for j in cutlass.range_constexpr(max(MT, 1)):
                for q in cutlass.range_constexpr(4):
                    m = j * 8 + 2 * t + (q % 2)
                    if m < m_rows:
                        if cutlass.const_expr(self.splits == 1):
                            mY[m, n0 + 8 * (q // 2)] = (acc[j * 4 + q] * alpha).to(cutlass.BFloat16)
                        else:
                            mP[by, m, n0 + 8 * (q // 2)] = acc[j * 4 + q]

    @cute.jit
    def launch(self, mW: cute.Tensor, mS: cute.Tensor, mX: cute.Tensor, mY: cute.Tensor, mP: cute.Tensor,
               m_rows: Int32, alpha: Float32, stream):
        @cute.struct
        class Storage:
            sw: cute.struct.Align[cute.struct.MemRange[Int32, WARPS * self.stages * self.u * 128], 128]
            ss: cute.struct.Align[cute.struct.MemRange[cutlass.Int16, WARPS * self.stages * self.u * 32], 128]
            sx: cute.struct.Align[cute.struct.MemRange[Int32, self.cps * 32 if self.mt == 0 else 4], 128]

        grid_x = (self.n // ROWTILE + WARPS - 1) // WARPS
        self.kernel(mW, mS, mX, mY, mP, m_rows, alpha, Storage).launch(grid=[grid_x, self.splits, 1],
                                                               block=[WARPS * 32, 1, 1],
                                                               smem=Storage.size_in_bytes(), stream=stream,
                                                               use_pdl=self.pdl)


def compile_gemv_async(n: int, k: int, splits: int, u: int = 4, stages: int = 4, mt: int = 0, pdl: bool = False):
    """mt = 0: the one-token kernel (x [1, K/16, 8] int32 views); mt >= 1: up to 8 * mt tokens (m_rows). pdl:
    programmatic dependent launch, the first weight stages issued before waiting on the previous kernel."""
    key = (n, k, splits, u, stages, mt, pdl)
    fn = _COMPILED.get(key)
    if fn is None:
        m = 1 if mt == 0 else cute.sym_int()
        fn = cute.compile(_GemvAsync(n, k, splits, u, stages, mt, pdl).launch,
                          _fake(Int32, (n // 16, k // 64, 32, 4)), _fake(cutlass.Int16, (n // 16, k // 64, 32), 2),
                          _fake(Int32, (m, k // 16, 8)), _fake(cutlass.BFloat16, (m, n), 2),
                          _fake(Float32, (splits, m, n), 4), Int32(1), Float32(1.0), _stream_arg(),
                          options=_options())
        _COMPILED[key] = fn
    return fn


RING_MIN_BYTES = 16 << 20        # below this the register GEMV (with PDL where it applies) measured faster
RING_U, RING_STAGES = 4, 4
# Several tokens (x from global memory) only pay off on long K streams per warp in a grid of about one wave: H100
# session 18, Pro wo_b (64 chunks per split, 448 CTAs) M = 2 / 4 / 8 36.1 / 36.5 / 37.5 -> 29.7 / 32.2 / 34.5 us,
# while wq_b (16-24 chunks) and the head (64 chunks but 2 020 CTAs: the register kernel keeps more warps resident)
# lost 5-15 %, and M = 16 lost everywhere. Env DSV4_GEMV_RING_MAX_M (1 = the one-token kernel only).
RING_MAX_M = int(os.environ.get("DSV4_GEMV_RING_MAX_M", "8"))
RING_MULTI_MIN_CHUNKS = 32
RING_MULTI_MAX_CTAS = 4 * 132
RING_PDL = os.environ.get("DSV4_GEMV_RING_PDL", "1") != "0"


def ring_mt(m: int) -> int:
    """The ring kernel variant for m tokens: 0 = one token with x in shared memory, else 8-token tiles."""
    return 0 if m == 1 else -(-m // 8)


def use_ring(n: int, k: int, m: int, splits: int) -> bool:
    """The ring kernel takes up to RING_MAX_M tokens and splits of whole stages; it pays off on large weights."""
    cps = k // KCHUNK // splits
    ctas = -(-n // (ROWTILE * WARPS)) * splits
    if m > 1 and (m > RING_MAX_M or cps < RING_MULTI_MIN_CHUNKS or ctas > RING_MULTI_MAX_CTAS):
        return False
    return cps % RING_U == 0 and n % ROWTILE == 0 and n * k // 2 >= RING_MIN_BYTES
