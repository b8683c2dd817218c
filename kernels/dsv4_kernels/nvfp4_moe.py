"""Grouped MoE over NVFP4 experts (routed experts only), CuTe DSL on Hopper.

    out[t] = sum_k w[t, k] * W2_e (swiglu(W1_e x[t], W3_e x[t]))     e = ids[t, k]

Steps (all on the GPU, no host synchronisation, CUDA-graph capturable):
1. routing bookkeeping in torch: assignments sorted by expert (stable argsort), per-expert counts by scatter_add,
   offsets by cumsum -- device tensors the kernels read, so token counts never become Python ints;
2. gate_up kernel: grid (row tiles, experts); a CTA whose expert got no token exits at once, so at decode only
   touched experts' weight bytes move. W1 and W3 are interleaved at load time in blocks of 8 rows, so each 16-row MMA
   tile holds 8 gate rows and the 8 matching up rows and the SwiGLU (gate clamped from above, up clamped both sides,
   as TorchOps._swiglu) is applied in the epilogue; h is written bf16 in expert-sorted order;
3. down kernel: same grid over W2; the epilogue multiplies by the routing weight and writes fp32 rows back in the
   original (token, k) order; a sum over k and the cast to bf16 finish in torch.

Token rows of one expert are processed in blocks of 8 * MT inside the CTA (dynamic count), so 0 tokens or all
tokens on one expert both work. The MMA core, the weight layout and the in-register decode are nvfp4_gemm's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from cutlass.cutlass_dsl import T as _T, dsl_user_op
from cutlass._mlir.dialects import llvm

from dsv4_kernels.nvfp4_gemm import (KCHUNK, ROWTILE, WARPS, _call, _fake, _options, _stream_arg, _TVM_FFI,
                                     decode_chunk, mma_block, prepare_nvfp4_weight)
from dsv4_kernels.pdl import chain

__all__ = ["PackedExperts", "prepare_nvfp4_experts", "nvfp4_moe", "bench"]

_COMPILED: dict[tuple, Any] = {}


@dataclass
class PackedExperts:
    w13_codes: torch.Tensor    # int32 [E, 2I/16, D/64, 32, 4]  (8 gate rows, 8 up rows per tile)
    w13_scales: torch.Tensor   # int16 [E, 2I/16, D/64, 32]
    w2_codes: torch.Tensor     # int32 [E, D/16, I/64, 32, 4]
    w2_scales: torch.Tensor    # int16 [E, D/16, I/64, 32]
    alphas: torch.Tensor       # fp32 [E, 3]: scale_2 * 2^8 of w1, w3, w2
    n_experts: int
    dim: int
    inter: int
    cache: dict = field(default_factory=dict, repr=False)

    def expert_bytes(self) -> int:
        """Weight bytes of one expert (gate, up, down) as the kernels read them."""
        e = self.n_experts
        return (self.w13_codes.numel() * 4 + self.w13_scales.numel() * 2 + self.w2_codes.numel() * 4
                + self.w2_scales.numel() * 2) // e


class _NV:  # minimal NVFP4Tensor look-alike for the re-layout
    def __init__(self, packed, scale, scale_2):
        self.packed, self.scale, self.scale_2 = packed, scale, scale_2


def prepare_nvfp4_experts(w1: list, w2: list, w3: list, device: torch.device | str) -> PackedExperts:
    """Routed experts' NVFP4Tensors (w1/w3 [I, D], w2 [D, I]) -> PackedExperts on `device` (re-layout there)."""
    dev = torch.device(device)
    if not (len(w1) == len(w2) == len(w3)) or not w1:
        raise ValueError("prepare_nvfp4_experts: w1, w2, w3 must be equally long non-empty lists")
    inter, dim = w1[0].shape
    if inter % 8 or inter % KCHUNK or dim % KCHUNK or dim % ROWTILE:
        raise ValueError(f"prepare_nvfp4_experts: need dim % 64 == 0 and inter % 64 == 0, got dim={dim} inter={inter}")
    c13, s13, c2, s2, al = [], [], [], [], []
    one = torch.ones((), dtype=torch.float32)
    for a, b, c in zip(w1, w3, w2):
        if tuple(a.shape) != (inter, dim) or tuple(b.shape) != (inter, dim) or tuple(c.shape) != (dim, inter):
            raise ValueError(f"prepare_nvfp4_experts: expert shapes {a.shape}, {b.shape}, {c.shape} differ from "
                             f"w1/w3 [{inter}, {dim}], w2 [{dim}, {inter}]")
        pa, pb = a.packed.to(dev), b.packed.to(dev)
        sa, sb = a.scale.to(dev), b.scale.to(dev)
        packed = torch.stack([pa.view(inter // 8, 8, -1), pb.view(inter // 8, 8, -1)], 1).reshape(2 * inter, -1)
        scale = torch.stack([sa.view(inter // 8, 8, -1), sb.view(inter // 8, 8, -1)], 1).reshape(2 * inter, -1)
        p13 = prepare_nvfp4_weight(_NV(packed, scale, one), dev)
        p2 = prepare_nvfp4_weight(_NV(c.packed.to(dev), c.scale.to(dev), c.scale_2), dev)
        c13.append(p13.codes), s13.append(p13.scales), c2.append(p2.codes), s2.append(p2.scales)
        al.append([float(a.scale_2.reshape(-1)[0]) * 256.0, float(b.scale_2.reshape(-1)[0]) * 256.0, p2.alpha])
    return PackedExperts(torch.stack(c13), torch.stack(s13), torch.stack(c2), torch.stack(s2),
                         torch.tensor(al, dtype=torch.float32, device=dev), len(w1), dim, inter)


def _swiglu(gate, up, limit, clamp: bool):
    """silu(gate) * up of one fp32 pair, clamped as TorchOps.moe does (gate from above, up both ways) when `clamp`
    (a Python bool: the clamp is decided when the kernel is traced). The one formula of the grouped and the decode
    paths, so their H values stay bit-equal."""
    if clamp:
        gate = cutlass.min(gate, limit)
        up = cutlass.max(cutlass.min(up, limit), -limit)
    return gate / (Float32(1.0) + cute.math.exp(-gate)) * up


class _Grouped:
    """One grouped GEMM over experts. mode "gateup": x rows gathered by token, SwiGLU epilogue -> H [A, I] bf16
    (sorted order). mode "down": x rows = H (sorted order), epilogue * routing weight -> Y [A, D] fp32 at the
    assignment's original index."""

    def __init__(self, mode: str, n: int, k: int, mt: int, clamp: bool):
        self.mode, self.n, self.k, self.mt, self.clamp = mode, n, k, mt, clamp
        self.nchunk = k // KCHUNK
        self.unroll = 4 if self.nchunk % 4 == 0 else (2 if self.nchunk % 2 == 0 else 1)

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mS: cute.Tensor, mX: cute.Tensor, mOff: cute.Tensor, mRows: cute.Tensor,
               mPerm: cute.Tensor, mWt: cute.Tensor, mAl: cute.Tensor, mOut: cute.Tensor, limit: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        bx, e, _ = cute.arch.block_idx()
        lane = tidx % 32
        warp = tidx // 32
        g = lane // 4
        t = lane % 4
        tile = bx * WARPS + warp
        MT = self.mt
        U = self.unroll
        off = mOff[e]
        cnt = mOff[e + 1] - off
        acc = cute.make_rmem_tensor((MT * 4,), Float32)
        wreg = cute.make_rmem_tensor((4, U), Int32)
        sreg = cute.make_rmem_tensor((U,), Int32)
        xreg = cute.make_rmem_tensor((8,), Int32)
        rows = cute.make_rmem_tensor((MT,), Int32)
        if tile < self.n // ROWTILE and cnt > 0:
            nblk = (cnt + MT * 8 - 1) // (MT * 8)
            for mb in cutlass.range(nblk):
                p0 = off + mb * (MT * 8)
                for j in cutlass.range_constexpr(MT):
                    p = cutlass.min(p0 + j * 8 + g, off + cnt - 1)
                    if cutlass.const_expr(self.mode == "gateup"):
                        rows[j] = mRows[p]
                    else:
                        rows[j] = p
                for i in cutlass.range_constexpr(MT * 4):
                    acc[i] = Float32(0.0)
                for it in cutlass.range(self.nchunk // U):
                    cb = it * U
                    for u in cutlass.range_constexpr(U):
                        cute.autovec_copy(mW[e, tile, cb + u, lane, None], wreg[None, u])
                        sreg[u] = Int32(mS[e, tile, cb + u, lane])
                    for u in cutlass.range_constexpr(U):
                        a = decode_chunk(wreg, sreg, u)
                        kx = (cb + u) * 4 + t
                        for j in cutlass.range_constexpr(MT):
                            cute.autovec_copy(mX[rows[j], kx, None], xreg)
                            mma_block(a, xreg, acc, j)
                for j in cutlass.range_constexpr(MT):
                    for q in cutlass.range_constexpr(2):
                        p = p0 + j * 8 + 2 * t + q
                        if p < off + cnt:
                            if cutlass.const_expr(self.mode == "gateup"):
                                h = _swiglu(acc[j * 4 + q] * mAl[e, 0], acc[j * 4 + 2 + q] * mAl[e, 1], limit,
                                            self.clamp)
                                mOut[p, tile * 8 + g] = h.to(cutlass.BFloat16)
                            else:
                                a_idx = mPerm[p]
                                wt = mWt[p] * mAl[e, 2]
                                mOut[a_idx, tile * ROWTILE + g] = acc[j * 4 + q] * wt
                                mOut[a_idx, tile * ROWTILE + g + 8] = acc[j * 4 + 2 + q] * wt

    @cute.jit
    def launch(self, mW: cute.Tensor, mS: cute.Tensor, mX: cute.Tensor, mOff: cute.Tensor, mRows: cute.Tensor,
               mPerm: cute.Tensor, mWt: cute.Tensor, mAl: cute.Tensor, mOut: cute.Tensor, limit: Float32,
               n_experts: Int32, stream):
        grid_x = (self.n // ROWTILE + WARPS - 1) // WARPS
        self.kernel(mW, mS, mX, mOff, mRows, mPerm, mWt, mAl, mOut, limit).launch(
            grid=[grid_x, n_experts, 1], block=[WARPS * 32, 1, 1], stream=stream)


@dsl_user_op
def _nth_set_bit(m0: Int32, m1: Int32, n: Int32, *, loc=None, ip=None):
    """Bit position (0..63) of the n-th (0-based) set bit of the 64-bit mask (m1:m0); n < popc."""
    return Int32(llvm.inline_asm(
        _T.i32(), [Int32(m0).ir_value(loc=loc, ip=ip), Int32(m1).ir_value(loc=loc, ip=ip),
                   Int32(n).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 m, n, p, c, u;\n\t.reg .pred q;\n\t"
        "popc.b32 c, $1;\n\tsetp.ge.s32 q, $3, c;\n\tmov.b32 n, $3;\n\t@q sub.s32 n, n, c;\n\t"
        "selp.b32 m, $2, $1, q;\n\tselp.b32 p, 32, 0, q;\n\t"
        + "".join(f"and.b32 u, m, {(1 << w) - 1};\n\tpopc.b32 c, u;\n\tsetp.ge.s32 q, n, c;\n\t"
                  f"@q sub.s32 n, n, c;\n\t@q shr.b32 m, m, {w};\n\t@q add.s32 p, p, {w};\n\t"
                  for w in (16, 8, 4, 2, 1))
        + "mov.b32 $0, p;\n\t}",
        "=r,r,r,r", loc=loc, ip=ip))


@cute.jit
def _slot_routing(mIds: cute.Tensor, n_assign: Int32, slot: Int32, lane: Int32):
    """The routing a decode CTA needs, from at most 64 ids with two warp ballots: its slot's expert e, whether an
    earlier slot has e (then the CTA has nothing to do), and the 64-bit mask (m0, m1) and count of e's assignments."""
    e = Int32(mIds[slot])
    v0 = Int32(-1)
    v1 = Int32(-1)
    if lane < n_assign:
        v0 = Int32(mIds[lane])
    if lane + 32 < n_assign:
        v1 = Int32(mIds[lane + 32])
    dup = cute.arch.vote_ballot_sync(((v0 == e) & (lane < slot)) | ((v1 == e) & (lane + 32 < slot)))
    m0 = cute.arch.vote_ballot_sync(v0 == e)
    m1 = cute.arch.vote_ballot_sync(v1 == e)
    cnt = Int32(cute.arch.popc(m0)) + Int32(cute.arch.popc(m1))
    return e, dup, m0, m1, cnt


def slot_rows(rows, m0, m1, cnt, p0, g, mt: int, per_token: int) -> None:
    """rows[j]: the x row lane row g of 8-assignment block j (from the p0-th of the slot's assignments on) reads:
    the token (a // per_token, gate_up) or the assignment (per_token = 0, down). Clamped to the last assignment:
    rows past cnt only feed output columns that are never stored. Shared by the decode kernels (traced inline)."""
    for j in range(mt):
        a = _nth_set_bit(m0, m1, cutlass.min(p0 + j * 8 + g, cnt - 1))
        rows[j] = a // per_token if per_token else a


@cute.jit
def store_slot_block(mode: cutlass.Constexpr, mt: cutlass.Constexpr, clamp: cutlass.Constexpr, mOut: cute.Tensor,
                     mWt: cute.Tensor, mAl: cute.Tensor, e: Int32, al2: Float32, acc: cute.Tensor, m0: Int32,
                     m1: Int32, cnt: Int32, p0: Int32, t: Int32, g: Int32, tile: Int32, kz: Int32, limit: Float32):
    """Epilogue of a decode kernel's 8*mt-assignment block: "gateup" writes the fp32 gate / up partials
    GU[kz, a, 0 | 1, row], "gateup_h" (whole K) the bf16 SwiGLU H[a, row] as _DecodeSwiglu computes it over one
    split, "down" the weighted partial YP[kz, a, row] (rows g and g + 8 of the tile)."""
    for j in cutlass.range_constexpr(mt):
        for q in cutlass.range_constexpr(2):
            p = p0 + j * 8 + 2 * t + q
            if p < cnt:
                a = _nth_set_bit(m0, m1, p)
                if cutlass.const_expr(mode == "gateup_h"):
                    h = _swiglu((Float32(0.0) + acc[j * 4 + q]) * mAl[e, 0],
                                (Float32(0.0) + acc[j * 4 + 2 + q]) * mAl[e, 1], limit, clamp)
                    mOut[a, tile * 8 + g] = h.to(cutlass.BFloat16)
                elif cutlass.const_expr(mode == "gateup"):
                    mOut[kz, a, 0, tile * 8 + g] = acc[j * 4 + q]
                    mOut[kz, a, 1, tile * 8 + g] = acc[j * 4 + 2 + q]
                else:
                    wt = Float32(mWt[a]) * al2
                    mOut[kz, a, tile * ROWTILE + g] = acc[j * 4 + q] * wt
                    mOut[kz, a, tile * ROWTILE + g + 8] = acc[j * 4 + 2 + q] * wt


class _Decode:
    """Decode-time grouped GEMM (A = T * topk <= 64 assignments), no routing launches.

    Grid (row-tile CTAs, A slots, K splits). Slot s takes expert e = ids[s]; if an earlier slot has the same expert
    the CTA exits, otherwise it gathers every assignment of e from ids with two warp ballots (the routing is done
    inside the kernel, per CTA, from at most 64 ids). Each K split writes its own FP32 partial (no atomics, no
    zeroing, deterministic):
      gateup: GU[ks, a, 0 | 1, i] = gate | up pre-activation of assignment a (no scale_2), x row = a // topk;
      down:   x row = H[a] (bf16, from `_DecodeSwiglu`), YP[ks, a, n] = acc * w[a] * alpha2.
    `_Finalize` then sums YP over (ks, k) and rounds to bf16. (A first version applied the SwiGLU while loading
    the down kernel's operand: every 16-row tile recomputed it for the whole row, 3-6x slower than reading H.)"""

    def __init__(self, mode: str, n: int, k: int, mt: int, ks: int, topk: int, unroll: int = 4, pdl: bool = False):
        self.mode, self.n, self.k, self.mt, self.ks, self.topk = mode, n, k, mt, ks, topk
        self.nchunk = k // KCHUNK
        self.cps = self.nchunk // ks
        self.unroll = _unroll(self.cps, unroll)
        # down with PDL: launched while the SwiGLU kernel still runs; its first weight loads go out before
        # griddepcontrol.wait (they depend on nothing the SwiGLU writes), H is read after it
        self.prefetch = pdl and mode == "down"

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mS: cute.Tensor, mIds: cute.Tensor, mX: cute.Tensor, mWt: cute.Tensor,
               mAl: cute.Tensor, mOut: cute.Tensor, n_assign: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bx, slot, kz = cute.arch.block_idx()
        lane = tidx % 32
        warp = tidx // 32
        g = lane // 4
        t = lane % 4
        tile = bx * WARPS + warp
        MT = self.mt
        U = self.unroll
        # the next kernel of the chain may be scheduled once every CTA of this grid has started (it waits in
        # griddepcontrol.wait for this grid's end before it reads what we write); a no-op without PDL
        cute.arch.griddepcontrol_launch_dependents()
        e, dup, m0, m1, cnt = _slot_routing(mIds, n_assign, slot, lane)
        acc = cute.make_rmem_tensor((MT * 4,), Float32)
        wreg = cute.make_rmem_tensor((4, U), Int32)
        sreg = cute.make_rmem_tensor((U,), Int32)
        xreg = cute.make_rmem_tensor((8,), Int32)
        rows = cute.make_rmem_tensor((MT,), Int32)
        al2 = mAl[e, 2]
        if tile < self.n // ROWTILE and dup == 0:
            nblk = (cnt + MT * 8 - 1) // (MT * 8)
            c0 = kz * self.cps
            if cutlass.const_expr(self.prefetch):
                for u in cutlass.range_constexpr(U):
                    cute.autovec_copy(mW[e, tile, c0 + u, lane, None], wreg[None, u])
                    sreg[u] = Int32(mS[e, tile, c0 + u, lane])
                cute.arch.griddepcontrol_wait()
            for mb in cutlass.range(nblk):
                p0 = mb * (MT * 8)
                slot_rows(rows, m0, m1, cnt, p0, g, MT, self.topk if self.mode == "gateup" else 0)
                for i in cutlass.range_constexpr(MT * 4):
                    acc[i] = Float32(0.0)
                for it in cutlass.range(self.cps // U):
                    cb = c0 + it * U
                    if cutlass.const_expr(self.prefetch):
                        if mb + it > 0:
                            for u in cutlass.range_constexpr(U):
                                cute.autovec_copy(mW[e, tile, cb + u, lane, None], wreg[None, u])
                                sreg[u] = Int32(mS[e, tile, cb + u, lane])
                    else:
                        for u in cutlass.range_constexpr(U):
                            cute.autovec_copy(mW[e, tile, cb + u, lane, None], wreg[None, u])
                            sreg[u] = Int32(mS[e, tile, cb + u, lane])
                    for u in cutlass.range_constexpr(U):
                        wa = decode_chunk(wreg, sreg, u)
                        kx = (cb + u) * 4 + t
                        for j in cutlass.range_constexpr(MT):
                            cute.autovec_copy(mX[rows[j], kx, None], xreg)
                            mma_block(wa, xreg, acc, j)
                store_slot_block(self.mode, MT, False, mOut, mWt, mAl, e, al2, acc, m0, m1, cnt, p0, t, g, tile, kz,
                                 Float32(0.0))

    @cute.jit
    def launch(self, mW: cute.Tensor, mS: cute.Tensor, mIds: cute.Tensor, mX: cute.Tensor, mWt: cute.Tensor,
               mAl: cute.Tensor, mOut: cute.Tensor, n_assign: Int32, stream):
        grid_x = (self.n // ROWTILE + WARPS - 1) // WARPS
        self.kernel(mW, mS, mIds, mX, mWt, mAl, mOut, n_assign).launch(
            grid=[grid_x, n_assign, self.ks], block=[WARPS * 32, 1, 1], stream=stream, use_pdl=self.prefetch)


class _DecodeSwiglu:
    """H[a, i] = bf16(silu(gate) * up) with gate | up = alpha0 | alpha1 of expert ids[a] times the sum over K splits
    of GU[ks, a, 0 | 1, i], clamped by swiglu_limit as the grouped kernel's epilogue does."""

    def __init__(self, inter: int, ks: int, clamp: bool, pdl: bool = False):
        self.inter, self.ks, self.clamp, self.pdl = inter, ks, clamp, pdl

    @cute.kernel
    def kernel(self, mGU: cute.Tensor, mIds: cute.Tensor, mAl: cute.Tensor, mH: cute.Tensor, total: Int32,
               limit: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        bx, _, _ = cute.arch.block_idx()
        i = bx * 256 + tidx
        cute.arch.griddepcontrol_launch_dependents()
        cute.arch.griddepcontrol_wait()         # GU is the gate_up kernel's output (a no-op without PDL)
        if i < total:
            a = i // self.inter
            c = i % self.inter
            e = Int32(mIds[a])
            gs = Float32(0.0)
            us = Float32(0.0)
            for ks in cutlass.range_constexpr(self.ks):
                gs = gs + mGU[ks, a, 0, c]
                us = us + mGU[ks, a, 1, c]
            mH[a, c] = _swiglu(gs * mAl[e, 0], us * mAl[e, 1], limit, self.clamp).to(cutlass.BFloat16)

    @cute.jit
    def launch(self, mGU: cute.Tensor, mIds: cute.Tensor, mAl: cute.Tensor, mH: cute.Tensor, total: Int32,
               limit: Float32, stream):
        self.kernel(mGU, mIds, mAl, mH, total, limit).launch(grid=[(total + 255) // 256, 1, 1], block=[256, 1, 1],
                                                             stream=stream, use_pdl=self.pdl)


class _Finalize:
    """out[t, n] = bf16(sum_{ks, k} YP[ks, t * topk + k, n])."""

    def __init__(self, d: int, topk: int, ks: int, pdl: bool = False):
        self.d, self.topk, self.ks, self.pdl = d, topk, ks, pdl

    @cute.kernel
    def kernel(self, mYP: cute.Tensor, mOut: cute.Tensor, total: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bx, _, _ = cute.arch.block_idx()
        i = bx * 256 + tidx
        cute.arch.griddepcontrol_wait()         # YP is the down kernel's output (a no-op without PDL)
        if i < total:
            tok = i // self.d
            nn = i % self.d
            s = Float32(0.0)
            for kk in cutlass.range_constexpr(self.topk):
                for ks in cutlass.range_constexpr(self.ks):
                    s = s + mYP[ks, tok * self.topk + kk, nn]
            mOut[tok, nn] = s.to(cutlass.BFloat16)

    @cute.jit
    def launch(self, mYP: cute.Tensor, mOut: cute.Tensor, total: Int32, stream):
        self.kernel(mYP, mOut, total).launch(grid=[(total + 255) // 256, 1, 1], block=[256, 1, 1], stream=stream,
                                             use_pdl=self.pdl)


DECODE_LIMIT = 64        # the decode kernels gather assignments with two 32-lane ballots: A <= 64
# The decode path is taken when T * topk <= DECODE_MAX_ASSIGN (env DSV4_MOE_DECODE_MAX_ASSIGN, 0 = off, for A/B
# runs). H100, session 15 (docs/PERF.md): flash T=1 101.5 -> 46.3 us, T=8 267.6 -> 222.1 us against the sorted path.
DECODE_MAX_ASSIGN = int(os.environ.get("DSV4_MOE_DECODE_MAX_ASSIGN", str(DECODE_LIMIT)))


# Programmatic dependent launch inside the decode chain (gate_up -> SwiGLU -> down -> finalize): each kernel lets
# the next one be scheduled once all its CTAs have started, and the next waits in griddepcontrol.wait before it
# reads its input; the down kernel issues its first weight loads before that wait. Env DSV4_MOE_PDL=0 turns it off.
DECODE_PDL = os.environ.get("DSV4_MOE_PDL", "1") != "0"
# ... and the ring gate_up launched as a programmatic dependent of the routing kernel, for steps on the PDL chain
# (dsv4_kernels.pdl.chain) of at most GATE_PDL_MAX_TOKENS tokens. H100, flash-layers (docs/PERF.md session 27): per
# layer 0.992-0.994x at batch 1 but 1.009x at batch 8 (its CTAs resident early hold SM slots the routing's side
# kernels want); batches 2-4 were not measured, so they keep the plain launch. Env DSV4_MOE_GATE_PDL=0 turns it
# off; read at every launch (A/B runs).
GATE_PDL = os.environ.get("DSV4_MOE_GATE_PDL", "1") != "0"
GATE_PDL_MAX_TOKENS = 1


def gate_up_pdl(tokens: int) -> bool:
    """Whether the MoE decode chain's gate_up launches as a programmatic dependent at a step of `tokens`."""
    return DECODE_PDL and GATE_PDL and tokens <= GATE_PDL_MAX_TOKENS and chain(tokens)

# The decode chain's gate_up and down kernels stream their weights through a cp.async shared-memory ring
# (dsv4_kernels.nvfp4_moe_ring, bit-identical) where the K split allows. Env DSV4_MOE_RING=0 turns it off.
DECODE_RING = os.environ.get("DSV4_MOE_RING", "1") != "0"

# Up to this many assignments the decode path runs as one launch (dsv4_kernels.nvfp4_moe_fused: gate_up + SwiGLU +
# down in one grid, then the finalize) instead of the gate_up -> SwiGLU -> down chain. Off by default: on the H100
# it measured within +-5 % of the chain (flash T = 1: 45.5 vs 43.2 us; docs/PERF.md session 17). Env
# DSV4_MOE_FUSED_MAX_ASSIGN (e.g. 64) turns it on for A/B runs.
DECODE_FUSED_MAX_ASSIGN = int(os.environ.get("DSV4_MOE_FUSED_MAX_ASSIGN", "0"))


def _unroll(chunks: int, want: int) -> int:
    """Chunks of weight loads in flight per lane: the largest power of two <= want dividing the split's chunks."""
    u = want
    while u > 1 and chunks % u:
        u //= 2
    return u


def compile_decode(mode: str, e: int, n: int, k: int, mt: int, ks: int, topk: int, id_dtype=cutlass.Int64,
                   wt_dtype=Float32, unroll: int = 4, pdl: bool = False):
    key = ("dec", mode, e, n, k, mt, ks, topk, id_dtype, wt_dtype, _unroll(k // KCHUNK // ks, unroll), pdl,
           _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _Decode(mode, n, k, mt, ks, topk, unroll, pdl)
        a = cute.sym_int()
        xin = _fake(Int32, (cute.sym_int() if mode == "gateup" else a, k // 16, 8))
        out = _fake(Float32, (ks, a, 2, n // 2) if mode == "gateup" else (ks, a, n), 4)
        fn = cute.compile(obj.launch,
                          _fake(Int32, (e, n // 16, k // 64, 32, 4)), _fake(cutlass.Int16, (e, n // 16, k // 64, 32), 2),
                          _fake(id_dtype, (a,), 4), xin, _fake(wt_dtype, (a,), 2), _fake(Float32, (e, 3), 4), out,
                          Int32(1), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


def compile_decode_swiglu(e: int, inter: int, ks: int, clamp: bool, id_dtype=cutlass.Int64, pdl: bool = False):
    key = ("dec_swiglu", e, inter, ks, clamp, id_dtype, pdl, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        a = cute.sym_int()
        fn = cute.compile(_DecodeSwiglu(inter, ks, clamp, pdl).launch, _fake(Float32, (ks, a, 2, inter), 4),
                          _fake(id_dtype, (a,), 4), _fake(Float32, (e, 3), 4), _fake(cutlass.BFloat16, (a, inter), 8),
                          Int32(1), Float32(0.0), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


def compile_finalize(d: int, topk: int, ks: int, pdl: bool = False):
    key = ("fin", d, topk, ks, pdl, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _Finalize(d, topk, ks, pdl)
        t = cute.sym_int()
        fn = cute.compile(obj.launch, _fake(Float32, (ks, t * topk, d), 4), _fake(cutlass.BFloat16, (t, d), 2),
                          Int32(1), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


# K splits of the decode kernels: None = automatic (decode_plan); (ks_gateup, ks_down) to force (bench sweeps)
DECODE_KS: tuple[int, int] | None = None


def _split(nchunk: int, want: int) -> int:
    """The largest power-of-two K split <= want that divides the K chunks and leaves each split >= 8 of them."""
    ks = want
    while ks > 1 and (nchunk % ks or nchunk // ks < 8):
        ks //= 2
    return ks


def decode_plan(experts: "PackedExperts", num_assign: int, topk: int) -> tuple[int, int, int, int]:
    """(mt, ks_gateup, ks_down, unroll) of the decode path, from sweeps on the H100 for V4-Flash and V4-Pro at 1-8
    tokens (docs/PERF.md, sessions 15 and 17). With the cp.async ring (the default) no K split. For the register
    kernels each warp waits on its weight loads with few tokens (ncu: 75 % of the stall cycles on L1TEX
    scoreboard), so the splits and the loads in flight per lane (unroll) both grow as T shrinks: flash T=1 101.5 us
    (sorted path) -> 46.8 (splits) -> 43.5-44.9 (unroll 16)."""
    t = -(-num_assign // topk)
    mt = 1 if t <= 8 else (2 if t <= 16 else 8)
    unroll = 16 if t <= 4 else 4
    if DECODE_KS is not None:
        return (mt, *DECODE_KS, unroll)
    from dsv4_kernels import nvfp4_moe_ring as ring
    if DECODE_RING and ring.ring_fits(experts.dim, 1) and ring.ring_fits(experts.inter, 1):
        # the ring keeps a warp's loads in flight along a whole K, so no split is needed (H100 sweep, session 17:
        # flash T = 1 / 2 / 4 43.7 / 73.2 / 139.7 us register kernels at their best splits -> 42.1 / 69.7 / 127.6)
        return (mt, 1, 1, unroll)
    want = (4, 4) if t <= 2 else ((4, 2) if t <= 4 else (2, 2))
    return (mt, _split(experts.dim // KCHUNK, want[0]), _split(experts.inter // KCHUNK, want[1]), unroll)


def _decode_kernels(E, D, I, mt, ks1, ks2, topk, clamp, id_t=cutlass.Int64, wt_t=Float32, unroll=4, pdl=False,
                    gate_pdl=False, tokens=0):
    """The decode chain: (gate_up, SwiGLU or None, down, ring_up, ring_down). With the cp.async ring and an unsplit
    gate_up, gate_up applies the SwiGLU itself (no SwiGLU kernel); ring kernels take a trailing `limit` arg.
    `gate_pdl`: the ring gate_up launches as a programmatic dependent of the kernel before it (the routing).
    `tokens`: the step's token count (the ring kernels' depth, nvfp4_moe_ring.up_stages / down_stages)."""
    from dsv4_kernels import nvfp4_moe_ring as ring
    ring_up = DECODE_RING and ring.ring_fits(D, ks1)
    ring_down = DECODE_RING and ring.ring_fits(I, ks2)
    swiglu = None
    if ring_up and ks1 == 1:
        f1 = ring.compile_decode_ring("gateup_h", E, 2 * I, D, mt, 1, topk, id_t, wt_t, gate_pdl, clamp=clamp,
                                      stages=ring.up_stages(tokens))
    else:
        f1 = ring.compile_decode_ring("gateup", E, 2 * I, D, mt, ks1, topk, id_t, wt_t, gate_pdl,
                                      stages=ring.up_stages(tokens)) if ring_up else \
            compile_decode("gateup", E, 2 * I, D, mt, ks1, topk, id_t, wt_t, unroll)
        swiglu = compile_decode_swiglu(E, I, ks1, clamp, id_t, pdl)
    f2 = ring.compile_decode_ring("down", E, D, I, mt, ks2, topk, id_t, wt_t, pdl,
                                  stages=ring.down_stages(tokens)) if ring_down else \
        compile_decode("down", E, D, I, mt, ks2, topk, id_t, wt_t, unroll, pdl)
    return f1, swiglu, f2, ring_up, ring_down


def _moe_decode(x, expert_ids, expert_weights, experts, swiglu_limit):
    T, topk = expert_ids.shape
    D, I, E = experts.dim, experts.inter, experts.n_experts
    A = T * topk
    dev = x.device
    ids = expert_ids.reshape(-1)
    if ids.dtype not in (torch.int64, torch.int32):
        ids = ids.to(torch.int64)
    ids = ids.contiguous()
    wts = expert_weights.reshape(-1)
    if wts.dtype not in (torch.float32, torch.bfloat16):
        wts = wts.float()
    wts = wts.contiguous()
    if A <= DECODE_FUSED_MAX_ASSIGN and DECODE_KS is None:
        from dsv4_kernels.nvfp4_moe_fused import moe_decode_fused
        return moe_decode_fused(x, ids, wts, experts, swiglu_limit, topk, DECODE_PDL)
    id_t = cutlass.Int64 if ids.dtype == torch.int64 else Int32
    wt_t = Float32 if wts.dtype == torch.float32 else cutlass.BFloat16
    mt, ks1, ks2, unroll = decode_plan(experts, A, topk)
    pdl = DECODE_PDL
    f1, swiglu, f2, ring_up, ring_down = _decode_kernels(E, D, I, mt, ks1, ks2, topk, swiglu_limit > 0, id_t, wt_t,
                                                         unroll, pdl, gate_up_pdl(T), T)
    lim = float(swiglu_limit)
    h = torch.empty((A, I), dtype=torch.bfloat16, device=dev)
    yp = torch.empty((ks2, A, D), dtype=torch.float32, device=dev)
    out = torch.empty((T, D), dtype=torch.bfloat16, device=dev)
    xi = x.view(torch.int32).view(T, D // 16, 8)
    if swiglu is None:
        _call(f1, experts.w13_codes, experts.w13_scales, ids, xi, wts, experts.alphas, h, A, lim)
    else:
        gu = torch.empty((ks1, A, 2, I), dtype=torch.float32, device=dev)
        _call(f1, experts.w13_codes, experts.w13_scales, ids, xi, wts, experts.alphas, gu, A,
              *([lim] if ring_up else []))
        _call(swiglu, gu, ids, experts.alphas, h, A * I, lim)
    _call(f2, experts.w2_codes, experts.w2_scales, ids, h.view(torch.int32).view(A, I // 16, 8), wts,
          experts.alphas, yp, A, *([lim] if ring_down else []))
    f3 = compile_finalize(D, topk, ks2, pdl)
    _call(f3, yp, out, T * D)
    return out


def compile_grouped(mode: str, e: int, n: int, k: int, mt: int, clamp: bool, out_n: int):
    key = (mode, e, n, k, mt, clamp, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _Grouped(mode, n, k, mt, clamp)
        a = cute.sym_int()      # assignments (T * topk)
        tx = cute.sym_int()     # rows of the B operand source
        out_t = cutlass.BFloat16 if mode == "gateup" else Float32
        fn = cute.compile(obj.launch,
                          _fake(Int32, (e, n // 16, k // 64, 32, 4)), _fake(cutlass.Int16, (e, n // 16, k // 64, 32), 2),
                          _fake(Int32, (tx, k // 16, 8)), _fake(Int32, (e + 1,), 4), _fake(Int32, (a,), 4),
                          _fake(Int32, (a,), 4), _fake(Float32, (a,), 4), _fake(Float32, (e, 3), 4),
                          _fake(out_t, (a, out_n), 4), Float32(0.0), Int32(e), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


SORTED_ONLY = False   # True: always the sorted (routing in torch) path, for tests and comparisons


def _mt_for(num_assign: int, n_experts: int) -> int:
    return 1 if num_assign <= 2 * n_experts else (2 if num_assign <= 8 * n_experts else 8)


def _sorted_by_torch(expert_ids: torch.Tensor, expert_weights: torch.Tensor, E: int):
    """(offs [E+1], perm [A], rows [A] int32, wts [A] fp32): assignments grouped by expert, stably."""
    topk, dev = expert_ids.shape[1], expert_ids.device
    flat = expert_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=dev).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    offs[1:] = torch.cumsum(counts, 0)
    return offs, order.to(torch.int32), (order // topk).to(torch.int32), expert_weights.reshape(-1).float()[order]


def _sorted_by_kernel(expert_ids: torch.Tensor, expert_weights: torch.Tensor, E: int):
    """_sorted_by_torch's result from one kernel (dsv4_kernels.moe_sort) instead of ~10 torch launches."""
    T, topk = expert_ids.shape
    A, dev = T * topk, expert_ids.device
    ids = expert_ids.reshape(-1)
    ids = (ids if ids.dtype in (torch.int64, torch.int32) else ids.to(torch.int64)).contiguous()
    w = expert_weights.reshape(-1).float().contiguous()
    offs = torch.empty(E + 1, dtype=torch.int32, device=dev)
    perm = torch.empty(A, dtype=torch.int32, device=dev)
    rows = torch.empty(A, dtype=torch.int32, device=dev)
    wts = torch.empty(A, dtype=torch.float32, device=dev)
    _call(compile_sort(E, topk, ids.dtype == torch.int64), ids, w, offs, perm, rows, wts)
    return offs, perm, rows, wts


def compile_sort(e: int, topk: int, ids_i64: bool):
    key = ("sort", e, topk, ids_i64, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        from dsv4_kernels.moe_sort import MoeSort
        a = cute.sym_int()
        id_t = cutlass.Int64 if ids_i64 else Int32
        fn = cute.compile(MoeSort(e, topk), _fake(id_t, (a,), 8 if ids_i64 else 4), _fake(Float32, (a,), 4),
                          _fake(Int32, (e + 1,), 4), _fake(Int32, (a,), 4), _fake(Int32, (a,), 4),
                          _fake(Float32, (a,), 4), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


SORT_MAX_ASSIGN = 2048        # dsv4_kernels.moe_sort.MAX_ASSIGN: one warp walks the assignments
SORT_MAX_EXPERTS = 1024


def nvfp4_moe(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, experts: PackedExperts,
              swiglu_limit: float, sort_kernel: bool = False) -> torch.Tensor:
    """Routed experts: x bf16 [T, D], ids [T, k] int, weights [T, k] -> bf16 [T, D]. `sort_kernel`: group the
    assignments by expert with dsv4_kernels.moe_sort (one launch) instead of torch's sort and counts (CuteOps
    passes its `fused_glue`)."""
    if not isinstance(experts, PackedExperts):
        raise TypeError(f"nvfp4_moe: experts must be PackedExperts, got {type(experts).__name__}")
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != experts.dim:
        raise ValueError(f"nvfp4_moe: x must be bf16 [T, {experts.dim}], got {x.dtype} {tuple(x.shape)}")
    if expert_ids.shape != expert_weights.shape or expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"nvfp4_moe: ids {tuple(expert_ids.shape)} / weights {tuple(expert_weights.shape)} must "
                         f"both be [T={x.shape[0]}, k]")
    T, topk = expert_ids.shape
    D, I, E = experts.dim, experts.inter, experts.n_experts
    if T == 0:
        return torch.empty_like(x)
    A = T * topk
    dev = x.device
    x = x.contiguous()
    if A <= min(DECODE_MAX_ASSIGN, DECODE_LIMIT) and not SORTED_ONLY:
        return _moe_decode(x, expert_ids, expert_weights, experts, swiglu_limit)
    if sort_kernel and A <= SORT_MAX_ASSIGN and E % 32 == 0 and E <= SORT_MAX_EXPERTS:
        offs, perm, rows, wts = _sorted_by_kernel(expert_ids, expert_weights, E)
    else:
        offs, perm, rows, wts = _sorted_by_torch(expert_ids, expert_weights, E)
    mt = _mt_for(A, E)
    clamp = swiglu_limit > 0
    h = torch.empty((A, I), dtype=torch.bfloat16, device=dev)
    f1 = compile_grouped("gateup", E, 2 * I, D, mt, clamp, I)
    _call(f1, experts.w13_codes, experts.w13_scales, x.view(torch.int32).view(T, D // 16, 8), offs, rows, perm, wts,
          experts.alphas, h, float(swiglu_limit), E)
    y = torch.empty((A, D), dtype=torch.float32, device=dev)
    f2 = compile_grouped("down", E, D, I, mt, False, D)
    _call(f2, experts.w2_codes, experts.w2_scales, h.view(torch.int32).view(A, I // 16, 8), offs, rows, perm, wts,
          experts.alphas, y, float(swiglu_limit), E)
    return y.view(T, topk, D).sum(1).to(torch.bfloat16)


def warmup(experts: PackedExperts, num_tokens: list[int] | tuple[int, ...], topk: int, swiglu_limit: float) -> None:
    """Compile the kernels the given token counts will use (before CUDA-graph capture). Ids int64, weights fp32
    assumed for the decode path (other dtypes compile on first use)."""
    E, D, I = experts.n_experts, experts.dim, experts.inter
    for t in num_tokens:
        if t * topk <= min(DECODE_MAX_ASSIGN, DECODE_LIMIT) and not SORTED_ONLY:
            if t * topk <= DECODE_FUSED_MAX_ASSIGN and DECODE_KS is None:
                from dsv4_kernels.nvfp4_moe_fused import compile_fused, fused_plan
                mt, ks2, u1, u2 = fused_plan(experts, t * topk, topk)
                compile_fused(E, D, I, mt, ks2, topk, swiglu_limit > 0, u1=u1, u2=u2)
                compile_finalize(D, topk, ks2, DECODE_PDL)
                continue
            mt, ks1, ks2, unroll = decode_plan(experts, t * topk, topk)
            _decode_kernels(E, D, I, mt, ks1, ks2, topk, swiglu_limit > 0, unroll=unroll, pdl=DECODE_PDL,
                            gate_pdl=gate_up_pdl(t), tokens=t)
            compile_finalize(D, topk, ks2, DECODE_PDL)
            continue
        mt = _mt_for(t * topk, E)
        compile_grouped("gateup", E, 2 * I, D, mt, swiglu_limit > 0, I)
        compile_grouped("down", E, D, I, mt, False, D)


# ------------------------------------------------------------------------------------------------------------
# benchmark (used by `dsv4 bench moe`)
# ------------------------------------------------------------------------------------------------------------

_DEFAULT_MAX_ASSIGN = DECODE_MAX_ASSIGN
_DEFAULT_FUSED_MAX = DECODE_FUSED_MAX_ASSIGN
_DEFAULT_RING = DECODE_RING


def _set_variant(v: str) -> None:
    """Bench variants: "auto" (module defaults), "sorted", "decode" (auto K splits), "GxD" (decode chain, forced
    splits), "chain" (decode chain, auto splits), "fused" (decode in one launch), "ring" / "noring" (decode chain with
    or without the cp.async weight ring)."""
    global DECODE_KS, SORTED_ONLY, DECODE_MAX_ASSIGN, DECODE_FUSED_MAX_ASSIGN, DECODE_RING
    DECODE_RING = {"ring": True, "noring": False}.get(v, _DEFAULT_RING)
    v = "decode" if v in ("ring", "noring") else v
    SORTED_ONLY = v == "sorted"
    DECODE_MAX_ASSIGN = _DEFAULT_MAX_ASSIGN if v in ("auto", "sorted") else DECODE_LIMIT
    DECODE_FUSED_MAX_ASSIGN = {"auto": _DEFAULT_FUSED_MAX, "decode": _DEFAULT_FUSED_MAX,
                               "fused": DECODE_LIMIT}.get(v, 0)
    DECODE_KS = None if v in ("auto", "sorted", "decode", "chain", "fused") else tuple(int(a) for a in v.split("x"))


def read_peer_us(nbytes: int, time_ms, reps: int) -> float:
    """Time torch takes to stream `nbytes` once (torch.sum over bf16 copies that together hold >= 2x the L2, so
    each read comes from HBM as the experts' bytes do): the plain-read peer of a weight stream (MoE and GEMM)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    copies = max(2, -(-2 * l2 // nbytes))
    bufs = [torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]

    def read_all():
        for b in bufs:
            b.sum(dtype=torch.float32)

    return time_ms(read_all, reps) / copies * 1e3


def bench(models, batches, bw, reps, shapes, time_ms, variants=("auto",)) -> list[dict]:
    from dsv4.checkpoint.formats import quantize_nvfp4

    rows = []
    print(f"{'model':6} {'T':>5} {'experts':>7} {'MB moved':>8} {'cute us':>9} {'floor us':>8} {'x floor':>7} "
          f"{'read us':>8} {'x read':>6}  path")
    for model in models:
        cfg = shapes[model]
        E, D, I, k = cfg["experts"], cfg["dim"], cfg["inter"], cfg["topk"]
        # random experts: quantise one of each kind and reuse its bytes (timing does not depend on values)
        q1 = quantize_nvfp4(torch.randn(I, D, device="cuda"))
        q2 = quantize_nvfp4(torch.randn(D, I, device="cuda"))
        one = prepare_nvfp4_experts([q1], [q2], [q1], "cuda")
        ex = PackedExperts(one.w13_codes.expand(E, *one.w13_codes.shape[1:]).contiguous(),
                           one.w13_scales.expand(E, *one.w13_scales.shape[1:]).contiguous(),
                           one.w2_codes.expand(E, *one.w2_codes.shape[1:]).contiguous(),
                           one.w2_scales.expand(E, *one.w2_scales.shape[1:]).contiguous(),
                           one.alphas.expand(E, 3).contiguous(), E, D, I)
        gate = torch.randn(E, D, device="cuda") * D ** -0.5
        bias = torch.randn(E, device="cuda") * 0.1
        for T in batches:
            x = torch.randn(T, D, device="cuda").to(torch.bfloat16)
            scores = torch.nn.functional.softplus(x.float() @ gate.T).sqrt()
            ids = (scores + bias).topk(k, dim=-1).indices
            w = scores.gather(1, ids)
            w = w / w.sum(-1, keepdim=True)
            touched = int(torch.unique(ids).numel())
            moved = touched * ex.expert_bytes()
            peer = read_peer_us(moved, time_ms, reps)
            for v in variants:
                if v not in ("auto", "sorted") and T * k > DECODE_LIMIT:
                    continue
                _set_variant(v)
                warmup(ex, [T], k, 10.0)
                t = time_ms(lambda: nvfp4_moe(x, ids, w, ex, 10.0), reps)
                if SORTED_ONLY or T * k > min(DECODE_MAX_ASSIGN, DECODE_LIMIT):
                    path = "sorted"
                elif T * k <= DECODE_FUSED_MAX_ASSIGN and DECODE_KS is None:
                    path = "fused ks%d" % decode_plan(ex, T * k, k)[2]
                else:
                    path = "decode ks%dx%d u%d" % decode_plan(ex, T * k, k)[1:] + (" ring" if DECODE_RING else "")
                _set_variant("auto")
                floor = moved / bw * 1e3
                row = dict(model=model, T=T, touched_experts=touched, bytes_moved=moved, cute_us=t * 1e3,
                           floor_us=floor * 1e3, ratio_to_floor=t / floor, read_peer_us=peer,
                           ratio_to_read_peer=t * 1e3 / peer, variant=v, path=path)
                rows.append(row)
                print(f"{model:6} {T:5d} {touched:7d} {moved / 1e6:8.1f} {t * 1e3:9.1f} {floor * 1e3:8.1f} "
                      f"{t / floor:7.2f} {peer:8.1f} {t * 1e3 / peer:6.2f}  {path}", flush=True)
        del ex, one
        torch.cuda.empty_cache()
    return rows
