"""NVFP4-weight x BF16-activation GEMM (W4A16) for Hopper, written in CuTe DSL.

    y[M, N] = x[M, K] @ dequant(W)[N, K]^T          x, y bf16; W NVFP4 (e2m1 codes, e4m3 scale per 16 K, fp32 scale_2)

Hopper has no FP4 MMA, so the weight stays packed in memory and is decoded in registers into BF16 MMA operands.

Weight layout (`prepare_nvfp4_weight`, done once at load time)
---------------------------------------------------------------
The kernel computes D[n, m] = sum_k W[n, k] x[m, k] with `mma.sync.m16n8k16` (bf16, fp32 accumulate), the weight as
the 16-row A operand and the tokens as the 8-column B operand ("swap AB": M can be 1). K is walked in chunks of 64.
Inside a chunk, lane (g = lane / 4, t = lane % 4) owns the 16 K-values [16t, 16t + 16) -- exactly one NVFP4 scale
block -- of rows g and g + 8 of the 16-row tile. Because the MMA sums over K, a permutation of K applied to both
operands leaves the product unchanged: k16-step s of the chunk feeds MMA-k columns {2t, 2t+1} with K = 16t + 4s + {0,1}
and columns {2t+8, 2t+9} with K = 16t + 4s + {2,3}. So each lane reads its activations as 16 contiguous bf16 per token
and its weights as one 16-byte word per chunk (4 u32, one per k16 step), in A-fragment order:

    u32 word s, 8 codes:  slot 0 = row g,   K 16t+4s+{0,1}     slot 1 = row g+8, K 16t+4s+{0,1}
                          slot 2 = row g,   K 16t+4s+{2,3}     slot 3 = row g+8, K 16t+4s+{2,3}

The bits of a slot are placed so that the BF16 bit pattern of the pair falls out with a shift and a mask:
slot 0 code bits (m, e0, e1, s) at bits (6, 7, 8, 15), slot 1 at (3, 4, 5, 12), slot 2 at (0, 1, 2, 9),
slot 3 at (10, 11, 13, 14); the pair's second element at +16. With the magnitude at BF16 bits 8:6 and the sign at
bit 15 the pattern reads as e2m1 * 2^-126 (0.5 becomes a subnormal); one `fma.rn.bf16x2` by the block scale times
2^118 turns it into e2m1 * scale * 2^-8, exact in BF16 and never subnormal. The epilogue multiplies by
scale_2 * 2^8 in FP32.

Scales are re-encoded to one byte c = ((e + 9) << 3) | mantissa3 of the scale value 1.m * 2^e (every e4m3 value,
subnormals included, has e in [-9, 8]); BF16(scale * 2^118) = c * 16 + 0x7600. Lane (g, t) reads a u16 per chunk:
the codes of (row g, block t) and (row g + 8, block t). A zero scale gets code 0 and its block's codes are zeroed
(the decoded block is 0 either way); a negative scale flips the codes' sign bits instead.

Memory: codes int32 [N/16, K/64, 32, 4] (the same 0.5 B/weight as the checkpoint), scales int16 [N/16, K/64, 32].

Regimes
-------
* M <= 64 ("decode"): `_gemv` kernel above: 4 warps per CTA, one 16-row tile per warp, K split over the grid's y
  dimension so that even N = 512 fills the GPU; each lane keeps UNROLL 16-byte weight loads in flight. With more than
  one K split the kernel writes FP32 partials and a second small kernel sums them, applies scale_2 and rounds.
* M > 64 ("prefill"): the weight is decoded by `_dequant` into BF16 (N-chunks of a reusable workspace, scale_2
  folded in, so the values equal torch's dequantised BF16 weight) and multiplied by cuBLAS. A dequant-in-mainloop
  wgmma kernel is the next step (docs/PERF.md).

All launches are asynchronous, take the current torch stream, and compile once per shape key (call `warmup` or the
first call does it); nothing here synchronises with the host, so the forward can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv4_kernels.workspace import workspace

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Float32
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass._mlir.dialects import llvm

__all__ = ["PackedNVFP4", "PackedWeight", "prepare_nvfp4_weight", "unpack_to_codes", "nvfp4_linear",
           "decode_reference", "dequant_matmul", "gemm_workspace", "GEMV_MAX_M", "KCHUNK", "ROWTILE"]

KCHUNK = 64          # K per chunk (one 16-byte word per lane)
ROWTILE = 16         # rows per warp tile
WARPS = 4            # warps (row tiles) per CTA in the decode kernel
GEMV_MAX_M = 64      # up to 8 token tiles of 8
_SLOT_BITS = ((6, 7, 8, 15), (3, 4, 5, 12), (0, 1, 2, 9), (10, 11, 13, 14))   # (m, e0, e1, s) bit of each slot


# ------------------------------------------------------------------------------------------------------------
# weight re-layout (torch, exact)
# ------------------------------------------------------------------------------------------------------------

class PackedWeight:
    """What every packed weight (NVFP4 here, FP8 in fp8_gemm) offers: fields `codes`, `scales`, `n`, `k`."""

    codes: torch.Tensor
    scales: torch.Tensor
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


@dataclass
class PackedNVFP4(PackedWeight):
    """An NVFP4 weight [N, K] in the kernel's layout (see module docstring)."""

    codes: torch.Tensor      # int32 [N/16, K/64, 32, 4]
    scales: torch.Tensor     # int16 [N/16, K/64, 32]
    alpha: float             # scale_2 * 2^8, applied in the epilogue
    n: int
    k: int
    cache: dict = field(default_factory=dict, repr=False)


def _scale_codes(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e4m3 scales -> (byte code, zero mask, negative mask)."""
    s = scale.to(torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("NVFP4 weight: block scales contain NaN/Inf")
    neg = s < 0
    zero = s == 0
    a = s.abs()
    safe = torch.where(zero, torch.ones_like(a), a)
    bits = (safe * 2.0 ** 118).view(torch.int32)
    if bool(((bits & 0xFFFF) != 0).any()):
        raise ValueError("NVFP4 weight: a block scale is not an e4m3 value")
    b16 = bits >> 16
    c = (b16 - 0x7600) >> 4
    if bool(((c < 0) | (c > 255)).any()):
        raise ValueError("NVFP4 weight: a block scale is outside the e4m3 range")
    c = torch.where(zero, torch.zeros_like(c), c)
    return c.to(torch.int32), zero, neg


def prepare_nvfp4_weight(w: Any, device: torch.device | str | None = None) -> PackedNVFP4:
    """NVFP4Tensor (packed uint8 [N, K/2] low nibble first, e4m3 scale [N, K/16], fp32 scale_2) -> PackedNVFP4.

    Pure torch; runs on the tensors' device (use the GPU for big weights) and moves the result to `device`.
    """
    packed, scale, scale_2 = w.packed, w.scale, w.scale_2
    if packed.dim() != 2:
        raise ValueError(f"nvfp4 weight must be 2-D [N, K/2], got shape {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    if n % ROWTILE or k % KCHUNK:
        raise ValueError(f"nvfp4 weight [N={n}, K={k}]: N must be a multiple of {ROWTILE} and K of {KCHUNK}")
    if tuple(scale.shape) != (n, k // 16):
        raise ValueError(f"nvfp4 scale shape {tuple(scale.shape)} != {(n, k // 16)}")
    dev = torch.device(device) if device is not None else packed.device
    work = packed.device
    p = packed.view(torch.uint8).to(torch.int32)
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(n, k)              # [N, K] e2m1 codes
    sc, zero, neg = _scale_codes(scale.to(work))
    blk = lambda t: t.repeat_interleave(16, dim=1)                              # noqa: E731  [N, K/16] -> [N, K]
    codes = torch.where(blk(zero), torch.zeros_like(codes), codes)
    codes = codes ^ (blk(neg).to(torch.int32) << 3)
    # [N/16, 2 (row half h), 8 (g), K/64, 4 (t), 4 (s), 2 (pair half q), 2 (element e)]: row = 16 r + 8 h + g,
    # K = 64 c + 16 t + 4 s + 2 q + e
    c6 = codes.view(n // 16, 2, 8, k // 64, 4, 4, 2, 2)
    word = torch.zeros((n // 16, k // 64, 8, 4, 4), dtype=torch.int64, device=work)   # [r, c, g, t, s]
    for h in range(2):
        for q in range(2):
            slot = h + 2 * q
            for e in range(2):
                v = c6[:, h, :, :, :, :, q, e].permute(0, 2, 1, 3, 4).to(torch.int64)   # [r, c, g, t, s]
                for bit, pos in enumerate(_SLOT_BITS[slot]):
                    word |= ((v >> bit) & 1) << (pos + 16 * e)
    word = word.reshape(n // 16, k // 64, 32, 4)                                # lane = 4 g + t
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)
    s6 = sc.view(n // 16, 2, 8, k // 64, 4)                                     # [r, h, g, c, t]
    sw = (s6[:, 0] | (s6[:, 1] << 8)).permute(0, 2, 1, 3).reshape(n // 16, k // 64, 32)
    sw = torch.where(sw >= 2 ** 15, sw - 2 ** 16, sw).to(torch.int16)
    alpha = float(scale_2.reshape(-1)[0].float()) * 256.0
    return PackedNVFP4(codes=word.contiguous().to(dev), scales=sw.contiguous().to(dev), alpha=alpha, n=n, k=k)


def unpack_to_codes(pw: PackedNVFP4) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the re-layout: -> (e2m1 codes uint8 [N, K], scale codes int32 [N, K/16]). For the CPU tests."""
    n, k = pw.n, pw.k
    word = pw.codes.to(torch.int64) & 0xFFFFFFFF
    word = word.view(n // 16, k // 64, 8, 4, 4)
    out = torch.zeros((n // 16, 2, 8, k // 64, 4, 4, 2, 2), dtype=torch.int64, device=word.device)
    for h in range(2):
        for q in range(2):
            slot = h + 2 * q
            for e in range(2):
                v = torch.zeros_like(word)
                for bit, pos in enumerate(_SLOT_BITS[slot]):
                    v |= ((word >> (pos + 16 * e)) & 1) << bit
                out[:, h, :, :, :, :, q, e] = v.permute(0, 2, 1, 3, 4)
    codes = out.reshape(n, k).to(torch.uint8)
    sw = pw.scales.to(torch.int32) & 0xFFFF
    s6 = sw.view(n // 16, k // 64, 8, 4)
    sc = torch.stack([s6 & 0xFF, s6 >> 8], dim=1)                               # [r, h, c, g, t]
    sc = sc.permute(0, 1, 3, 2, 4).reshape(n, k // 16)
    return codes, sc


def decode_reference(pw: PackedNVFP4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense W [N, K] from the packed layout, decoded in torch the way the kernel does (bit patterns). For tests."""
    codes, sc = unpack_to_codes(pw)
    mag = (codes & 7).to(torch.int32)
    bits = (mag << 6) | ((codes.to(torch.int32) >> 3) << 15)
    v = (bits << 16).view(torch.float32) * 2.0 ** 126                          # exact e2m1
    sbits = (sc * 16 + 0x7600) << 16
    s = sbits.view(torch.float32) * 2.0 ** -118
    w = v * s.repeat_interleave(16, dim=1) * (pw.alpha / 256.0)
    return w.to(dtype)


# ------------------------------------------------------------------------------------------------------------
# device helpers (inline PTX)
# ------------------------------------------------------------------------------------------------------------

@dsl_user_op
def _scale_pair(sc: Int32, *, loc=None, ip=None):
    """u16 of two scale codes -> (bf16x2 of scale*2^118 for row g, for row g+8)."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32(), T.i32()]),
        [Int32(sc).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 a, b;\n\t"
        "prmt.b32 a, $2, 0, 0x4040;\n\t"
        "prmt.b32 b, $2, 0, 0x4141;\n\t"
        "mad.lo.u32 $0, a, 16, 0x76007600;\n\t"
        "mad.lo.u32 $1, b, 16, 0x76007600;\n\t}",
        "=r,=r,r",
        loc=loc, ip=ip,
    )
    return (Int32(llvm.extractvalue(T.i32(), res, [0], loc=loc, ip=ip)),
            Int32(llvm.extractvalue(T.i32(), res, [1], loc=loc, ip=ip)))


@dsl_user_op
def _decode_word(w: Int32, sg: Int32, sg8: Int32, *, loc=None, ip=None):
    """One u32 of 8 codes -> the 4 bf16x2 A-fragment registers (slots 0..3), scaled."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32()] * 4),
        [Int32(w).ir_value(loc=loc, ip=ip), Int32(sg).ir_value(loc=loc, ip=ip), Int32(sg8).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 t0, t1, t2, t3, u, nz;\n\t"
        "mov.b32 nz, 0x80008000;\n\t"
        "and.b32 t0, $4, 0x81C081C0;\n\t"
        "shl.b32 u, $4, 3;\n\tand.b32 t1, u, 0x81C081C0;\n\t"
        "shl.b32 u, $4, 6;\n\tand.b32 t2, u, 0x81C081C0;\n\t"
        "shr.b32 u, $4, 4;\n\tand.b32 t3, u, 0x00C000C0;\n\t"
        "shr.b32 u, $4, 5;\n\tand.b32 u, u, 0x01000100;\n\tor.b32 t3, t3, u;\n\t"
        "shl.b32 u, $4, 1;\n\tand.b32 u, u, 0x80008000;\n\tor.b32 t3, t3, u;\n\t"
        "fma.rn.bf16x2 $0, t0, $5, nz;\n\t"
        "fma.rn.bf16x2 $1, t1, $6, nz;\n\t"
        "fma.rn.bf16x2 $2, t2, $5, nz;\n\t"
        "fma.rn.bf16x2 $3, t3, $6, nz;\n\t}",
        "=r,=r,=r,=r,r,r,r",
        loc=loc, ip=ip,
    )
    return tuple(Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def _mma_bf16(a0: Int32, a1: Int32, a2: Int32, a3: Int32, b0: Int32, b1: Int32,
              c0: Float32, c1: Float32, c2: Float32, c3: Float32, *, loc=None, ip=None):
    """mma.sync m16n8k16 row.col f32 += bf16 * bf16."""
    ins = [Int32(v).ir_value(loc=loc, ip=ip) for v in (a0, a1, a2, a3, b0, b1)]
    ins += [Float32(v).ir_value(loc=loc, ip=ip) for v in (c0, c1, c2, c3)]
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.f32()] * 4),
        ins,
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3",
        loc=loc, ip=ip,
    )
    return tuple(Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def _bf16x2_to_f32(v: Int32, *, loc=None, ip=None):
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.f32()] * 2),
        [Int32(v).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 lo, hi;\n\tshl.b32 lo, $2, 16;\n\tand.b32 hi, $2, 0xFFFF0000;\n\t"
        "mov.b32 $0, lo;\n\tmov.b32 $1, hi;\n\t}",
        "=f,=f,r",
        loc=loc, ip=ip,
    )
    return (Float32(llvm.extractvalue(T.f32(), res, [0], loc=loc, ip=ip)),
            Float32(llvm.extractvalue(T.f32(), res, [1], loc=loc, ip=ip)))


@dsl_user_op
def _f32x2_to_bf16x2(a: Float32, b: Float32, *, loc=None, ip=None):
    """(a, b) -> bf16x2 with a in the low half, round to nearest even."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(b).ir_value(loc=loc, ip=ip), Float32(a).ir_value(loc=loc, ip=ip)],
        "cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", loc=loc, ip=ip))


def decode_chunk(wreg, sreg, u: int) -> list:
    """The 4 A fragments (16 K each) of chunk u of a warp's 16-row tile: codes wreg[:, u], scale pair sreg[u].
    Shared by every NVFP4 decode kernel (traced inline)."""
    sg, sg8 = _scale_pair(sreg[u])
    return [_decode_word(wreg[s, u], sg, sg8) for s in range(4)]


def mma_block(a: list, x, acc, j: int) -> None:
    """acc[4j : 4j + 4] += the tile (fragments a) times one 8-token block of x over the chunk (x: its 8 words)."""
    for s in range(4):
        d = _mma_bf16(*a[s], x[2 * s], x[2 * s + 1], acc[j * 4], acc[j * 4 + 1], acc[j * 4 + 2], acc[j * 4 + 3])
        for q in range(4):
            acc[j * 4 + q] = d[q]


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------

class _Gemv:
    """Decode GEMM: y = x @ W^T for M <= 64, K split `splits` ways (partials in fp32 when splits > 1)."""

    def __init__(self, n: int, k: int, mt: int, splits: int, unroll: int, fused: bool = False, pdl: bool = False):
        self.n, self.k, self.mt, self.splits, self.unroll = n, k, mt, splits, unroll
        self.fused = fused and splits > 1
        self.pdl = pdl
        self.nchunk = k // KCHUNK
        self.cps = self.nchunk // splits                 # chunks per split
        assert self.cps % unroll == 0

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mS: cute.Tensor, mX: cute.Tensor, mY: cute.Tensor, mP: cute.Tensor,
               mC: cute.Tensor, m_rows: Int32, alpha: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        bx, by, _ = cute.arch.block_idx()
        lane = tidx % 32
        warp = tidx // 32
        g = lane // 4
        t = lane % 4
        tile = bx * WARPS + warp
        MT = self.mt
        U = self.unroll
        acc = cute.make_rmem_tensor((MT * 4,), Float32)
        for i in cutlass.range_constexpr(MT * 4):
            acc[i] = Float32(0.0)
        wreg = cute.make_rmem_tensor((4, U), Int32)
        sreg = cute.make_rmem_tensor((U,), Int32)
        xreg = cute.make_rmem_tensor((8,), Int32)
        # token rows this lane feeds as B operand (clamped: rows >= M only affect unstored columns)
        if tile < self.n // ROWTILE:
            c0 = by * self.cps
            if cutlass.const_expr(self.pdl):
                # launched while the kernel that writes x still runs: the weights depend on nothing it writes,
                # so the first loads go out before griddepcontrol.wait; x, y and the partials come after it
                for u in cutlass.range_constexpr(U):
                    cute.autovec_copy(mW[tile, c0 + u, lane, None], wreg[None, u])
                    sreg[u] = Int32(mS[tile, c0 + u, lane])
                cute.arch.griddepcontrol_wait()
            for it in cutlass.range(self.cps // U):
                cb = c0 + it * U
                if cutlass.const_expr(self.pdl):
                    if it > 0:
                        for u in cutlass.range_constexpr(U):
                            cute.autovec_copy(mW[tile, cb + u, lane, None], wreg[None, u])
                            sreg[u] = Int32(mS[tile, cb + u, lane])
                else:
                    for u in cutlass.range_constexpr(U):
                        cute.autovec_copy(mW[tile, cb + u, lane, None], wreg[None, u])
                        sreg[u] = Int32(mS[tile, cb + u, lane])
                for u in cutlass.range_constexpr(U):
                    a = decode_chunk(wreg, sreg, u)
                    kx = (cb + u) * 4 + t                          # group of 16 bf16 = 8 u32
                    for j in cutlass.range_constexpr(MT):
                        row = cutlass.min(j * 8 + g, m_rows - 1)
                        cute.autovec_copy(mX[row, kx, None], xreg)
                        mma_block(a, xreg, acc, j)
            # PDL: the split reduce (or the next kernel) may be scheduled once every CTA is past its loads; at
            # the start instead, back-to-back GEMVs would all be resident at once, prefetching (measured slower)
            cute.arch.griddepcontrol_launch_dependents()
            n0 = tile * ROWTILE + g
            for j in cutlass.range_constexpr(MT):
                for q in cutlass.range_constexpr(4):
                    m = j * 8 + 2 * t + (q % 2)
                    nn = n0 + 8 * (q // 2)
                    if m < m_rows:
                        if cutlass.const_expr(self.splits == 1):
                            mY[m, nn] = (acc[j * 4 + q] * alpha).to(cutlass.BFloat16)
                        else:
                            mP[by, m, nn] = acc[j * 4 + q]
            if cutlass.const_expr(self.fused):
                # single-launch split-K: the last warp to finish this 16-row tile sums the partials (fixed order,
                # deterministic) and writes y; the per-tile counter is reset for the next call.
                cute.arch.fence_acq_rel_gpu()
                cute.arch.sync_warp()
                old = Int32(0)
                if lane == 0:
                    cute.arch.fence_acq_rel_gpu()
                    old = cute.arch.atomic_add(mC.iterator + tile, Int32(1), sem="acq_rel", scope="gpu")
                old = cute.arch.shuffle_sync(old, 0)
                if old == self.splits - 1:
                    cute.arch.fence_acq_rel_gpu()
                    nn = tile * ROWTILE + lane % 16
                    stride_s = m_rows * self.n
                    for r in cutlass.range((m_rows + 1 - lane // 16) // 2):
                        m = 2 * r + lane // 16
                        base = m * self.n + nn
                        tot = Float32(0.0)
                        for sp in cutlass.range_constexpr(self.splits):
                            tot = tot + cute.arch.load(mP.iterator + (base + sp * stride_s), Float32, cop="cg")
                        mY[m, nn] = (tot * alpha).to(cutlass.BFloat16)
                    if lane == 0:
                        mC[tile] = Int32(0)

    @cute.jit
    def launch(self, mW: cute.Tensor, mS: cute.Tensor, mX: cute.Tensor, mY: cute.Tensor, mP: cute.Tensor,
               mC: cute.Tensor, m_rows: Int32, alpha: Float32, stream):
        grid_x = (self.n // ROWTILE + WARPS - 1) // WARPS
        self.kernel(mW, mS, mX, mY, mP, mC, m_rows, alpha).launch(grid=[grid_x, self.splits, 1],
                                                                  block=[WARPS * 32, 1, 1], stream=stream,
                                                                  use_pdl=self.pdl)


class _SplitReduce:
    """y[m, n] = bf16(alpha * sum_s P[s, m, n])."""

    def __init__(self, n: int, splits: int, pdl: bool = False):
        self.n, self.splits, self.pdl = n, splits, pdl

    @cute.kernel
    def kernel(self, mP: cute.Tensor, mY: cute.Tensor, total: Int32, alpha: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        bx, _, _ = cute.arch.block_idx()
        i = bx * 256 + tidx
        cute.arch.griddepcontrol_launch_dependents()
        cute.arch.griddepcontrol_wait()          # P is the decode kernel's output (a no-op without PDL)
        if i < total:
            m = i // self.n
            nn = i % self.n
            s = Float32(0.0)
            for sp in cutlass.range_constexpr(self.splits):
                s = s + mP[sp, m, nn]
            mY[m, nn] = (s * alpha).to(cutlass.BFloat16)

    @cute.jit
    def launch(self, mP: cute.Tensor, mY: cute.Tensor, total: Int32, alpha: Float32, stream):
        self.kernel(mP, mY, total, alpha).launch(grid=[(total + 255) // 256, 1, 1], block=[256, 1, 1],
                                                 stream=stream, use_pdl=self.pdl)


class _Dequant:
    """PackedNVFP4 rows [row0, row0 + rows) -> bf16 W[rows, K] with alpha folded in (one rounding)."""

    def __init__(self, k: int):
        self.k = k
        self.nchunk = k // KCHUNK

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mS: cute.Tensor, mOut: cute.Tensor, tile0: Int32, ntiles: Int32,
               alpha: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        bx, _, _ = cute.arch.block_idx()
        gid = bx * 128 + tidx
        lane = gid % 32
        item = gid // 32                      # (tile, chunk) pair
        g = lane // 4
        t = lane % 4
        if item < ntiles * self.nchunk:
            tl = item // self.nchunk
            c = item % self.nchunk
            wreg = cute.make_rmem_tensor((4,), Int32)
            cute.autovec_copy(mW[tile0 + tl, c, lane, None], wreg)
            sg, sg8 = _scale_pair(Int32(mS[tile0 + tl, c, lane]))
            o0 = cute.make_rmem_tensor((8,), Int32)   # row g: K 16t .. 16t+15 as bf16 pairs
            o1 = cute.make_rmem_tensor((8,), Int32)   # row g+8
            for s in cutlass.range_constexpr(4):
                r = _decode_word(wreg[s], sg, sg8)
                for q in cutlass.range_constexpr(4):
                    lo, hi = _bf16x2_to_f32(r[q])
                    v = _f32x2_to_bf16x2(lo * alpha, hi * alpha)
                    # slot q: row half q % 2, K pair 2*s + q // 2 within the lane's 16
                    if cutlass.const_expr(q % 2 == 0):
                        o0[2 * s + q // 2] = v
                    else:
                        o1[2 * s + q // 2] = v
            row = tl * ROWTILE + g
            kk = c * 4 + t
            cute.autovec_copy(o0, mOut[row, kk, None])
            cute.autovec_copy(o1, mOut[row + 8, kk, None])

    @cute.jit
    def launch(self, mW: cute.Tensor, mS: cute.Tensor, mOut: cute.Tensor, tile0: Int32, ntiles: Int32,
               alpha: Float32, stream):
        total = ntiles * self.nchunk * 32
        self.kernel(mW, mS, mOut, tile0, ntiles, alpha).launch(grid=[(total + 127) // 128, 1, 1],
                                                               block=[128, 1, 1], stream=stream)


# ------------------------------------------------------------------------------------------------------------
# host side: compile cache and calls
# ------------------------------------------------------------------------------------------------------------

try:  # the TVM-FFI call path (~5 us host time per call instead of ~50 us through explicit DLPack)
    import tvm_ffi  # noqa: F401
    _TVM_FFI = os.environ.get("DSV4_CUTE_NO_TVM_FFI", "0") != "1"
except ImportError:  # pragma: no cover - depends on the machine
    _TVM_FFI = False

_COMPILED: dict[tuple, Any] = {}


def _fake(dtype, shape, align=16):
    order = tuple(range(len(shape) - 1, -1, -1))
    return cute.runtime.make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=align)


def _stream_arg():
    if _TVM_FFI:
        return cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.runtime.make_fake_stream()


def _options() -> str:
    return "--enable-tvm-ffi" if _TVM_FFI else ""


def compile_gemv(n: int, k: int, mt: int, splits: int, unroll: int, fused: bool = False, pdl: bool = False):
    fused = fused and splits > 1
    key = ("gemv", n, k, mt, splits, unroll, fused, pdl, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _Gemv(n, k, mt, splits, unroll, fused, pdl)
        m = cute.sym_int()
        fn = cute.compile(obj.launch,
                          _fake(Int32, (n // 16, k // 64, 32, 4)), _fake(cutlass.Int16, (n // 16, k // 64, 32), 2),
                          _fake(Int32, (m, k // 16, 8)), _fake(cutlass.BFloat16, (m, n), 2),
                          _fake(Float32, (splits, m, n), 4), _fake(Int32, (n // 16,), 4), Int32(1), Float32(1.0),
                          _stream_arg(),
                          options=_options())
        _COMPILED[key] = fn
    return fn


def compile_split_reduce(n: int, splits: int, pdl: bool = False):
    key = ("reduce", n, splits, pdl, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _SplitReduce(n, splits, pdl)
        m = cute.sym_int()
        fn = cute.compile(obj.launch, _fake(Float32, (splits, m, n), 4), _fake(cutlass.BFloat16, (m, n), 2),
                          Int32(1), Float32(1.0), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


def compile_dequant(n: int, k: int):
    key = ("dequant", n, k, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _Dequant(k)
        r = cute.sym_int()
        fn = cute.compile(obj.launch, _fake(Int32, (n // 16, k // 64, 32, 4)),
                          _fake(cutlass.Int16, (n // 16, k // 64, 32), 2), _fake(Int32, (r, k // 16, 8)),
                          Int32(0), Int32(1), Float32(1.0), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


def _call(fn, *args):
    if _TVM_FFI:
        return fn(*args)
    from cutlass.cute.runtime import from_dlpack
    import cuda.bindings.driver as cuda
    conv = [from_dlpack(a, assumed_align=16) if isinstance(a, torch.Tensor) else a for a in args]
    return fn(*conv, cuda.CUstream(torch.cuda.current_stream().cuda_stream))


# Chunks of weight loads in flight per lane where a warp's share of K is long or the grid is large; 0 = the rule
# of `gemv_unroll`. Env DSV4_GEMV_UNROLL forces a value for sweeps.
GEMV_UNROLL = int(os.environ.get("DSV4_GEMV_UNROLL", "0"))
# Programmatic dependent launch for latency-bound shapes (`gemv_pdl`): the decode kernel issues its weight loads
# before it waits for the kernel that writes x, and the split reduce is scheduled while the decode kernel runs.
# Env DSV4_GEMV_PDL=0 turns it off.
GEMV_PDL = os.environ.get("DSV4_GEMV_PDL", "1") != "0"
# One token, large weights: the cp.async-ring kernel (dsv4_kernels.nvfp4_gemv_async). Env DSV4_GEMV_RING=0 turns it off.
GEMV_RING = os.environ.get("DSV4_GEMV_RING", "1") != "0"


def gemv_plan(n: int, k: int, sms: int = 132) -> tuple[int, int]:
    """(splits, unroll) for the decode kernel: enough CTAs (>= 2 per SM) to stream the weight at HBM speed."""
    nchunk = k // KCHUNK
    unroll = 4 if nchunk % 4 == 0 else (2 if nchunk % 2 == 0 else 1)
    ctas = -(-(n // ROWTILE) // WARPS)
    want = max(1, -(-2 * sms // ctas))
    splits = 1
    for s in range(1, nchunk // unroll + 1):
        if (nchunk // unroll) % s == 0:
            splits = s
            if s >= want:
                break
    # keep >= 4 chunks per warp when splitting
    while splits > 1 and nchunk // splits < 4 * unroll and (nchunk // unroll) % (splits // 2 or 1) == 0:
        splits //= 2
    if (nchunk // unroll) % splits:
        splits = 1
    return splits, unroll


def gemv_unroll(n: int, k: int, splits: int, mt: int, base: int, sms: int = 132) -> int:
    """Chunks of weight loads in flight per lane. A warp whose split holds <= 16 chunks loads them all at once
    (one memory round trip: small weights are latency-bound) unless many CTAs of 2+ token tiles would then compete
    for registers; otherwise `base` (4). H100 sweep, docs/PERF.md session 16: flash wkv M=1 6.2 -> 3.7 us."""
    cps = k // KCHUNK // splits
    if GEMV_UNROLL:
        u = GEMV_UNROLL
        while u > 1 and cps % u:
            u //= 2
        return u
    ctas = -(-(n // ROWTILE) // WARPS) * splits
    if cps <= 16 and (mt == 1 or ctas <= sms):
        return cps
    return base


def gemv_pdl(n: int, k: int, splits: int, unroll: int, sms: int = 132) -> bool:
    """PDL where a CTA loads its whole split before the wait and the grid is small (<= 2 CTAs per SM): there it
    hides the launch and the one memory round trip (flash wkv M=1 6.1 -> 3.7 us back to back). On larger grids the
    early CTAs' loads compete with the running kernel's and it measured slower (flash wq_b M=1 5.9 -> 7.1 us, head
    M=16 133 -> 194 us; H100, docs/PERF.md session 16)."""
    ctas = -(-(n // ROWTILE) // WARPS) * splits
    return GEMV_PDL and unroll == k // KCHUNK // splits and ctas <= 2 * sms


# Single-launch split-K (the last warp per tile sums the partials) when splits * token tiles <= FUSED_MAX; otherwise
# partials + the reduce kernel. 0 = off, the default: on the H100 (2026-11-23, docs/PERF.md) the fused variant was
# 1-2 us SLOWER than two launches at every measured shape (serial fence + atomic + L2 re-read tail in one warp).
FUSED_MAX = 0


def use_fused(splits: int, mt: int) -> bool:
    return splits > 1 and splits * mt <= FUSED_MAX


def _counters(pw: "PackedNVFP4") -> torch.Tensor:
    """Per-tile arrival counters of the fused split-K (zero between calls: the last warp resets its own)."""
    c = pw.cache.get("ctr")
    if c is None:
        c = torch.zeros(pw.n // ROWTILE, dtype=torch.int32, device=pw.device)
        pw.cache["ctr"] = c
    return c


def _check(x: torch.Tensor, pw: PackedNVFP4) -> None:
    if not isinstance(pw, PackedNVFP4):
        raise TypeError(f"nvfp4_linear: weight must be a PackedNVFP4 (prepare_nvfp4_weight), got {type(pw).__name__}")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"nvfp4_linear: x must be bfloat16, got {x.dtype}")
    if x.device.type != "cuda" or x.device != pw.device:
        raise ValueError(f"nvfp4_linear: x on {x.device}, weight on {pw.device}; both must be on the same GPU")
    if x.shape[-1] != pw.k:
        raise ValueError(f"nvfp4_linear: x has K={x.shape[-1]}, weight is [N={pw.n}, K={pw.k}]")


DEQUANT_WORKSPACE_ELEMS = 1 << 27   # bf16 elements of the prefill dequant workspace (256 MiB)


def gemm_workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The GEMMs' scratch buffers (shared by the NVFP4 and FP8 paths: one stream, never in use twice at once); the
    prefill dequant buffer (up to 256 MiB, never used inside a CUDA graph) grows only to what is asked."""
    return workspace("gemm." + name, numel, dtype, device, growth=1.0 if name == "dequant" else 2.0)


def dequant_matmul(x2: torch.Tensor, y: torch.Tensor, n: int, k: int, dequant_rows) -> None:
    """y = x2 @ W^T for many tokens: W decoded into the BF16 workspace in row blocks (dequant_rows(buf, tile0,
    ntiles) writes 16-row tiles tile0 .. tile0 + ntiles as int32 [rows, k/16, 8]), each block multiplied by cuBLAS."""
    rows_per = max(ROWTILE, (DEQUANT_WORKSPACE_ELEMS // k) // ROWTILE * ROWTILE)
    for r0 in range(0, n, rows_per):
        rows = min(rows_per, n - r0)
        wbuf = gemm_workspace("dequant", rows * k, torch.bfloat16, x2.device).view(rows, k)
        dequant_rows(wbuf.view(torch.int32).view(rows, k // 16, 8), r0 // ROWTILE, rows // ROWTILE)
        if rows == n:
            torch.matmul(x2, wbuf.t(), out=y)
        else:
            y[:, r0:r0 + rows].copy_(torch.matmul(x2, wbuf.t()))


def nvfp4_linear(x: torch.Tensor, pw: PackedNVFP4, out: torch.Tensor | None = None,
                 force: str | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T, x bf16 [..., K] -> bf16 [..., N]. `force`: "gemv" / "dequant" to pick a path."""
    _check(x, pw)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k)
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = out if out is not None else torch.empty((m, pw.n), dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return y.view(*lead, pw.n)
    path = force or ("gemv" if m <= GEMV_MAX_M else "dequant")
    if path == "gemv":
        if m > GEMV_MAX_M:
            raise ValueError(f"nvfp4_linear: the decode kernel takes M <= {GEMV_MAX_M}, got {m}")
        splits, unroll = pw.cache.get("plan") or gemv_plan(pw.n, pw.k)
        pw.cache["plan"] = (splits, unroll)
        if GEMV_RING:
            from dsv4_kernels import nvfp4_gemv_async as ring
            if ring.use_ring(pw.n, pw.k, m, splits):
                fn = ring.compile_gemv_async(pw.n, pw.k, splits, ring.RING_U, ring.RING_STAGES, ring.ring_mt(m),
                                             ring.RING_PDL)
                xi = x2.view(torch.int32).view(m, pw.k // 16, 8)
                part = gemm_workspace("part", splits * m * pw.n, torch.float32, x.device).view(splits, m, pw.n)
                _call(fn, pw.codes, pw.scales, xi, y, part, m, pw.alpha)
                if splits > 1:
                    _call(compile_split_reduce(pw.n, splits, ring.RING_PDL), part, y, m * pw.n, pw.alpha)
                return y.view(*lead, pw.n)
        mt = -(-m // 8)
        fused = use_fused(splits, mt)
        unroll = gemv_unroll(pw.n, pw.k, splits, mt, unroll)
        pdl = gemv_pdl(pw.n, pw.k, splits, unroll)
        fn = compile_gemv(pw.n, pw.k, mt, splits, unroll, fused, pdl)
        xi = x2.view(torch.int32).view(m, pw.k // 16, 8)
        ctr = _counters(pw)
        if splits == 1:
            part = gemm_workspace("part", m * pw.n, torch.float32, x.device).view(1, m, pw.n)   # unused
            _call(fn, pw.codes, pw.scales, xi, y, part, ctr, m, pw.alpha)
        else:
            # partials per weight: a fused call's last warps read them while later calls may already run
            # (same stream: no), so a shared workspace is fine; counters are per weight and self-resetting
            part = gemm_workspace("part", splits * m * pw.n, torch.float32, x.device).view(splits, m, pw.n)
            _call(fn, pw.codes, pw.scales, xi, y, part, ctr, m, pw.alpha)
            if not fused:
                red = compile_split_reduce(pw.n, splits, pdl)
                _call(red, part, y, m * pw.n, pw.alpha)
    elif path == "dequant":
        fn = compile_dequant(pw.n, pw.k)
        dequant_matmul(x2, y, pw.n, pw.k, lambda buf, t0, nt: _call(fn, pw.codes, pw.scales, buf, t0, nt, pw.alpha))
    else:
        raise ValueError(f"nvfp4_linear: unknown path {path!r}")
    return y.view(*lead, pw.n)


def dequantize_packed(pw: PackedNVFP4) -> torch.Tensor:
    """bf16 W [N, K] through the dequant kernel (bit-equal to torch's bf16 dequantisation)."""
    fn = compile_dequant(pw.n, pw.k)
    w = torch.empty((pw.n, pw.k), dtype=torch.bfloat16, device=pw.device)
    _call(fn, pw.codes, pw.scales, w.view(torch.int32).view(pw.n, pw.k // 16, 8), 0, pw.n // ROWTILE,
          pw.alpha)
    return w


def warmup(pw: PackedNVFP4, ms: list[int] | tuple[int, ...] = (1, 8, 16, 32, 64)) -> None:
    """Compile every kernel this weight will use (call before CUDA-graph capture)."""
    splits, unroll = pw.cache.get("plan") or gemv_plan(pw.n, pw.k)
    pw.cache["plan"] = (splits, unroll)
    _counters(pw)
    for m in ms:
        if m <= GEMV_MAX_M:
            mt = -(-m // 8)
            u = gemv_unroll(pw.n, pw.k, splits, mt, unroll)
            pdl = gemv_pdl(pw.n, pw.k, splits, u)
            compile_gemv(pw.n, pw.k, mt, splits, u, use_fused(splits, mt), pdl)
            if splits > 1:
                compile_split_reduce(pw.n, splits, pdl)
            if GEMV_RING:
                from dsv4_kernels import nvfp4_gemv_async as ring
                if ring.use_ring(pw.n, pw.k, m, splits):
                    ring.compile_gemv_async(pw.n, pw.k, splits, ring.RING_U, ring.RING_STAGES, ring.ring_mt(m),
                                            ring.RING_PDL)
                    if splits > 1:
                        compile_split_reduce(pw.n, splits, ring.RING_PDL)
    compile_dequant(pw.n, pw.k)
