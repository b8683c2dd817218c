"""FP8-block-weight x BF16-activation GEMM (W8A16) for Hopper, written in CuTe DSL.

    y[M, N] = x[M, K] @ dequant(W)[N, K]^T          x, y bf16; W e4m3 with one fp32 scale per (bn x bk) block

DeepSeek-V4 stores every non-expert projection (attention wq_a / wq_b / wkv / wo_b, the indexer's wq_b, the shared
expert, MTP's e_proj / h_proj) as FP8 e4m3 with 128x128 block scales. This module keeps those weights FP8 in GPU
memory (1 B/weight + 4 B per 16 Ki weights of scales) and decodes them in registers, so decode reads half the bytes
of a BF16 GEMV. The structure is nvfp4_gemm.py's (read its docstring first); only the weight format differs.

Weight layout (`prepare_fp8_weight`, done once at load time; a pure byte permutation, exact)
------------------------------------------------------------------------------------------
The decode kernel computes D[n, m] = sum_k W[n, k] x[m, k] with `mma.sync.m16n8k16` (bf16, fp32 accumulate), the
weight as the 16-row A operand and the tokens as the 8-column B operand ("swap AB": M can be 1). K is walked in
chunks of 64 with nvfp4_gemm's K permutation: lane (g = lane / 4, t = lane % 4) owns K [16t, 16t + 16) of rows g and
g + 8 of the tile, and k16 step s feeds MMA columns {2t, 2t+1} with K = 16t + 4s + {0,1} and {2t+8, 2t+9} with
K = 16t + 4s + {2,3}. The activations are therefore read exactly as in nvfp4_gemm (16 contiguous bf16 per token per
chunk, x viewed as int32 [M, K/16, 8]). A lane's 32 weight bytes per chunk are two 16-byte words, one per half
h = s / 2 of the chunk, stored so that each warp-wide load reads 512 contiguous bytes:

    codes int32 [N/16, K/64, 2 (h), 32 (lane), 4 (word j)]      word j = 2 * (s % 2) + kp, s = 2h + s % 2
    word j, bytes 0..3:  (row g, K 16t+4s+2kp), (row g, K ...+1), (row g+8, K 16t+4s+2kp), (row g+8, K ...+1)

so bytes 0,1 of word j are A-fragment slot 2kp (row g) and bytes 2,3 slot 2kp + 1 (row g + 8), each pair in
register order (low half = lower K). The bytes are the checkpoint's e4m3 bytes, untouched.

Scales: float32 [ceil(N/bn), ceil(K/bk)] (UE8M0 / fp32 / bf16 checkpoint scales converted to fp32 once). With
bn % 16 == 0 and bk % 64 == 0 a scale is uniform over a whole 16-row tile x 64-K chunk, so every lane of a warp reads
the same scale per chunk (one broadcast load). Ragged edge blocks (N or K not a multiple of 128) are fine.

Numerics
--------
Decode of one u32 (4 e4m3 bytes) into two bf16x2 A registers, integer ops only (a cvt would run at 16/clk/SM and
make the kernel ALU-bound):

    prmt.b32 u, w, 0, 0x9180            halves [sign(b0) x 8 | b0], [sign(b1) x 8 | b1] (bytes 2,3: 0xB3A2)
    shl.b32 u, u, 4 ; and.b32 u, u, 0x87F087F0      -> sign at bit 15, e4m3 exponent + mantissa at bits 10:4

which is the bf16 bit pattern of e4m3 * 2^-120 (e4m3 subnormals become bf16 subnormals, still exact). One
`fma.rn.bf16x2` by the constant 2^120 then gives the exact e4m3 value as a normal bf16 (every e4m3 value is a bf16
value). So the A operand is the checkpoint's FP8 value exactly, and the MMA products fp8 * x are exact in fp32.

Scales: each 64-K chunk's four MMAs accumulate into a zeroed fp32 chunk accumulator, which is then added into the
running sum with one `fma.rn.f32` by the chunk's fp32 scale:

    y[m, n] = bf16( sum_chunks scale(n, chunk) * sum_{k in chunk} fp8[n, k] * x[m, k] )         (fp32 throughout)

The alternative, multiplying the bf16 pair by bf16(scale * 2^120) in the decode fma, is exact only for power-of-two
scales; the chunk form is exact-per-product for *any* fp32 scale (HF checkpoints carry fp32 `weight_scale_inv`) and
costs 4 FFMA per 16x8 tile per 64 K, nothing next to the decode. The reference (TorchOps) computes
F.linear(x, W_bf16) with W_bf16 = bf16(fp32(fp8) * scale):
* power-of-two scales (our checkpoints: UE8M0): fp8 * scale is exact in bf16 (for any scale >= 2^-124), so kernel
  and reference sum the very same exact fp32 products (the kernel's chunk scaling by 2^e is exact too); they differ
  only in fp32 summation order, then each rounds y to bf16 once.
* other fp32 scales: the reference rounds each weight to bf16 (relative error <= 2^-9 per weight); the kernel does
  not, so it is closer to the FP8 model than the reference, and the two differ by that weight rounding.
The prefill dequant kernel computes bf16(fp32(fp8) * scale) with one `mul.rn.f32` and `cvt.rn.bf16x2.f32`: the same
two roundings as torch's dequantize + .to(bfloat16), so it is bit-equal to torch's BF16 weight for every scale.

Regimes
-------
* M <= 64 ("decode"): `_Gemv`: 4 warps per CTA, one 16-row tile per warp, K split over the grid's y dimension so
  that even N = 512 fills the GPU; a lane issues the loads of `unroll` chunks (2 x 16 B each) before using them
  (8 on splits of >= 16 chunks, else 2: H100 sweep, docs/PERF.md session 16).
  The plan (splits, unroll, prefetch) comes from `fp8_gemv_plan` (or pw.cache["plan"]). ptxas sinks loads towards
  their use to stay at ~32-40 registers (sm_90a SASS of the M = 1 kernel: 2-3 of the 4 weight loads of an unroll-2
  iteration are issued ahead), so the bytes in flight come mostly from the number of resident warps; `prefetch` > 0
  adds a bulk L2 prefetch (`cp.async.bulk.prefetch.L2`, one per warp and iteration, no registers) that many
  iterations ahead, an option to measure (`PREFETCH`, default off: slower in every plan tried on the H100). With more
  than one K split the kernel writes FP32 partials and nvfp4_gemm's `_SplitReduce` sums them (fixed order:
  deterministic). A grouped weight (`groups` > 1, V4's wo_a) is the same kernel with each row group's tiles
  reading their own K-slice of x. In decode's PDL chain (dsv4_kernels.pdl, steps of up to 8 tokens) the kernel is
  launched while its predecessor runs: a lane's first unrolled iteration of weights and scales is loaded before
  griddepcontrol.wait (all of them before ACQBULK in the sm_90a SASS, 128 registers), x after it. The grouped
  kernel (wo_a, launched during the attention) is compiled for 4 CTAs an SM so that all its CTAs are resident
  (`gemv_min_ctas`), and its plan loads a warp's whole split before the wait (`fp8_gemv_plan`'s `ahead`).
* M > 64 ("prefill"): `_Dequant` writes BF16 row blocks of a reusable workspace (bit-equal to torch's BF16 weight)
  and cuBLAS multiplies.

Shapes: N % 16 == 0 and K % 64 == 0 (`fp8_shape_problem` says why not; the caller keeps the torch path then). All
launches are asynchronous on the current torch stream and compile once per shape key (`warmup`, or the first call);
nothing here synchronises with the host, so the forward can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv4_kernels.nvfp4_gemm import (GEMV_MAX_M, _bf16x2_to_f32, _call, _f32x2_to_bf16x2, _fake, _mma_bf16,
                                     _options, _stream_arg, compile_split_reduce)
from dsv4_kernels.nvfp4_gemm import (_TVM_FFI, DEQUANT_WORKSPACE_ELEMS, PackedWeight, dequant_matmul,
                                     gemm_workspace)
from dsv4_kernels.pdl import chain

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64, Float32
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass._mlir.dialects import llvm

__all__ = ["PackedFP8", "prepare_fp8_weight", "fp8_linear", "fp8_gemv_plan", "fp8_shape_problem", "fp8_kernel_ok",
           "warmup", "dequantize_packed", "decode_reference", "unpack_to_bytes", "GEMV_MAX_M", "KCHUNK", "ROWTILE",
           "PREFETCH"]

KCHUNK = 64          # K per chunk (two 16-byte words per lane)
CHUNK_BYTES = 1024   # weight bytes of one 16-row x 64-K chunk
ROWTILE = 16         # rows per warp tile
WARPS = 4            # warps (row tiles) per CTA in the decode kernel
_BF16_2P120 = 0x7B807B80         # bf16x2 (2^120, 2^120)
_NEG_ZERO2 = 0x80008000          # bf16x2 (-0, -0): fma addend that keeps the sign of a zero product
_FP8_NAN = 0x7F                  # e4m3fn NaN is S.1111.111 (no infinities)


# ------------------------------------------------------------------------------------------------------------
# weight re-layout (torch, exact)
# ------------------------------------------------------------------------------------------------------------

@dataclass
class PackedFP8(PackedWeight):
    """An FP8-block weight [N, K] in the kernel's layout (see module docstring)."""

    codes: torch.Tensor      # int32 [N/16, K/64, 2, 32, 4]: the e4m3 bytes, permuted
    scales: torch.Tensor     # float32 [ceil(N/bn), ceil(K/bk)]
    n: int
    k: int
    block: tuple[int, int] = (128, 128)
    # > 1: a grouped (block-diagonal) projection: rows [g n/groups, (g+1) n/groups) multiply x[..., g k:(g+1) k]
    # (V4's wo_a: o [T, groups * k] -> [T, n], the einsum "tgi,gri->tgr")
    groups: int = 1
    cache: dict = field(default_factory=dict, repr=False)


def fp8_shape_problem(w: Any) -> str | None:
    """Why the kernels cannot take this weight (None: they can). Looks at shapes and dtypes only, never at data."""
    weight, scale, block = getattr(w, "weight", None), getattr(w, "scale", None), getattr(w, "block", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(scale, torch.Tensor) or block is None:
        return f"expected an FP8BlockTensor (weight, scale, block), got {type(w).__name__}"
    if weight.dtype != torch.float8_e4m3fn:
        return f"weight dtype must be torch.float8_e4m3fn, got {weight.dtype}"
    if weight.dim() != 2:
        return f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}"
    n, k = weight.shape
    bn, bk = (int(b) for b in block)
    if n % ROWTILE or k % KCHUNK:
        return f"[N={n}, K={k}]: N must be a multiple of {ROWTILE} and K of {KCHUNK}"
    if bn <= 0 or bk <= 0 or bn % ROWTILE or bk % KCHUNK:
        return (f"block {(bn, bk)}: the rows must be a multiple of {ROWTILE} and the columns of {KCHUNK}, so that "
                f"one scale covers a whole 16x64 kernel tile")
    want = (-(-n // bn), -(-k // bk))
    if tuple(scale.shape) != want:
        return f"scale shape {tuple(scale.shape)} != {want} for weight [{n}, {k}] with {bn}x{bk} blocks"
    if not (scale.is_floating_point() or scale.dtype == torch.uint8):
        return f"scale dtype {scale.dtype} is neither a float (fp32/bf16/fp16/e8m0) nor UE8M0 bytes (uint8)"
    return None


def fp8_kernel_ok(w: Any) -> bool:
    """True when prepare_fp8_weight accepts w's shapes (CuteOps' dispatch predicate)."""
    return fp8_shape_problem(w) is None


def _scale_fp32(scale: torch.Tensor) -> torch.Tensor:
    """Checkpoint block scale (fp32 / bf16 / fp16 multiplier, or UE8M0 as uint8 / float8_e8m0fnu) -> float32."""
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if scale.dtype == torch.uint8 or (e8m0 is not None and scale.dtype == e8m0):
        from dsv4.checkpoint.formats import ue8m0_to_float
        return ue8m0_to_float(scale)
    return scale.to(torch.float32)


def prepare_fp8_weight(w: Any, device: torch.device | str | None = None, groups: int = 1) -> PackedFP8:
    """FP8BlockTensor (e4m3 weight [N, K], block scale [ceil(N/bn), ceil(K/bk)]) -> PackedFP8. `groups` > 1: the
    weight is `groups` row blocks, each applied to its own K-slice of x (see PackedFP8.groups).

    Pure torch, exact (a byte permutation; scales only converted to fp32); runs on the tensors' device (use the GPU
    for big weights) and moves the result to `device`. Raises ValueError for shapes the kernels do not take (see
    `fp8_shape_problem`: the caller keeps the torch path) and for NaN codes or non-finite scales, which the
    integer decode could not reproduce.
    """
    problem = fp8_shape_problem(w)
    if problem is not None:
        kind = TypeError if problem.startswith(("expected", "weight dtype")) else ValueError
        raise kind(f"prepare_fp8_weight: {problem}")
    weight = w.weight
    n, k = weight.shape
    if groups < 1 or n % groups or (n // groups) % ROWTILE:
        raise ValueError(f"prepare_fp8_weight: {groups} groups do not split N={n} into whole {ROWTILE}-row tiles")
    bn, bk = (int(b) for b in w.block)
    dev = torch.device(device) if device is not None else weight.device
    b = weight.view(torch.uint8)
    if bool(((b & 0x7F) == _FP8_NAN).any()):
        raise ValueError("prepare_fp8_weight: the weight holds e4m3 NaN codes (0x7F / 0xFF); the checkpoint is "
                         "corrupt or not e4m3fn")
    scales = _scale_fp32(w.scale.to(weight.device))
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("prepare_fp8_weight: the block scales contain NaN/Inf")
    # [N/16, 2 (h8: row half), 8 (g), K/64 (c), 4 (t), 2 (sh = s // 2), 2 (sl = s % 2), 2 (kp), 2 (e)] with
    # row = 16 r + 8 h8 + g and K = 64 c + 16 t + 4 s + 2 kp + e  ->  [r, c, sh, g, t, sl, kp, h8, e]
    v = b.reshape(n // 16, 2, 8, k // 64, 4, 2, 2, 2, 2)
    codes = v.permute(0, 3, 5, 2, 4, 6, 7, 1, 8).reshape(n // 16, k // 64, 2, 32, 16).view(torch.int32)
    return PackedFP8(codes=codes.to(dev), scales=scales.contiguous().to(dev), n=n, k=k, block=(bn, bk),
                     groups=groups)


def unpack_to_bytes(pw: PackedFP8) -> torch.Tensor:
    """Inverse of the re-layout: -> the e4m3 bytes, uint8 [N, K]. For the CPU tests."""
    n, k = pw.n, pw.k
    v = pw.codes.contiguous().view(torch.uint8).view(n // 16, k // 64, 2, 8, 4, 2, 2, 2, 2)   # [r, c, sh, g, t, ...]
    return v.permute(0, 7, 3, 1, 4, 2, 5, 6, 8).reshape(n, k)


def decode_reference(pw: PackedFP8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense W [N, K] = fp32(fp8) * scale from the packed layout (torch's dequantisation order). For tests."""
    w = unpack_to_bytes(pw).view(torch.float8_e4m3fn).to(torch.float32)
    bn, bk = pw.block
    s = pw.scales.repeat_interleave(bn, dim=0)[: pw.n].repeat_interleave(bk, dim=1)[:, : pw.k]
    return (w * s).to(dtype)


# ------------------------------------------------------------------------------------------------------------
# device helpers (inline PTX)
# ------------------------------------------------------------------------------------------------------------

@dsl_user_op
def _decode_word(w: Int32, *, loc=None, ip=None):
    """u32 of 4 e4m3 bytes -> (bf16x2 of bytes 0,1, bf16x2 of bytes 2,3), exact values (module docstring)."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32(), T.i32()]),
        [Int32(w).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 u, v, c, nz;\n\t"
        f"mov.b32 c, {_BF16_2P120:#x};\n\tmov.b32 nz, {_NEG_ZERO2:#x};\n\t"
        "prmt.b32 u, $2, 0, 0x9180;\n\t"
        "prmt.b32 v, $2, 0, 0xB3A2;\n\t"
        "shl.b32 u, u, 4;\n\tand.b32 u, u, 0x87F087F0;\n\t"
        "shl.b32 v, v, 4;\n\tand.b32 v, v, 0x87F087F0;\n\t"
        "fma.rn.bf16x2 $0, u, c, nz;\n\t"
        "fma.rn.bf16x2 $1, v, c, nz;\n\t}",
        "=r,=r,r",
        loc=loc, ip=ip,
    )
    return (Int32(llvm.extractvalue(T.i32(), res, [0], loc=loc, ip=ip)),
            Int32(llvm.extractvalue(T.i32(), res, [1], loc=loc, ip=ip)))


@dsl_user_op
def _fma_f32(a: Float32, b: Float32, c: Float32, *, loc=None, ip=None):
    """a * b + c, one rounding, subnormals kept (whatever the DSL's fast-math defaults)."""
    return Float32(llvm.inline_asm(
        T.f32(), [Float32(v).ir_value(loc=loc, ip=ip) for v in (a, b, c)],
        "fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f", loc=loc, ip=ip))


@dsl_user_op
def _prefetch_l2(addr: Int64, nbytes: Int32, *, loc=None, ip=None):
    """Bulk prefetch of [addr, addr + nbytes) into L2 (TMA unit; no registers, nothing to wait for)."""
    llvm.inline_asm(None, [Int64(addr).ir_value(loc=loc, ip=ip), Int32(nbytes).ir_value(loc=loc, ip=ip)],
                    "cp.async.bulk.prefetch.L2.global [$0], $1;", "l,r", has_side_effects=True, loc=loc, ip=ip)


@dsl_user_op
def _mul_f32(a: Float32, b: Float32, *, loc=None, ip=None):
    """a * b rounded to nearest even, subnormals kept: torch's fp32 multiply in dequantize_fp8_block."""
    return Float32(llvm.inline_asm(
        T.f32(), [Float32(v).ir_value(loc=loc, ip=ip) for v in (a, b)],
        "mul.rn.f32 $0, $1, $2;", "=f,f,f", loc=loc, ip=ip))


def _chunk_fragments(wreg, u: int):
    """The 4 k16 steps' A fragments (4 bf16x2 each) of chunk u of the lane's registers wreg[word, 2u + half]."""
    a = []
    for s in range(4):                                           # plain Python: unrolled at trace time
        h, sl = s // 2, s % 2
        lo0, hi0 = _decode_word(wreg[2 * sl, 2 * u + h])        # kp = 0: slot 0 (row g), slot 1 (row g + 8)
        lo1, hi1 = _decode_word(wreg[2 * sl + 1, 2 * u + h])    # kp = 1: slot 2, slot 3
        a.append((lo0, hi0, lo1, hi1))
    return a


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------

class _Gemv:
    """Decode GEMM: y = x @ W^T for M <= 64, K split `splits` ways (partials in fp32 when splits > 1).

    `WORDS` (16-byte weight loads per lane per chunk), `_load` and `_fragments` are what a weight format defines
    (dsv4_kernels.bf16_gemv subclasses this kernel for plain BF16 weights)."""

    WORDS = 2

    def __init__(self, n: int, k: int, mt: int, splits: int, unroll: int, prefetch: int, block: tuple[int, int],
                 groups: int = 1, pdl: bool = False, min_ctas: int = 0):
        self.n, self.k, self.mt, self.splits, self.unroll, self.prefetch = n, k, mt, splits, unroll, prefetch
        self.pdl, self.min_ctas = pdl, min_ctas
        self.group_tiles = n // groups // ROWTILE          # 16-row tiles per group (x K-slice per group)
        self.groups = groups
        self.tiles_per_sblock = block[0] // ROWTILE        # 16-row tiles per scale block row
        self.chunks_per_sblock = block[1] // KCHUNK       # 64-K chunks per scale block column
        self.nchunk = k // KCHUNK
        self.cps = self.nchunk // splits                  # chunks per split
        self.iters = self.cps // unroll
        assert self.nchunk % splits == 0 and self.cps % unroll == 0 and prefetch >= 0

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mS: cute.Tensor, mX: cute.Tensor, mY: cute.Tensor, mP: cute.Tensor,
               m_rows: Int32):
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
        wreg = cute.make_rmem_tensor((4, self.WORDS * U), Int32)    # [word, WORDS * chunk + load]
        sreg = cute.make_rmem_tensor((U,), Float32)
        xreg = cute.make_rmem_tensor((8,), Int32)
        if tile < self.n // ROWTILE:
            srow = tile // self.tiles_per_sblock
            c0 = by * self.cps
            xoff = Int32(0)
            if cutlass.const_expr(self.groups > 1):
                xoff = (tile // self.group_tiles) * (self.k // 16)     # this group's K-slice of x
            step = U * CHUNK_BYTES
            if cutlass.const_expr(self.prefetch > 0):
                # ptxas keeps only ~2 of the lane's 16-byte loads in flight (it sinks the rest to their use to stay
                # at 32 registers); a bulk L2 prefetch `prefetch` iterations ahead keeps DRAM busy without registers
                wbase = mW.iterator.toint() + Int64(tile * self.nchunk + c0) * CHUNK_BYTES   # this warp's split
                if lane == 0:
                    _prefetch_l2(wbase, Int32(min(self.prefetch, self.iters) * step))

            if cutlass.const_expr(self.pdl):
                # launched while the kernel that writes x still runs: the first iteration's weights and scales
                # depend on nothing it writes, so they are in flight before griddepcontrol.wait (dsv4_kernels.pdl)
                self._load(mW, mS, wreg, sreg, tile, srow, lane, c0)
                cute.arch.griddepcontrol_wait()
            for it in cutlass.range(self.iters):
                cb = c0 + it * U
                if cutlass.const_expr(self.prefetch > 0):
                    if lane == 0 and it + self.prefetch < self.iters:
                        _prefetch_l2(wbase + Int64(it + self.prefetch) * step, Int32(step))
                if cutlass.const_expr(self.pdl):
                    if it > 0:
                        self._load(mW, mS, wreg, sreg, tile, srow, lane, cb)
                else:
                    self._load(mW, mS, wreg, sreg, tile, srow, lane, cb)
                for u in cutlass.range_constexpr(U):
                    a = self._fragments(wreg, u)
                    kx = xoff + (cb + u) * 4 + t                   # group of 16 bf16 = 8 u32
                    for j in cutlass.range_constexpr(MT):
                        # token rows >= M are clamped: they only feed accumulator columns that are never stored
                        row = cutlass.min(j * 8 + g, m_rows - 1)
                        cute.autovec_copy(mX[row, kx, None], xreg)
                        d = (Float32(0.0), Float32(0.0), Float32(0.0), Float32(0.0))
                        for s in cutlass.range_constexpr(4):
                            d = _mma_bf16(a[s][0], a[s][1], a[s][2], a[s][3], xreg[2 * s], xreg[2 * s + 1],
                                          d[0], d[1], d[2], d[3])
                        for q in cutlass.range_constexpr(4):
                            acc[j * 4 + q] = _fma_f32(d[q], sreg[u], acc[j * 4 + q])
            if cutlass.const_expr(self.pdl):
                # the next kernel (split reduce, norm) may launch once every CTA is past its loads; at the start
                # instead, the next GEMV's CTAs would wait resident beside this one (docs/PERF.md session 26: the
                # chain's whole gain lost at batch 1)
                cute.arch.griddepcontrol_launch_dependents()
            n0 = tile * ROWTILE + g
            for j in cutlass.range_constexpr(MT):
                for q in cutlass.range_constexpr(4):
                    m = j * 8 + 2 * t + (q % 2)
                    nn = n0 + 8 * (q // 2)
                    if m < m_rows:
                        if cutlass.const_expr(self.splits == 1):
                            mY[m, nn] = acc[j * 4 + q].to(cutlass.BFloat16)
                        else:
                            mP[by, m, nn] = acc[j * 4 + q]

    def _fragments(self, wreg: cute.Tensor, u: int) -> list:
        return _chunk_fragments(wreg, u)

    def _load(self, mW: cute.Tensor, mS: cute.Tensor, wreg: cute.Tensor, sreg: cute.Tensor, tile, srow, lane, cb):
        """One unrolled iteration's weight words and chunk scales into registers (traced inline: a Python loop)."""
        for u in range(self.unroll):
            cute.autovec_copy(mW[tile, cb + u, 0, lane, None], wreg[None, 2 * u])
            cute.autovec_copy(mW[tile, cb + u, 1, lane, None], wreg[None, 2 * u + 1])
            sreg[u] = mS[srow, (cb + u) // self.chunks_per_sblock]

    @cute.jit
    def launch(self, mW: cute.Tensor, mS: cute.Tensor, mX: cute.Tensor, mY: cute.Tensor, mP: cute.Tensor,
               m_rows: Int32, stream):
        grid_x = (self.n // ROWTILE + WARPS - 1) // WARPS
        # min_ctas: ptxas keeps the registers to what that many CTAs an SM allow. The carveout is given (-1: no
        # preference, the default) because without it the DSL asks the device for its shared memory size, and CI
        # compiles without a GPU
        occupancy = dict(min_blocks_per_mp=self.min_ctas, preferred_smem_carveout=-1) if self.min_ctas else {}
        self.kernel(mW, mS, mX, mY, mP, m_rows).launch(grid=[grid_x, self.splits, 1], block=[WARPS * 32, 1, 1],
                                                       stream=stream, use_pdl=self.pdl, **occupancy)


class _Dequant:
    """PackedFP8 rows [16 tile0, 16 (tile0 + ntiles)) -> bf16 W[rows, K] = bf16(fp32(fp8) * scale), torch's order."""

    def __init__(self, k: int, block: tuple[int, int]):
        self.k = k
        self.nchunk = k // KCHUNK
        self.tiles_per_sblock = block[0] // ROWTILE
        self.chunks_per_sblock = block[1] // KCHUNK

    @cute.kernel
    def kernel(self, mW: cute.Tensor, mS: cute.Tensor, mOut: cute.Tensor, tile0: Int32, ntiles: Int32):
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
            tile = tile0 + tl
            wreg = cute.make_rmem_tensor((4, 2), Int32)
            cute.autovec_copy(mW[tile, c, 0, lane, None], wreg[None, 0])
            cute.autovec_copy(mW[tile, c, 1, lane, None], wreg[None, 1])
            sc = Float32(mS[tile // self.tiles_per_sblock, c // self.chunks_per_sblock])
            a = _chunk_fragments(wreg, 0)
            o0 = cute.make_rmem_tensor((8,), Int32)   # row g: K 16t .. 16t+15 as bf16 pairs
            o1 = cute.make_rmem_tensor((8,), Int32)   # row g+8
            for s in cutlass.range_constexpr(4):
                for q in cutlass.range_constexpr(4):
                    lo, hi = _bf16x2_to_f32(a[s][q])
                    v = _f32x2_to_bf16x2(_mul_f32(lo, sc), _mul_f32(hi, sc))
                    # slot q: row half q % 2, K pair 2 s + q // 2 of the lane's 16
                    if cutlass.const_expr(q % 2 == 0):
                        o0[2 * s + q // 2] = v
                    else:
                        o1[2 * s + q // 2] = v
            row = tl * ROWTILE + g
            kk = c * 4 + t
            cute.autovec_copy(o0, mOut[row, kk, None])
            cute.autovec_copy(o1, mOut[row + 8, kk, None])

    @cute.jit
    def launch(self, mW: cute.Tensor, mS: cute.Tensor, mOut: cute.Tensor, tile0: Int32, ntiles: Int32, stream):
        total = ntiles * self.nchunk * 32
        self.kernel(mW, mS, mOut, tile0, ntiles).launch(grid=[(total + 127) // 128, 1, 1], block=[128, 1, 1],
                                                        stream=stream)


# ------------------------------------------------------------------------------------------------------------
# host side: compile cache and calls
# ------------------------------------------------------------------------------------------------------------

_COMPILED: dict[tuple, Any] = {}


def _weight_fakes(n: int, k: int, block: tuple[int, int]):
    return (_fake(Int32, (n // 16, k // 64, 2, 32, 4)),
            _fake(Float32, (-(-n // block[0]), -(-k // block[1])), 4))


def gemv_min_ctas(unroll: int, groups: int) -> int:
    """CTAs an SM the decode kernel is compiled for (0: ptxas's own register choice).

    A 16-chunk unrolled iteration holds 64 registers of weights a lane. Compiled freely, the grouped kernel (wo_a)
    took 130 registers, so 3 of its CTAs fit an SM: 396 of V4-Flash wo_a's 512 CTAs resident, the rest a second wave
    after the first, and the first iteration's loads (issued before griddepcontrol.wait, while the attention runs)
    in flight for only those 396. At 4 an SM (<= 128 registers, a 40-byte spill) all 512 fit. The ungrouped
    kernels already compile to 128 (wq_b, wo_b); asked for 4 they also spill 40 bytes, so `GROUPED_ONLY` keeps them
    as they are. Env DSV4_FP8_GEMV_MIN_CTAS (0: off)."""
    if unroll < 8 or (GROUPED_ONLY and groups == 1):
        return 0
    return MIN_CTAS_PER_SM


def compile_gemv(n: int, k: int, mt: int, splits: int, unroll: int, prefetch: int = 0,
                 block: tuple[int, int] = (128, 128), groups: int = 1, pdl: bool = False,
                 min_ctas: int | None = None):
    if min_ctas is None:
        min_ctas = gemv_min_ctas(unroll, groups)
    key = ("fp8-gemv", n, k, mt, splits, unroll, prefetch, tuple(block), groups, pdl, min_ctas, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _Gemv(n, k, mt, splits, unroll, prefetch, tuple(block), groups, pdl, min_ctas)
        m = cute.sym_int()
        fn = cute.compile(obj.launch, *_weight_fakes(n, k, block),
                          _fake(Int32, (m, groups * k // 16, 8)), _fake(cutlass.BFloat16, (m, n), 2),
                          _fake(Float32, (splits, m, n), 4), Int32(1), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


def compile_dequant(n: int, k: int, block: tuple[int, int] = (128, 128)):
    key = ("fp8-dequant", n, k, tuple(block), _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _Dequant(k, tuple(block))
        r = cute.sym_int()
        fn = cute.compile(obj.launch, *_weight_fakes(n, k, block), _fake(Int32, (r, k // 16, 8)),
                          Int32(0), Int32(1), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


# see gemv_min_ctas
MIN_CTAS_PER_SM = int(os.environ.get("DSV4_FP8_GEMV_MIN_CTAS", "4"))
GROUPED_ONLY = True
# a grouped weight's plan puts a warp's whole K split in one 8-chunk iteration (see fp8_gemv_plan's `ahead`); env
# DSV4_FP8_GROUPED_AHEAD=0: the plain rule
GROUPED_AHEAD = os.environ.get("DSV4_FP8_GROUPED_AHEAD", "1") != "0"

# L2 prefetch distance of the decode kernel in unrolled iterations (0 = off). Off until measured: the NVFP4 GEMV
# reaches 96 % of HBM without it; `dsv4 bench gemm --fmt fp8 --fp8-plans auto,8x2x2,...` compares.
PREFETCH = 0


def fp8_gemv_plan(n: int, k: int, sms: int = 132, unroll: int | None = None,
                  prefetch: int | None = None, ahead: bool = False) -> tuple[int, int, int]:
    """(splits, unroll, prefetch) of the decode kernel.

    ahead: the kernel is launched (PDL) well before its input is ready, behind a latency-bound chain (V4's wo_a,
    behind the attention): K splits of one 8-chunk iteration each, so a warp loads its whole split before
    griddepcontrol.wait, where K has at least 16 chunks. H100, a flash wo_a 8 us behind a spinning predecessor
    (scripts/gemv_pdl_probe.py, docs/PERF.md session 30): 9.5 us after it against 11.4 with 4 splits; in the layer
    1.006-1.008x faster.

    splits: K splits (grid.y), the smallest divisor of the 2-chunk iterations that gives >= 2 CTAs per SM, keeping
    >= 4 iterations per warp (the NVFP4 plan's rule; docs/PERF.md). unroll: chunks whose loads a lane issues before
    using any: 8 where a split holds >= 16 chunks, else 2 (4 x 16 B per lane, the bytes nvfp4_gemm's unroll 4
    issues). Every split is a whole number of unrolled iterations. prefetch: `PREFETCH` unless given.
    """
    nchunk = k // KCHUNK
    if ahead and unroll is None and nchunk >= 16 and nchunk % 8 == 0:
        return nchunk // 8, 8, PREFETCH if prefetch is None else prefetch
    auto_unroll = unroll is None
    if unroll is None:
        unroll = 2 if nchunk % 2 == 0 else 1
    if unroll < 1 or nchunk % unroll:
        raise ValueError(f"fp8_gemv_plan: unroll {unroll} does not divide the {nchunk} chunks of K={k}")
    iters = nchunk // unroll
    ctas = -(-(n // ROWTILE) // WARPS)
    want = max(1, -(-2 * sms // ctas))
    splits = 1
    for s in range(2, iters + 1):
        if splits >= want or iters // s < 4:
            break
        if iters % s == 0:
            splits = s
    cps = nchunk // splits
    if auto_unroll and cps >= 16 and cps % 8 == 0:
        # long splits: 8 chunks' loads per lane before the first use. H100, cold L2, M = 1 (docs/PERF.md session
        # 16): flash wq_b 15.7 -> 14.1 us (73 -> 81 % HBM), wo_b 17.5 -> 15.8 us; shorter splits were slower with it
        unroll = 8
    return splits, unroll, PREFETCH if prefetch is None else prefetch


def _plan(pw: PackedFP8) -> tuple[int, int, int]:
    """The weight's plan (pw.cache["plan"]; tests and the bench may set it), validated once per call (host only)."""
    plan = pw.cache.get("plan")
    if plan is None:
        sms = torch.cuda.get_device_properties(pw.device).multi_processor_count if pw.device.type == "cuda" else 132
        # a grouped weight is V4's wo_a, which the split combine lets launch at its start, during the attention
        plan = fp8_gemv_plan(pw.n, pw.k, sms, ahead=pw.groups > 1 and GROUPED_AHEAD)
        pw.cache["plan"] = plan
    splits, unroll, prefetch = plan
    nchunk = pw.k // KCHUNK
    if splits < 1 or unroll < 1 or prefetch < 0 or nchunk % (splits * unroll):
        raise ValueError(f"fp8_linear: plan (splits={splits}, unroll={unroll}, prefetch={prefetch}) must split the "
                         f"{nchunk} chunks of K={pw.k} into whole unrolled iterations")
    return splits, unroll, prefetch


def _check(x: torch.Tensor, pw: PackedFP8) -> None:
    if not isinstance(pw, PackedFP8):
        raise TypeError(f"fp8_linear: weight must be a PackedFP8 (prepare_fp8_weight), got {type(pw).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fp8_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"fp8_linear: x must be bfloat16, got {x.dtype}")
    if x.device.type != "cuda" or x.device != pw.device:
        raise ValueError(f"fp8_linear: x on {x.device}, weight on {pw.device}; both must be on the same GPU")
    if x.dim() < 1 or x.shape[-1] != pw.k * pw.groups:
        what = f"[N={pw.n}, K={pw.k}]" if pw.groups == 1 else f"{pw.groups} groups of [{pw.n // pw.groups}, {pw.k}]"
        raise ValueError(f"fp8_linear: x has shape {tuple(x.shape)}, weight is {what} (x needs "
                         f"{pw.k * pw.groups} features)")


def _output(out: torch.Tensor | None, m: int, pw: PackedFP8, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty((m, pw.n), dtype=torch.bfloat16, device=x.device)
    if out.dtype != torch.bfloat16 or out.device != x.device:
        raise TypeError(f"fp8_linear: out must be bfloat16 on {x.device}, got {out.dtype} on {out.device}")
    if out.numel() != m * pw.n or out.shape[-1] != pw.n or not out.is_contiguous():
        raise ValueError(f"fp8_linear: out must be a contiguous [..., {pw.n}] tensor of {m} rows, got "
                         f"{tuple(out.shape)} (contiguous={out.is_contiguous()})")
    return out.view(m, pw.n)




def _gemv(x2: torch.Tensor, pw: PackedFP8, y: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """-> the fp32 split partials [splits, m, n] (y written only where splits == 1 or `reduce`)."""
    m = x2.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"fp8_linear: the decode kernel takes M <= {GEMV_MAX_M}, got {m}")
    splits, unroll, prefetch = _plan(pw)
    pdl = chain(m)
    fn = compile_gemv(pw.n, pw.k, -(-m // 8), splits, unroll, prefetch, pw.block, pw.groups, pdl)
    return launch_gemv(fn, pw.codes, pw.scales, x2, y, pw.n, splits, pdl, reduce)


def launch_gemv(fn, codes: torch.Tensor, scales: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, n: int,
                splits: int, pdl: bool, reduce: bool = True) -> torch.Tensor:
    """One compiled decode GEMV (`fn`, this module's or bf16_gemv's) on x2 [m, K] bf16 and, where it splits K and
    `reduce`, the split reduce into y -> the fp32 partials [splits, m, n] (the stream's scratch buffer; unused with
    one split)."""
    m = x2.shape[0]
    part = gemm_workspace("part", splits * m * n, torch.float32, x2.device).view(splits, m, n)
    _call(fn, codes, scales, x2.view(torch.int32).view(m, -1, 8), y, part, m)
    if splits > 1 and reduce:
        _call(compile_split_reduce(n, splits, pdl), part, y, m * n, 1.0)
    return part


def fp8_gemv_partials(x: torch.Tensor, pw: PackedFP8) -> torch.Tensor | None:
    """The decode GEMV of x [m, K] (bf16, contiguous) without its split reduce -> the fp32 partials [splits, m, n]
    whose sum in split order, rounded to bf16, is fp8_linear's y; None where fp8_linear would not take that path
    (more than GEMV_MAX_M rows, a grouped weight, one split). The partials live in the stream's scratch buffer:
    read them before the next GEMM on this stream."""
    _check(x, pw)
    m = x.shape[0]
    if (x.dim() != 2 or not 0 < m <= GEMV_MAX_M or pw.groups != 1 or _plan(pw)[0] < 2 or not x.is_contiguous()
            or x.data_ptr() % 16):
        return None
    return _gemv(x, pw, gemm_workspace("unused_y", m * pw.n, torch.bfloat16, x.device).view(m, pw.n), reduce=False)


def _dequant_matmul(x2: torch.Tensor, pw: PackedFP8, y: torch.Tensor) -> None:
    fn = compile_dequant(pw.n, pw.k, pw.block)
    if pw.groups > 1:
        _dequant_grouped(x2, pw, y, fn)
        return
    dequant_matmul(x2, y, pw.n, pw.k, lambda buf, t0, nt: _call(fn, pw.codes, pw.scales, buf, t0, nt))


def _dequant_grouped(x2: torch.Tensor, pw: PackedFP8, y: torch.Tensor, fn) -> None:
    """Grouped weight, many tokens: dequantise whole groups into the workspace, one batched matmul per pass."""
    G, R, K = pw.groups, pw.n // pw.groups, pw.k
    per = max(1, DEQUANT_WORKSPACE_ELEMS // (R * K))
    m = x2.shape[0]
    xg, yg = x2.view(m, G, K), y.view(m, G, R)
    for g0 in range(0, G, per):
        g1 = min(G, g0 + per)
        rows = (g1 - g0) * R
        wbuf = gemm_workspace("dequant", rows * K, torch.bfloat16, x2.device).view(rows, K)
        _call(fn, pw.codes, pw.scales, wbuf.view(torch.int32).view(rows, K // 16, 8), g0 * R // ROWTILE,
              rows // ROWTILE)
        yg[:, g0:g1] = torch.einsum("tgi,gri->tgr", xg[:, g0:g1], wbuf.view(g1 - g0, R, K))


def fp8_linear(x: torch.Tensor, pw: PackedFP8, out: torch.Tensor | None = None,
               force: str | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T, x bf16 [..., K] -> bf16 [..., N]. `force`: "gemv" / "dequant" to pick a path.
    Asynchronous, no host synchronisation (CUDA-graph capturable once `warmup` compiled the kernels)."""
    _check(x, pw)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k * pw.groups)
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)   # fresh allocation: contiguous and aligned
    m = x2.shape[0]
    y = _output(out, m, pw, x)
    if m == 0:
        return y.view(*lead, pw.n)
    path = force or ("gemv" if m <= GEMV_MAX_M else "dequant")
    if path == "gemv":
        _gemv(x2, pw, y)
    elif path == "dequant":
        _dequant_matmul(x2, pw, y)
    else:
        raise ValueError(f"fp8_linear: unknown path {path!r} (use 'gemv', 'dequant' or None)")
    return y.view(*lead, pw.n)


def dequantize_packed(pw: PackedFP8) -> torch.Tensor:
    """bf16 W [N, K] through the dequant kernel (bit-equal to torch's dequantize(float32).to(bfloat16))."""
    fn = compile_dequant(pw.n, pw.k, pw.block)
    w = torch.empty((pw.n, pw.k), dtype=torch.bfloat16, device=pw.device)
    _call(fn, pw.codes, pw.scales, w.view(torch.int32).view(pw.n, pw.k // 16, 8), 0, pw.n // ROWTILE)
    return w


def warmup(pw: PackedFP8, ms: list[int] | tuple[int, ...] = (1, 8, 16, 32, 64)) -> None:
    """Compile every kernel this weight will use for these M (call before CUDA-graph capture)."""
    splits, unroll, prefetch = _plan(pw)
    for m in ms:
        if 0 < m <= GEMV_MAX_M:
            compile_gemv(pw.n, pw.k, -(-m // 8), splits, unroll, prefetch, pw.block, pw.groups)
    if splits > 1:
        compile_split_reduce(pw.n, splits)
    compile_dequant(pw.n, pw.k, pw.block)
