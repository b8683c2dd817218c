"""Decode GEMV for plain BF16 weights (the compressor and indexer projections V4 keeps in BF16), M <= 64.

Why: at decode these projections went to cuBLAS, whose M = 1 kernels (split-K GEMM plus a reduce) read a 2-8 MB
weight at ~1 TB/s, and in a CSA layer four of them run one after another on the path to the indexer and the
attention (H100 timeline, docs/PERF.md session 27).

The kernel is the FP8 decode GEMV (`fp8_gemm._Gemv`: one 16-row tile per warp, K split over the grid, fp32
partials and `_SplitReduce` where split, PDL along the decode chain) with another weight format: the weight is
re-laid at load time so that each lane's 16-byte loads are its `mma.m16n8k16` A fragments as they are, in the K
order the FP8 kernel pairs with x (for lane (g, t) and k16 step s of a chunk: rows g and g + 8, K = chunk * 64 +
t * 16 + s * 4 + {0, 1} and {2, 3}). No decode, no scale: the fp32 accumulation `acc + d * 1.0` is `acc + d`.
The dense weight is kept beside the packed one for steps of more than 64 tokens (prefill), which cuBLAS serves as
before; the packed copy costs the weight's bytes again (20 MB in a Flash CSA layer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from dsv4_kernels.fp8_gemm import KCHUNK, ROWTILE, WARPS, _Gemv, launch_gemv
from dsv4_kernels.nvfp4_gemm import GEMV_MAX_M, PackedWeight, _fake, _options, _stream_arg, _TVM_FFI
from dsv4_kernels.pdl import chain

__all__ = ["PackedBF16", "prepare_bf16_weight", "bf16_linear", "bf16_gemv_plan", "bf16_kernel_ok", "pack_bf16",
           "unpack_bf16"]

WORDS = 4            # 16-byte loads per lane per 16 x 64 chunk (2 KiB a chunk)
# Env DSV4_BF16_GEMV=0 sends these projections back to cuBLAS (the dense weight); read at every call (A/B runs).
ENABLED = os.environ.get("DSV4_BF16_GEMV", "1") != "0"
MAX_N = 16384        # larger BF16 weights (the LM head) are not decode projections: they stay on cuBLAS


@dataclass
class PackedBF16(PackedWeight):
    codes: torch.Tensor          # int32 [N/16, K/64, 4, 32, 4]: lane-ordered A fragments
    scales: torch.Tensor         # float32 [1, 1] of 1.0: the kernel's scale argument (BF16 weights have none)
    dense: torch.Tensor          # the bf16 [N, K] weight itself (steps of more than GEMV_MAX_M tokens)
    n: int
    k: int
    cache: dict = field(default_factory=dict, repr=False)


def bf16_kernel_ok(w: Any) -> bool:
    """A 2-D BF16 weight the kernel takes: N a multiple of 16 (row tiles) up to MAX_N, K a multiple of 64."""
    return (isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.dim() == 2
            and w.shape[0] % ROWTILE == 0 and 0 < w.shape[0] <= MAX_N and w.shape[1] % KCHUNK == 0
            and w.shape[1] > 0)


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 -> int32 [N/16, K/64, 4 (k16 step s), 32 (lane g*4+t), 4 (a0..a3)]."""
    n, k = w.shape
    v = w.contiguous().view(n // 16, 2, 8, k // 64, 4, 4, 2, 2)    # tile, half, g, chunk, t, s, pair, element
    return v.permute(0, 3, 5, 2, 4, 6, 1, 7).contiguous().view(torch.int32).view(n // 16, k // 64, 4, 32, 4)


def unpack_bf16(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_bf16 (tests)."""
    nt, nc = codes.shape[:2]
    v = codes.contiguous().view(torch.bfloat16).view(nt, nc, 4, 8, 4, 2, 2, 2)   # tile, chunk, s, g, t, p, half, e
    return v.permute(0, 6, 3, 1, 4, 2, 5, 7).contiguous().view(nt * 16, nc * 64)


def prepare_bf16_weight(w: torch.Tensor, device: torch.device | str | None = None) -> PackedBF16:
    if not bf16_kernel_ok(w):
        raise ValueError(f"prepare_bf16_weight: needs a 2-D bf16 weight with N a multiple of {ROWTILE} (<= {MAX_N}) "
                         f"and K a multiple of {KCHUNK}, got {getattr(w, 'dtype', type(w))} "
                         f"{tuple(getattr(w, 'shape', ()))}")
    dense = w.to(device) if device is not None else w
    dense = dense.contiguous()
    return PackedBF16(pack_bf16(dense), torch.ones((1, 1), dtype=torch.float32, device=dense.device), dense,
                      dense.shape[0], dense.shape[1])


class _GemvBF16(_Gemv):
    WORDS = WORDS

    def __init__(self, n: int, k: int, mt: int, splits: int, unroll: int, pdl: bool = False):
        super().__init__(n, k, mt, splits, unroll, 0, (128, 128), 1, pdl)

    def _fragments(self, wreg: cute.Tensor, u: int) -> list:
        return [(wreg[0, WORDS * u + s], wreg[1, WORDS * u + s], wreg[2, WORDS * u + s], wreg[3, WORDS * u + s])
                for s in range(4)]

    def _load(self, mW: cute.Tensor, mS: cute.Tensor, wreg: cute.Tensor, sreg: cute.Tensor, tile, srow, lane, cb):
        for u in range(self.unroll):
            for s in range(WORDS):
                cute.autovec_copy(mW[tile, cb + u, s, lane, None], wreg[None, WORDS * u + s])
            sreg[u] = Float32(1.0)


def bf16_gemv_plan(n: int, k: int, sms: int = 132) -> tuple[int, int]:
    """(splits, unroll): 4 chunks (8 KiB a warp) per unrolled iteration where K allows; K split until the grid has
    >= 2 CTAs per SM or each warp is down to one iteration."""
    nchunk = k // KCHUNK
    unroll = 4
    while nchunk % unroll:
        unroll //= 2
    iters = nchunk // unroll
    ctas = -(-(n // ROWTILE) // WARPS)
    want = max(1, -(-2 * sms // ctas))
    splits = 1
    for s in range(2, iters + 1):
        if splits >= want:
            break
        if iters % s == 0:
            splits = s
    return splits, unroll


_COMPILED: dict[tuple, Any] = {}


def compile_gemv_bf16(n: int, k: int, mt: int, splits: int, unroll: int, pdl: bool = False):
    key = ("bf16-gemv", n, k, mt, splits, unroll, pdl, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        obj = _GemvBF16(n, k, mt, splits, unroll, pdl)
        m = cute.sym_int()
        fn = cute.compile(obj.launch, _fake(Int32, (n // 16, k // 64, WORDS, 32, 4)), _fake(Float32, (1, 1), 4),
                          _fake(Int32, (m, k // 16, 8)), _fake(cutlass.BFloat16, (m, n), 2),
                          _fake(Float32, (splits, m, n), 4), Int32(1), _stream_arg(), options=_options())
        _COMPILED[key] = fn
    return fn


def _plan(pw: PackedBF16) -> tuple[int, int]:
    plan = pw.cache.get("plan")
    if plan is None:
        sms = torch.cuda.get_device_properties(pw.device).multi_processor_count if pw.device.type == "cuda" else 132
        plan = pw.cache["plan"] = bf16_gemv_plan(pw.n, pw.k, sms)
    return plan


def bf16_linear(x: torch.Tensor, pw: PackedBF16, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T, x bf16 [..., K] -> bf16 [..., N]: the GEMV up to GEMV_MAX_M rows, cuBLAS on the dense weight
    above. Asynchronous; CUDA-graph capturable once a first (eager) call compiled the kernel for its row count."""
    if x.dtype != torch.bfloat16 or x.shape[-1] != pw.k or x.device != pw.device:
        raise ValueError(f"bf16_linear: x must be bf16 [..., {pw.k}] on {pw.device}, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k)
    m = x2.shape[0]
    if m > GEMV_MAX_M or m == 0:
        y = x2 @ pw.dense.t()
        return y.view(*lead, pw.n) if out is None else out.copy_(y.view(*lead, pw.n))
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    y = torch.empty((m, pw.n), dtype=torch.bfloat16, device=x.device) if out is None else out.view(m, pw.n)
    splits, unroll = _plan(pw)
    pdl = chain(m)
    launch_gemv(compile_gemv_bf16(pw.n, pw.k, -(-m // 8), splits, unroll, pdl), pw.codes, pw.scales, x2, y, pw.n,
                splits, pdl)
    return y.view(*lead, pw.n)

