"""MoE decode GEMMs (gate_up / down of the decode chain) with the weight stream through a cp.async ring.

Same work split, routing, epilogues and per-lane accumulation order as nvfp4_moe._Decode, so the outputs are
bit-identical (tested); only the way weights reach the math changes: each lane copies its 16 B per chunk (and the
first 4U lanes the stage's scales) with cp.async into a STAGES-deep shared-memory ring per warp, STAGES - 1 stages
ahead of the math, instead of holding U chunks in registers (nvfp4_gemv_async has the measurements that motivated
it). With PDL (down kernel) the first stages go out before griddepcontrol.wait, as _Decode's prefetch does. The
gate_up kernel, on steps of the PDL chain (dsv4_kernels.pdl), launches early behind the routing kernel and waits
first (H100, flash-layers batch 1: 0.992x the layer time, docs/PERF.md session 27).

Because a warp keeps its loads in flight along a whole K, the decode plan drops the K splits with the ring
(nvfp4_moe.decode_plan), and the unsplit gate_up applies the SwiGLU in its epilogue ("gateup_h": no SwiGLU kernel,
no FP32 partials). H100 (docs/PERF.md session 17): flash T = 1 / 2 / 4 43.3 / 74.4 / 141.3 -> 38.5 / 67.8 / 125.2 us.
"""

from __future__ import annotations

import os
from typing import Any

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

from dsv4_kernels.nvfp4_gemm import (KCHUNK, ROWTILE, WARPS, _TVM_FFI, _fake, _options, _stream_arg, decode_chunk,
                                     mma_block)
from dsv4_kernels.nvfp4_gemv_async import issue_stage, ring_smem
from dsv4_kernels.nvfp4_moe import _slot_routing, slot_rows, store_slot_block

_COMPILED: dict[tuple, Any] = {}
# chunks per stage and stages of the ring (4 warps x STAGES x U x 576 B of shared memory per CTA); env
# DSV4_MOE_RING_U / DSV4_MOE_RING_STAGES for sweeps
RING_U = int(os.environ.get("DSV4_MOE_RING_U", "4"))
RING_STAGES = int(os.environ.get("DSV4_MOE_RING_STAGES", "4"))
# the down kernel's ring depth: with PDL its first STAGES - 1 stages are loaded while gate_up still runs, so a
# deeper ring moves more of its stream before the H dependency (env DSV4_MOE_RING_DOWN_STAGES)
RING_DOWN_STAGES = int(os.environ.get("DSV4_MOE_RING_DOWN_STAGES", str(RING_STAGES)))
# ... and at one token, where the down grid (a CTA per 64 rows per assignment) is a third of a wave: 8 stages, so a
# CTA has 7 of V4-Flash's 8 ring iterations in flight before it waits for gate_up (73.7 KB of shared memory a CTA).
# H100, flash-layers decode graphs (docs/PERF.md, session 29): batch 1 0.967-0.980x the layer time of 4 stages; batch
# 8 (3 072 CTAs, fewer resident) 1.065x, so more tokens keep RING_DOWN_STAGES. Env DSV4_MOE_RING_DOWN_STAGES_T1.
RING_DOWN_STAGES_ONE_TOKEN = int(os.environ.get("DSV4_MOE_RING_DOWN_STAGES_T1", "8"))


# The gate_up kernel at one token: 6 stages. It waits for the routing before its first load, so depth only keeps
# more of its stream in flight (55 KB of shared memory a CTA). H100 (docs/PERF.md, session 29): batch 1 0.985x the
# layer time of 4 stages; batch 8 1.041x, so more tokens keep RING_STAGES. Env DSV4_MOE_RING_STAGES_T1.
RING_UP_STAGES_ONE_TOKEN = int(os.environ.get("DSV4_MOE_RING_STAGES_T1", "6"))


def down_stages(tokens: int) -> int:
    """The down kernel's ring depth for a decode step of `tokens` tokens."""
    return RING_DOWN_STAGES_ONE_TOKEN if tokens == 1 else RING_DOWN_STAGES


def up_stages(tokens: int) -> int:
    """The gate_up kernel's ring depth for a decode step of `tokens` tokens."""
    return RING_UP_STAGES_ONE_TOKEN if tokens == 1 else RING_STAGES


class _DecodeRing:
    def __init__(self, mode: str, n: int, k: int, mt: int, ks: int, topk: int, u: int, stages: int,
                 pdl: bool = False, clamp: bool = True):
        if mode == "gateup_h" and ks != 1:
            raise ValueError("MoE ring decode: the SwiGLU epilogue (gateup_h) needs the whole K in one split")
        self.mode, self.n, self.k, self.mt, self.ks, self.topk, self.clamp = mode, n, k, mt, ks, topk, clamp
        self.nchunk = k // KCHUNK
        self.cps = self.nchunk // ks
        if self.cps % u or u > 8:
            raise ValueError(f"MoE ring decode: a split of {self.cps} chunks is not a multiple of U={u} (<= 8)")
        self.u, self.stages, self.nit = u, stages, self.cps // u
        self.prefetch = pdl and mode == "down"
        # gate_up launched as a programmatic dependent of the routing kernel: resident before the routing ends, it
        # waits before it reads the ids, and lets the down kernel launch only after that wait, since the down
        # kernel reads the ids before its own wait
        self.wait_first = pdl and mode != "down"

    @cute.jit
    def _issue(self, w0: Int64, s0: Int64, sw0: Int32, ss0: Int32, e: Int32, tile: Int32, warp: Int32,
               lane: Int32, slot: Int32, cb: Int32):
        row0 = (Int64(e) * (self.n // ROWTILE) + Int64(tile)) * self.nchunk + Int64(cb)
        issue_stage(w0, s0, sw0, ss0, row0, warp, lane, slot, self.u, self.stages)

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mS: cute.Tensor, mIds: cute.Tensor, mX: cute.Tensor, mWt: cute.Tensor,
               mAl: cute.Tensor, mOut: cute.Tensor, n_assign: Int32, limit: Float32, Storage: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        bx, slot_a, kz = cute.arch.block_idx()
        lane = tidx % 32
        warp = tidx // 32
        g = lane // 4
        t = lane % 4
        tile = bx * WARPS + warp
        MT, U, S = self.mt, self.u, self.stages
        smem = cutlass.memory.SmemAllocator()
        st = smem.allocate(Storage)
        sw, ss, sw0, ss0 = ring_smem(st, S, U)
        w0 = mW.iterator.toint()
        s0 = mS.iterator.toint()
        if cutlass.const_expr(self.wait_first):
            cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()
        e, dup, m0, m1, cnt = _slot_routing(mIds, n_assign, slot_a, lane)
        acc = cute.make_rmem_tensor((MT * 4,), Float32)
        wreg = cute.make_rmem_tensor((4, U), Int32)
        sreg = cute.make_rmem_tensor((U,), Int32)
        xreg = cute.make_rmem_tensor((8,), Int32)
        rows = cute.make_rmem_tensor((MT,), Int32)
        al2 = mAl[e, 2]
        if tile < self.n // ROWTILE and dup == 0:
            nblk = (cnt + MT * 8 - 1) // (MT * 8)
            c0 = kz * self.cps
            for mb in cutlass.range(nblk):
                for s in cutlass.range_constexpr(S - 1):
                    if cutlass.const_expr(s < self.nit):
                        self._issue(w0, s0, sw0, ss0, e, tile, warp, lane, Int32(s), c0 + s * U)
                    cute.arch.cp_async_commit_group()
                if cutlass.const_expr(self.prefetch):
                    if mb == 0:
                        cute.arch.griddepcontrol_wait()         # H is the SwiGLU kernel's output
                p0 = mb * (MT * 8)
                slot_rows(rows, m0, m1, cnt, p0, g, MT, 0 if self.mode == "down" else self.topk)
                for i in cutlass.range_constexpr(MT * 4):
                    acc[i] = Float32(0.0)
                for it in cutlass.range(self.nit):
                    cute.arch.cp_async_wait_group(S - 2)
                    cute.arch.sync_warp()
                    slot = it % S
                    for u in cutlass.range_constexpr(U):
                        cute.autovec_copy(sw[warp, slot, u, lane, None], wreg[None, u])
                        sreg[u] = Int32(ss[warp, slot, u, lane])
                    nxt = it + S - 1                # its slot was read in iteration it - 1, before the sync above
                    if nxt < self.nit:
                        self._issue(w0, s0, sw0, ss0, e, tile, warp, lane, nxt % S, c0 + nxt * U)
                    cute.arch.cp_async_commit_group()
                    cb = c0 + it * U
                    for u in cutlass.range_constexpr(U):
                        wa = decode_chunk(wreg, sreg, u)
                        kx = (cb + u) * 4 + t
                        for j in cutlass.range_constexpr(MT):
                            cute.autovec_copy(mX[rows[j], kx, None], xreg)
                            mma_block(wa, xreg, acc, j)
                cute.arch.cp_async_wait_group(0)
                cute.arch.sync_warp()
                store_slot_block(self.mode, MT, self.clamp, mOut, mWt, mAl, e, al2, acc, m0, m1, cnt, p0, t, g,
                                 tile, kz, limit)

    @cute.jit
    def launch(self, mW: cute.Tensor, mS: cute.Tensor, mIds: cute.Tensor, mX: cute.Tensor, mWt: cute.Tensor,
               mAl: cute.Tensor, mOut: cute.Tensor, n_assign: Int32, limit: Float32, stream):
        @cute.struct
        class Storage:
            sw: cute.struct.Align[cute.struct.MemRange[Int32, WARPS * self.stages * self.u * 128], 128]
            ss: cute.struct.Align[cute.struct.MemRange[cutlass.Int16, WARPS * self.stages * self.u * 32], 128]

        grid_x = (self.n // ROWTILE + WARPS - 1) // WARPS
        self.kernel(mW, mS, mIds, mX, mWt, mAl, mOut, n_assign, limit, Storage).launch(
            grid=[grid_x, n_assign, self.ks], block=[WARPS * 32, 1, 1], smem=Storage.size_in_bytes(),
            stream=stream, use_pdl=self.prefetch or self.wait_first)


def ring_fits(k: int, ks: int, u: int = RING_U) -> bool:
    cps = k // KCHUNK // ks
    return cps % u == 0


def compile_decode_ring(mode: str, e: int, n: int, k: int, mt: int, ks: int, topk: int, id_dtype=cutlass.Int64,
                        wt_dtype=Float32, pdl: bool = False, u: int = RING_U, stages: int | None = None,
                        clamp: bool = True):
    """mode "gateup": fp32 partials GU [ks, a, 2, n/2]; "gateup_h" (ks = 1): H = bf16 SwiGLU [a, n/2] (limit and
    clamp as _DecodeSwiglu); "down": YP [ks, a, n]. Every mode takes the runtime args (..., n_assign, limit)."""
    if stages is None:
        stages = RING_DOWN_STAGES if mode == "down" else RING_STAGES
    key = ("ring", mode, e, n, k, mt, ks, topk, id_dtype, wt_dtype, pdl, u, stages, clamp, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _DecodeRing(mode, n, k, mt, ks, topk, u, stages, pdl, clamp)
        a = cute.sym_int()
        xin = _fake(Int32, (a if mode == "down" else cute.sym_int(), k // 16, 8))
        out = {"gateup": _fake(Float32, (ks, a, 2, n // 2), 4), "gateup_h": _fake(cutlass.BFloat16, (a, n // 2), 2),
               "down": _fake(Float32, (ks, a, n), 4)}[mode]
        fn = cute.compile(obj.launch,
                          _fake(Int32, (e, n // 16, k // 64, 32, 4)), _fake(cutlass.Int16, (e, n // 16, k // 64, 32), 2),
                          _fake(id_dtype, (a,), 4), xin, _fake(wt_dtype, (a,), 2), _fake(Float32, (e, 3), 4), out,
                          Int32(1), Float32(0.0), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn
