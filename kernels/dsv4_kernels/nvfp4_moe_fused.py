"""MoE decode in one launch (plus the bf16 finalize): gate_up with the SwiGLU epilogue, then down, in one grid.

Why: at 1-2 tokens the three-kernel decode chain (gate_up -> SwiGLU -> down) drains HBM twice: the down kernel's
CTAs only become resident after the last gate_up wave, so its weight stream starts late (H100, session 16: flash
T = 1 gate_up 24.7 us, down 15.7 us against floors of 19.7 and 9.8). Measured (session 17), the one launch is no
faster: flash T = 1 45.5 vs 43.2 us, Pro T = 1 93.2 vs 97.9, T = 4-8 within 3 % either way; ncu puts the loss in
each phase's own streaming (gate_up 64 % of DRAM peak, down 42 %, issue slots ~50 % busy decoding), not between
them. Kept off by default (nvfp4_moe.DECODE_FUSED_MAX_ASSIGN) as the base for a weight stream that does not go
through the load/store unit (TMA into shared memory). Here every CTA takes a ticket from a global
counter; tickets [0, A * gx1) are gate_up tiles, the rest down tiles (slot-major, so slot 0's down work comes
first). A down CTA issues its weight loads at once and only then waits for the gate_up CTAs of its slot to publish
H, so the down weights stream while gate_up finishes. Tickets are taken in the order CTAs start, so every gate_up
tile is held by a running CTA before any down CTA can wait: no deadlock, whatever the grid size or occupancy.

Numerics: gate_up runs over the whole K (no split) and applies the SwiGLU in its epilogue, the down kernel writes
the same per-split FP32 partials as the chain, and `_Finalize` sums them: the result is bit-identical to the chain
with a gate_up split of 1 and the same down split (tested).

The counters (ticket, finished CTAs, one "gate_up tiles done" per slot) live in a small int32 buffer per device;
the last CTA to finish zeroes them, so each launch (and each CUDA-graph replay) starts from zero. Calls on one
stream only: two launches in flight at once on different streams would share the counters.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

from cutlass.cutlass_dsl import T as _T, dsl_user_op
from cutlass._mlir.dialects import llvm

from dsv4_kernels.nvfp4_gemm import (KCHUNK, ROWTILE, WARPS, _call, _fake, _options, _stream_arg, _TVM_FFI,
                                     decode_chunk, mma_block)
from dsv4_kernels.nvfp4_moe import (DECODE_LIMIT, PackedExperts, _nth_set_bit, _slot_routing, _swiglu, _unroll,
                                    compile_finalize, slot_rows, store_slot_block)

__all__ = ["moe_decode_fused", "compile_fused", "fused_plan"]

_COMPILED: dict[tuple, Any] = {}
N_COUNTERS = 2 + DECODE_LIMIT          # ticket, finished CTAs, gate_up tiles done per slot
# gate_up chunks of loads in flight per lane (gate_up runs over the whole K); env DSV4_MOE_FUSED_UNROLL for sweeps
GATE_UP_UNROLL = int(os.environ.get("DSV4_MOE_FUSED_UNROLL", "16"))


# ------------------------------------------------------------------------------------------------------------
# synchronisation (inline PTX)
# ------------------------------------------------------------------------------------------------------------

@dsl_user_op
def _atom_add(addr: Int64, v: Int32, *, loc=None, ip=None):
    """Relaxed atomic add at GPU scope; returns the old value."""
    return Int32(llvm.inline_asm(
        _T.i32(), [Int64(addr).ir_value(loc=loc, ip=ip), Int32(v).ir_value(loc=loc, ip=ip)],
        "atom.relaxed.gpu.global.add.s32 $0, [$1], $2;", "=r,l,r", has_side_effects=True, loc=loc, ip=ip))


@dsl_user_op
def _ld_acquire(addr: Int64, *, loc=None, ip=None):
    return Int32(llvm.inline_asm(
        _T.i32(), [Int64(addr).ir_value(loc=loc, ip=ip)],
        "ld.acquire.gpu.global.s32 $0, [$1];", "=r,l", has_side_effects=True, loc=loc, ip=ip))


@dsl_user_op
def _st_relaxed(addr: Int64, v: Int32, *, loc=None, ip=None):
    llvm.inline_asm(None, [Int64(addr).ir_value(loc=loc, ip=ip), Int32(v).ir_value(loc=loc, ip=ip)],
                    "st.relaxed.gpu.global.s32 [$0], $1;", "l,r", has_side_effects=True, loc=loc, ip=ip)


@dsl_user_op
def _nanosleep(ns: Int32, *, loc=None, ip=None):
    llvm.inline_asm(None, [Int32(ns).ir_value(loc=loc, ip=ip)], "nanosleep.u32 $0;", "r",
                    has_side_effects=True, loc=loc, ip=ip)


@dsl_user_op
def _ld_cg_v4(addr: Int64, *, loc=None, ip=None):
    """16 bytes through L2 only: H is written by other CTAs of this grid, never serve it from a stale L1 line."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([_T.i32()] * 4), [Int64(addr).ir_value(loc=loc, ip=ip)],
        "ld.global.cg.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", has_side_effects=True, loc=loc, ip=ip)
    return tuple(Int32(llvm.extractvalue(_T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))


# ------------------------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------------------------

class _FusedDecode:
    """Grid: A * (gx1 + gx2 * ks2) CTAs of WARPS warps, one 16-row tile per warp.
    gate_up ticket -> (slot, bx): rows tile*16.. of W13[e] over all of K, H[a, tile*8 + g] = bf16(SwiGLU);
    down ticket -> (slot, bx, kz): rows of W2[e] over K split kz, YP[kz, a, n] = acc * w[a] * alpha2."""

    def __init__(self, d: int, inter: int, mt: int, ks2: int, topk: int, u1: int, u2: int, clamp: bool):
        if (2 * inter // ROWTILE) % WARPS or (d // ROWTILE) % WARPS:
            raise ValueError(f"fused MoE decode: 2*inter/16 and dim/16 must be multiples of {WARPS}, "
                             f"got dim={d} inter={inter}")
        self.d, self.inter, self.mt, self.ks2, self.topk, self.clamp = d, inter, mt, ks2, topk, clamp
        self.gx1 = 2 * inter // ROWTILE // WARPS
        self.gx2 = d // ROWTILE // WARPS
        self.c1 = d // KCHUNK
        self.c2 = inter // KCHUNK // ks2
        self.u1 = _unroll(self.c1, u1)
        self.u2 = _unroll(self.c2, u2)

    def _load(self, mW, mS, e, tile, cb, lane, wreg, sreg):
        for u in range(wreg.shape[1]):
            cute.autovec_copy(mW[e, tile, cb + u, lane, None], wreg[None, u])
            sreg[u] = Int32(mS[e, tile, cb + u, lane])

    def _mma_chunk(self, wreg, sreg, u, acc, xs):
        """One 64-K chunk: decode the 4 A fragments, one m16n8k16 per (row block j, 16-K step s)."""
        wa = decode_chunk(wreg, sreg, u)
        for j in range(self.mt):
            mma_block(wa, xs[j], acc, j)

    @cute.kernel
    def kernel(self, mW1: cute.Tensor, mS1: cute.Tensor, mW2: cute.Tensor, mS2: cute.Tensor, mIds: cute.Tensor,
               mX: cute.Tensor, mWt: cute.Tensor, mAl: cute.Tensor, mH: cute.Tensor, mHr: cute.Tensor,
               mYP: cute.Tensor, mCnt: cute.Tensor, n_assign: Int32, limit: Float32, Storage: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        lane = tidx % 32
        warp = tidx // 32
        g = lane // 4
        t = lane % 4
        MT = self.mt
        smem = cutlass.memory.SmemAllocator()
        st = smem.allocate(Storage)
        tk = st.tk.get_tensor(cute.make_layout((4,)))
        cbase = mCnt.iterator.toint()
        if tidx == 0:
            tk[0] = _atom_add(cbase, Int32(1))
        cute.arch.barrier()
        ticket = tk[0]
        # the finalize kernel may be scheduled once every CTA has started; it waits for this grid's end
        cute.arch.griddepcontrol_launch_dependents()
        n_up = n_assign * self.gx1
        total = n_assign * (self.gx1 + self.gx2 * self.ks2)
        gate_up = ticket < n_up
        slot = Int32(0)
        bx = Int32(0)
        kz = Int32(0)
        if gate_up:
            slot = ticket // self.gx1
            bx = ticket - slot * self.gx1
        else:
            u = ticket - n_up
            per = self.gx2 * self.ks2
            slot = u // per
            r = u - slot * per
            bx = r // self.ks2
            kz = r - bx * self.ks2
        tile = bx * WARPS + warp
        e, dup, m0, m1, cnt = _slot_routing(mIds, n_assign, slot, lane)
        nblk = (cnt + MT * 8 - 1) // (MT * 8)
        acc = cute.make_rmem_tensor((MT * 4,), Float32)
        rows = cute.make_rmem_tensor((MT,), Int32)
        xreg = cute.make_rmem_tensor((MT, 8), Int32)
        done_addr = cbase + Int64(4 * (2 + slot))
        if dup == 0:
            if gate_up:
                # all U chunks' loads in flight, then their math, as the chain's kernels do (software pipelining
                # with two buffers measured slower at every buffer size, see docs/PERF.md session 17)
                U = self.u1
                wreg = cute.make_rmem_tensor((4, U), Int32)
                sreg = cute.make_rmem_tensor((U,), Int32)
                al0 = mAl[e, 0]
                al1 = mAl[e, 1]
                for mb in cutlass.range(nblk):
                    p0 = mb * (MT * 8)
                    slot_rows(rows, m0, m1, cnt, p0, g, MT, self.topk)
                    for i in cutlass.range_constexpr(MT * 4):
                        acc[i] = Float32(0.0)
                    for it in cutlass.range(self.c1 // U):
                        cb = it * U
                        self._load(mW1, mS1, e, tile, cb, lane, wreg, sreg)
                        for uu in cutlass.range_constexpr(U):
                            kx = (cb + uu) * 4 + t
                            xs = []
                            for j in cutlass.range_constexpr(MT):
                                cute.autovec_copy(mX[rows[j], kx, None], xreg[j, None])
                                xs.append([xreg[j, s] for s in range(8)])
                            self._mma_chunk(wreg, sreg, uu, acc, xs)
                    for j in cutlass.range_constexpr(MT):
                        for q in cutlass.range_constexpr(2):
                            p = p0 + j * 8 + 2 * t + q
                            if p < cnt:
                                a = _nth_set_bit(m0, m1, p)
                                h = _swiglu((Float32(0.0) + acc[j * 4 + q]) * al0,
                                            (Float32(0.0) + acc[j * 4 + 2 + q]) * al1, limit, self.clamp)
                                mH[a, tile * 8 + g] = h.to(cutlass.BFloat16)
                # publish this CTA's part of H: every warp's stores, then one GPU-scope fence and the count
                cute.arch.barrier()
                if tidx == 0:
                    cute.arch.fence_acq_rel_gpu()
                    _atom_add(done_addr, Int32(1))
            else:
                U = self.u2
                wreg = cute.make_rmem_tensor((4, U), Int32)
                sreg = cute.make_rmem_tensor((U,), Int32)
                al2 = mAl[e, 2]
                c0 = kz * self.c2
                # the first chunks' weight loads go out before the wait: they do not depend on H
                self._load(mW2, mS2, e, tile, c0, lane, wreg, sreg)
                if tidx == 0:
                    seen = _ld_acquire(done_addr)
                    while seen < self.gx1:
                        _nanosleep(Int32(64))
                        seen = _ld_acquire(done_addr)
                cute.arch.barrier()
                hbase = mHr.iterator.toint()
                for mb in cutlass.range(nblk):
                    p0 = mb * (MT * 8)
                    slot_rows(rows, m0, m1, cnt, p0, g, MT, 0)
                    for i in cutlass.range_constexpr(MT * 4):
                        acc[i] = Float32(0.0)
                    for it in cutlass.range(self.c2 // U):
                        cb = c0 + it * U
                        if mb + it > 0:
                            self._load(mW2, mS2, e, tile, cb, lane, wreg, sreg)
                        for uu in cutlass.range_constexpr(U):
                            kx = (cb + uu) * 4 + t
                            xs = []
                            for j in cutlass.range_constexpr(MT):
                                addr = hbase + (Int64(rows[j]) * (self.inter // 16) + Int64(kx)) * 32
                                lo = _ld_cg_v4(addr)
                                hi = _ld_cg_v4(addr + 16)
                                xs.append([lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]])
                            self._mma_chunk(wreg, sreg, uu, acc, xs)
                    store_slot_block("down", MT, self.clamp, mYP, mWt, mAl, e, al2, acc, m0, m1, cnt, p0, t, g, tile,
                                     kz, limit)
        # the last CTA to finish zeroes the counters for the next launch (no CTA reads them after its count)
        cute.arch.barrier()
        if tidx == 0:
            cute.arch.fence_acq_rel_gpu()
            old = _atom_add(cbase + Int64(4), Int32(1))
            if old == total - 1:
                _st_relaxed(cbase, Int32(0))
                _st_relaxed(cbase + Int64(4), Int32(0))
                for s in cutlass.range(n_assign):
                    _st_relaxed(cbase + Int64(4 * (2 + s)), Int32(0))

    @cute.jit
    def launch(self, mW1: cute.Tensor, mS1: cute.Tensor, mW2: cute.Tensor, mS2: cute.Tensor, mIds: cute.Tensor,
               mX: cute.Tensor, mWt: cute.Tensor, mAl: cute.Tensor, mH: cute.Tensor, mHr: cute.Tensor,
               mYP: cute.Tensor, mCnt: cute.Tensor, n_assign: Int32, limit: Float32, stream):
        @cute.struct
        class Storage:
            tk: cute.struct.Align[cute.struct.MemRange[Int32, 4], 16]

        grid = n_assign * (self.gx1 + self.gx2 * self.ks2)
        self.kernel(mW1, mS1, mW2, mS2, mIds, mX, mWt, mAl, mH, mHr, mYP, mCnt, n_assign, limit, Storage).launch(
            grid=[grid, 1, 1], block=[WARPS * 32, 1, 1], smem=Storage.size_in_bytes(), stream=stream)


def compile_fused(e: int, d: int, inter: int, mt: int, ks2: int, topk: int, clamp: bool, id_dtype=cutlass.Int64,
                  wt_dtype=Float32, u1: int = 16, u2: int = 16):
    obj = _FusedDecode(d, inter, mt, ks2, topk, u1, u2, clamp)
    key = ("fused", e, d, inter, mt, ks2, topk, clamp, id_dtype, wt_dtype, obj.u1, obj.u2, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        a = cute.sym_int()
        fn = cute.compile(obj.launch,
                          _fake(Int32, (e, 2 * inter // 16, d // 64, 32, 4)),
                          _fake(cutlass.Int16, (e, 2 * inter // 16, d // 64, 32), 2),
                          _fake(Int32, (e, d // 16, inter // 64, 32, 4)),
                          _fake(cutlass.Int16, (e, d // 16, inter // 64, 32), 2),
                          _fake(id_dtype, (a,), 4), _fake(Int32, (cute.sym_int(), d // 16, 8)),
                          _fake(wt_dtype, (a,), 2), _fake(Float32, (e, 3), 4),
                          _fake(cutlass.BFloat16, (a, inter), 8), _fake(Int32, (a, inter // 16, 8)),
                          _fake(Float32, (ks2, a, d), 4), _fake(Int32, (N_COUNTERS,), 4),
                          Int32(1), Float32(0.0), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


def fused_plan(experts: PackedExperts, num_assign: int, topk: int) -> tuple[int, int, int, int]:
    """(mt, ks_down, unroll_gate_up, unroll_down). The down split follows the chain's plan (decode_plan)."""
    from dsv4_kernels.nvfp4_moe import decode_plan
    mt, _, ks2, unroll = decode_plan(experts, num_assign, topk)
    return mt, ks2, GATE_UP_UNROLL, unroll


def _counters(experts: PackedExperts, dev: torch.device) -> torch.Tensor:
    key = ("fused_counters", str(dev))
    buf = experts.cache.get(key)
    if buf is None:
        buf = torch.zeros(N_COUNTERS, dtype=torch.int32, device=dev)
        experts.cache[key] = buf
    return buf


def moe_decode_fused(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, experts: PackedExperts,
                     swiglu_limit: float, topk: int, pdl: bool) -> torch.Tensor:
    """x bf16 [T, D] contiguous, ids / wts flat [T * topk] (int32|int64 / fp32|bf16) -> bf16 [T, D]."""
    A = ids.numel()
    T = A // topk
    D, I, E = experts.dim, experts.inter, experts.n_experts
    if A > DECODE_LIMIT:
        raise ValueError(f"moe_decode_fused: at most {DECODE_LIMIT} assignments, got {A}")
    dev = x.device
    id_t = cutlass.Int64 if ids.dtype == torch.int64 else Int32
    wt_t = Float32 if wts.dtype == torch.float32 else cutlass.BFloat16
    mt, ks2, u1, u2 = fused_plan(experts, A, topk)
    h = torch.empty((A, I), dtype=torch.bfloat16, device=dev)
    yp = torch.empty((ks2, A, D), dtype=torch.float32, device=dev)
    out = torch.empty((T, D), dtype=torch.bfloat16, device=dev)
    fn = compile_fused(E, D, I, mt, ks2, topk, swiglu_limit > 0, id_t, wt_t, u1, u2)
    _call(fn, experts.w13_codes, experts.w13_scales, experts.w2_codes, experts.w2_scales, ids,
          x.view(torch.int32).view(T, D // 16, 8), wts, experts.alphas, h, h.view(torch.int32).view(A, I // 16, 8),
          yp, _counters(experts, dev), A, float(swiglu_limit))
    _call(compile_finalize(D, topk, ks2, pdl), yp, out, T * D)
    return out
