"""CuTe DSL ops for Hopper: NVFP4 and FP8 linear layers and routed experts through dsv4_kernels, everything else
TorchOps.

Weights
- NVFP4 linear weights (N % 16 == 0, K % 64 == 0) stay NVFP4 in GPU memory in the kernels' layout
  (`dsv4_kernels.nvfp4_gemm.prepare_nvfp4_weight`); others fall back to TorchOps' dense weight.
- FP8-block linear weights (the checkpoint's wq_a, wq_b, wkv, wo_b, indexer wq_b, shared experts: e4m3 + 128x128
  scales) with N % 16 == 0, K % 64 == 0 and blocks that are multiples of (16, 64) stay FP8 in GPU memory
  (`dsv4_kernels.fp8_gemm.prepare_fp8_weight`, W8A16: half the bytes of BF16 at decode, same numbers as TorchOps'
  bf16 weight up to fp32 summation order for power-of-two scales). Other FP8 shapes, and every weight when
  DSV4_CUTE_FP8_LINEAR=0, get TorchOps' dense BF16 weight. Nothing is requantised at load (no FP8 -> NVFP4).
  wo_a (a block-diagonal projection: one row group per group of heads) comes through prepare_grouped_linear and
  runs through the same kernel with each row group reading its own K-slice of x.
- BF16 weights (compressor and indexer-weight projections) run through `dsv4_kernels.bf16_gemv` at decode, with the
  dense weight kept for prefill; LM-head-sized ones stay on the torch path.
- Projections of one input (`prepare_linear_stack`) are stacked into one FP8 or BF16 weight: one GEMV at one token.
- Routed experts: all-NVFP4 expert lists become `PackedExperts` (grouped kernel); MXFP4 experts (the official
  checkpoint) and dense ones use TorchOps until an MXFP4 path exists.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dsv4.checkpoint.formats import FP8BlockTensor, NVFP4Tensor
from dsv4.config import RopeConfig
from dsv4.ops.base import ForwardBatch
from dsv4.ops.cute_attention import CuteAttentionMixin, Launcher, chain_pdl, hoist, placeholder, unconverted
from dsv4.ops.cute_glue import CuteGlueMixin
from dsv4.ops.cute_route import CuteRouteMixin
from dsv4.ops.torch_ops import TorchOps

import dsv4_kernels  # noqa: F401  (raises ImportError where CuTe DSL is missing: select_ops then picks torch)
from dsv4_kernels.cute_utils import norm_fits
from dsv4_kernels import bf16_gemv
from dsv4_kernels.bf16_gemv import PackedBF16, bf16_kernel_ok, bf16_linear, prepare_bf16_weight
from dsv4_kernels.fp8_gemm import PackedFP8, fp8_kernel_ok, fp8_linear, prepare_fp8_weight
from dsv4_kernels.nvfp4_gemm import KCHUNK, ROWTILE, PackedNVFP4, nvfp4_linear, prepare_nvfp4_weight
from dsv4_kernels.nvfp4_moe import PackedExperts, nvfp4_moe, prepare_nvfp4_experts

Tensor = torch.Tensor
log = logging.getLogger("dsv4.ops")


def _kernel_ok(w: Any) -> bool:
    """NVFP4 linear weights the W4A16 GEMM takes."""
    if not isinstance(w, NVFP4Tensor) or w.packed.dim() != 2:
        return False
    n, k = w.shape
    return n % ROWTILE == 0 and k % KCHUNK == 0


def _fp8_kernel_ok(w: Any) -> bool:
    """FP8-block linear weights the W8A16 GEMM takes (2-D, N % 16, K % 64, blocks multiples of (16, 64))."""
    return isinstance(w, FP8BlockTensor) and fp8_kernel_ok(w)


@dataclass
class LinearStack:
    """Projections of one input as one weight (rows stacked); `sizes` are the projections' output widths, `parts`
    each projection's own weight (views of the stacked one's rows: no extra memory)."""

    weight: PackedBF16 | PackedFP8
    sizes: tuple[int, ...]
    parts: tuple[PackedBF16 | PackedFP8, ...] = ()

    @staticmethod
    def of(weight: PackedBF16 | PackedFP8, sizes: tuple[int, ...]) -> "LinearStack":
        parts, a = [], 0
        for w in sizes:
            parts.append(_row_view(weight, a, w))
            a += w
        return LinearStack(weight, sizes, tuple(parts))

    def split(self, y: Tensor) -> tuple[Tensor, ...]:
        """The stacked output [..., sum(sizes)] as the projections' outputs. For one token each piece is a compact
        slice (what the kernels after it take without a copy); for more, column views."""
        lead, n = y.shape[:-1], y.shape[-1]
        rows = y.reshape(-1, n)
        out, a = [], 0
        for w in self.sizes:
            piece = rows.view(-1)[a:a + w] if rows.shape[0] == 1 else rows[:, a:a + w]
            out.append(piece.reshape(*lead, w))
            a += w
        return tuple(out)


def _row_view(weight: PackedBF16 | PackedFP8, a: int, w: int) -> PackedBF16 | PackedFP8:
    """Rows [a, a + w) of a packed weight as a weight of its own (views; a and w whole row tiles, and for FP8
    whole scale blocks)."""
    if isinstance(weight, PackedFP8):
        bn = weight.block[0]
        return PackedFP8(codes=weight.codes[a // ROWTILE:(a + w) // ROWTILE],
                         scales=weight.scales[a // bn:(a + w) // bn], n=w, k=weight.k, block=weight.block)
    return PackedBF16(weight.codes[a // ROWTILE:(a + w) // ROWTILE], weight.scales, weight.dense[a:a + w], w,
                      weight.k)


def _fp8_stack(weights: list[Any]) -> FP8BlockTensor | None:
    """FP8-block projections of one input as one FP8BlockTensor (rows stacked), or None where they cannot be: each
    must be a weight the FP8 kernel takes, with the same K and block, and whole scale blocks of rows."""
    if not weights or not all(isinstance(w, FP8BlockTensor) and _fp8_kernel_ok(w) for w in weights):
        return None
    first = weights[0]
    bn = int(first.block[0])
    if any(tuple(w.block) != tuple(first.block) or w.shape[1] != first.shape[1] or w.shape[0] % bn
           or w.scale.shape[1] != first.scale.shape[1] or w.scale.dtype != first.scale.dtype for w in weights):
        return None
    return FP8BlockTensor(weight=torch.cat([w.weight for w in weights]), scale=torch.cat([w.scale for w in weights]),
                          block=first.block)


class CuteOps(CuteGlueMixin, CuteRouteMixin, CuteAttentionMixin, TorchOps):
    name = "cute"
    supports_cuda_graphs = True

    def __init__(self, device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 fused_glue: bool | None = None, fp8_weights: bool | None = None):
        """`fused_glue` (default on; env DSV4_CUTE_FUSED_GLUE=0 turns it off) runs the decode-glue kernels (RMSNorm,
        SwiGLU, mHC mix/collapse/post, MoE gate, MoE assignment sort, FP8 window-KV write) instead of the torch ops
        they replace; off gives the previous path for A/B runs (docs/PERF.md: 2.43 -> 1.81 ms per flash step).
        `fp8_weights` (default on; env DSV4_CUTE_FP8_LINEAR=0 turns it off) keeps FP8-block projections FP8 for the
        W8A16 GEMM; off dequantises them to BF16 at load (the previous path, for A/B runs)."""
        super().__init__(device, dtype)
        if self.device.type != "cuda":
            raise ValueError(f"CuteOps needs a CUDA device, got {self.device}")
        self.fused_glue = os.environ.get("DSV4_CUTE_FUSED_GLUE", "1") != "0" if fused_glue is None else fused_glue
        self.fp8_weights = os.environ.get("DSV4_CUTE_FP8_LINEAR", "1") != "0" if fp8_weights is None else fp8_weights
        n_side = _side_streams_setting()
        self.side_streams = [torch.cuda.Stream(self.device) for _ in range(n_side)]

    def concurrently(self, *pieces):
        """All pieces but the first on side streams (DSV4_CUTE_STREAMS of them, default 3; 0 runs the pieces one
        after the other; with fewer side streams than pieces the extra pieces share the last one), each forked from
        and joined back into the current stream (also inside CUDA-graph capture, where fork and join become graph
        edges). At decode most kernels fill a fraction of the GPU (a batch-1 layer is ~45 kernels of 1-15 us), so
        independent chains overlap: flash-layers batch-1 step -7.9 %, batch 32 -4 % (docs/PERF.md,
        session 21). A call made inside a piece that runs on side stream k forks onto the side streams after k
        only (those up to k already carry that piece's siblings, queued ahead), and runs its pieces one after the
        other where none is left. Side pieces' outputs are marked as used on the current stream (record_stream):
        the allocator must not hand their blocks back to a side stream before the current stream is done with them."""
        here = torch.cuda.current_stream(self.device)
        sides = self.side_streams
        for k, s in enumerate(self.side_streams):
            if s.cuda_stream == here.cuda_stream:
                sides = self.side_streams[k + 1:]
                break
        if not sides or len(pieces) < 2:
            return super().concurrently(*pieces)
        used = []
        out: list = [None] * len(pieces)
        for j, piece in enumerate(pieces[1:], start=1):
            side = sides[min(j, len(sides)) - 1]
            if side not in used:
                side.wait_stream(here)
                used.append(side)
            with torch.cuda.stream(side):
                out[j] = piece()
        out[0] = pieces[0]()
        for side in used:
            here.wait_stream(side)
        for r in out[1:]:
            _record_stream(r, here)
        return tuple(out)

    # --- weights ---------------------------------------------------------------------------------------------
    def prepare_linear(self, weight: Any) -> Any:
        if _kernel_ok(weight):
            return prepare_nvfp4_weight(_to(weight, self.device), self.device)
        if self.fp8_weights and _fp8_kernel_ok(weight):
            try:
                return prepare_fp8_weight(_fp8_to(weight, self.device), self.device)
            except ValueError as e:   # NaN codes / non-finite scales: TorchOps reproduces them, the kernel cannot
                log.warning("FP8 weight %s kept on the torch path: %s", tuple(weight.shape), e)
        w = super().prepare_linear(weight)
        if isinstance(weight, torch.Tensor) and self.dtype == torch.bfloat16 and bf16_kernel_ok(w):
            # the checkpoint's BF16 projections (compressors, indexer weights): a GEMV for decode, the dense weight
            # for prefill; quantised weights the kernels above cannot take stay dense as before
            return prepare_bf16_weight(w)
        return w

    def prepare_grouped_linear(self, weight: Any, groups: int) -> Any:
        if self.fp8_weights and _fp8_kernel_ok(weight):
            try:
                return prepare_fp8_weight(_fp8_to(weight, self.device), self.device, groups=groups)
            except ValueError as e:
                log.warning("FP8 grouped weight %s kept on the torch path: %s", tuple(weight.shape), e)
        return super().prepare_grouped_linear(weight, groups)

    def prepare_experts(self, w1: list[Any], w2: list[Any], w3: list[Any]) -> Any:
        if all(isinstance(t, NVFP4Tensor) for t in (*w1, *w2, *w3)):
            inter, dim = w1[0].shape
            if inter % KCHUNK == 0 and dim % KCHUNK == 0:
                return prepare_nvfp4_experts(w1, w2, w3, self.device)
        return super().prepare_experts(w1, w2, w3)

    # --- math ------------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, w: Any) -> Tensor:
        if isinstance(w, PackedNVFP4):
            y = nvfp4_linear(x.to(torch.bfloat16), w)
            return y if self.dtype == torch.bfloat16 else y.to(self.dtype)
        if isinstance(w, PackedFP8):
            y = fp8_linear(x.to(torch.bfloat16), w)
            return y if self.dtype == torch.bfloat16 else y.to(self.dtype)
        if isinstance(w, PackedBF16):
            if bf16_gemv.ENABLED:
                return bf16_linear(x.to(torch.bfloat16), w)
            return super().linear(x, w.dense)
        return super().linear(x, w)

    def prepare_linear_stack(self, weights: list[Any]) -> Any:
        """Projections of one input (a layer's wq_a and wkv; wq_b and the indexer's wq_b; a compressed layer's
        compressor and indexer projections of x): their rows stacked into one weight, so that decode runs one GEMV
        for all of them instead of one launch chain each. FP8-block weights stack into one FP8 weight, BF16 ones into
        one BF16 weight; anything else is prepared one by one, as TorchOps does."""
        if self.fp8_weights and len(weights) > 1:
            cat = _fp8_stack([_fp8_to(w, self.device) if isinstance(w, FP8BlockTensor) else w for w in weights])
            if cat is not None:
                try:
                    return LinearStack.of(prepare_fp8_weight(cat, self.device), tuple(w.shape[0] for w in weights))
                except ValueError as e:   # NaN codes / non-finite scales: each one takes prepare_linear's path
                    log.warning("FP8 weights %s not stacked: %s", [tuple(w.shape) for w in weights], e)
        if self.dtype == torch.bfloat16 and weights and all(isinstance(w, torch.Tensor) for w in weights):
            dense = [TorchOps.prepare_linear(self, w) for w in weights]
            if all(d.dtype == torch.bfloat16 and d.dim() == 2 and d.shape[1] == dense[0].shape[1] for d in dense):
                cat = torch.cat(dense)
                if bf16_kernel_ok(cat) and all(d.shape[0] % ROWTILE == 0 for d in dense):
                    return LinearStack.of(prepare_bf16_weight(cat), tuple(d.shape[0] for d in dense))
        return super().prepare_linear_stack(weights)

    def linear_stack(self, x: Tensor, stack: Any) -> tuple[Tensor, ...]:
        """One token: one GEMV over the stacked weight (flash-layers batch 1, BF16 stacks: 0.986-0.991x the layer time
        of a GEMV per projection). More: a GEMV per projection, whose outputs the kernels after it take without a copy
        (batch 8: the stacked GEMV measured 1.006-1.010x; docs/PERF.md session 27)."""
        if isinstance(stack, LinearStack):
            if x.numel() == x.shape[-1]:
                return stack.split(self.linear(x, stack.weight))
            return tuple(self.linear(x, p) for p in stack.parts)
        return super().linear_stack(x, stack)

    def lm_head(self, x: Tensor, w: Any) -> Tensor:
        if isinstance(w, PackedBF16):                     # FP32 logits from the dense head (TorchOps.lm_head)
            return super().lm_head(x, w.dense)
        if isinstance(w, (PackedNVFP4, PackedFP8)):     # a quantised head: the kernels write BF16
            return self.linear(x, w).float()
        return super().lm_head(x, w)

    def grouped_linear(self, x: Tensor, w: Any) -> Tensor:
        if isinstance(w, PackedFP8):
            y = fp8_linear(x.to(torch.bfloat16), w)
            return y if self.dtype == torch.bfloat16 else y.to(self.dtype)
        return super().grouped_linear(x, w)

    def rope_tail(self, x: Tensor, positions: Tensor, rope: RopeConfig, rope_dim: int, inverse: bool = False) -> Tensor:
        """One kernel (dsv4_kernels.rope) instead of TorchOps' ~12 launches; same fp32 math, one rounding."""
        out = self._rope(x, None, 0.0, positions, rope, rope_dim, inverse)
        return super().rope_tail(x, positions, rope, rope_dim, inverse) if out is None else out

    def norm_rope_tail(self, x: Tensor, weight: Tensor | None, eps: float, positions: Tensor, rope: RopeConfig,
                       rope_dim: int) -> Tensor:
        """The norm and the rotation in one kernel where rows are whole warps of threads (V4's 512-wide heads), with
        the bits of rms_norm then rope_tail (docs/PERF.md, session 22); otherwise those two."""
        D = x.shape[-1]
        if self.fused_glue and norm_fits(D) and (weight is None or (weight.is_cuda and weight.shape == (D,))):
            out = self._rope(x, weight, eps, positions, rope, rope_dim, False, norm=True)
            if out is not None:
                return out
        return super().norm_rope_tail(x, weight, eps, positions, rope, rope_dim)

    def _rope(self, x: Tensor, weight: Tensor | None, eps: float, positions: Tensor, rope: RopeConfig, rope_dim: int,
              inverse: bool, norm: bool = False) -> Tensor | None:
        """The RopeTail launch, or None where the kernel does not apply."""
        D = x.shape[-1]
        T = positions.shape[0]
        if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float32) and D % 8 == 0 and rope_dim % 8 == 0
                and T and x.numel() % (T * D) == 0 and positions.dtype == torch.long):
            return None
        x2 = x.reshape(-1, D)
        x2 = x2 if x2.is_contiguous() else x2.contiguous()
        pos = positions if positions.is_contiguous() else positions.contiguous()
        cos, sin = self.rope_table(rope, rope_dim, pos)
        if weight is None:
            w = placeholder((8,), torch.float32, x.device)
        else:
            w = weight if weight.dtype == torch.float32 and weight.is_contiguous() else weight.float().contiguous()
        kind = "none" if not norm else ("plain" if weight is None else "weight")
        out = torch.empty_like(x2)
        args = (x2, pos, cos, sin, w, out)
        _rope_launcher(D, rope_dim, inverse, kind, float(eps), *args,
                       constant=unconverted((weight, w)))(*args, x2.shape[0] // T)
        return out.view(x.shape)

    def compress_and_store(self, kv: Tensor, score: Tensor, ape: Tensor, norm_weight: Tensor, norm_eps: float,
                           ratio: int, rope: RopeConfig, rope_dim: int, carry_kv: Tensor, carry_score: Tensor,
                           out: Tensor, block_size: int, batch: ForwardBatch) -> None:
        """Decode steps: one kernel (dsv4_kernels.compress_decode) instead of TorchOps' ~25 launches."""
        t = batch.decode
        d = out.shape[-1]
        ok_dt = (torch.bfloat16, torch.float32)
        if (t is None or not kv.is_cuda or kv.dtype not in ok_dt or score.dtype != kv.dtype or out.dtype not in ok_dt
                or d % 4 or rope_dim % 4 or (d // 4 > 32 and (d // 4) % 32) or carry_kv.dtype != torch.float32):
            return super().compress_and_store(kv, score, ape, norm_weight, norm_eps, ratio, rope, rope_dim, carry_kv,
                                              carry_score, out, block_size, batch)
        pos = batch.positions
        cos, sin = self.rope_table(rope, rope_dim, pos)
        args = (kv.contiguous(), score.contiguous(), ape.float().contiguous(), norm_weight.float().contiguous(), pos,
                t.state_slots, t.comp_block_tables, carry_kv, carry_score, cos, sin, out.view(-1, d))
        key = ("compress", d, ratio, rope_dim, block_size, norm_eps, kv.dtype, out.dtype)

        def make():
            from dsv4_kernels.compress_decode import CompressDecode
            return CompressDecode(d, ratio, rope_dim, block_size, norm_eps)
        Launcher(key, make, _COMPRESS_SPEC, list(args))(*args)

    def hc_pre(self, streams: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, iters: int,
               hc_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        x, coefficients = self.hc_pre_split(streams, fn, scale, base, norm_eps, iters, hc_eps)
        return (x, *coefficients())

    def hc_pre_split(self, streams: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, iters: int,
                     hc_eps: float, norm_weight: Tensor | None = None
                     ) -> tuple[Tensor, Callable[[], tuple[Tensor, Tensor]]]:
        """TorchOps.hc_pre in kernels (~130 launches -> 3). With `fused_glue`, and up to HC_MIX_MAX_TOKENS tokens:
        mhc_pre.HcMix (the mixes GEMV as partials per chunk), mhc_pre.HcCollapse (pre and x, and the sub-layer's
        RMSNorm where D is whole warps of threads), and, in the returned piece, mhc.HcCoefficients (post and comb:
        the Sinkhorn chain, which the model runs beside the sub-layer). Above that the mixes come from cuBLAS (HcMix
        re-reads fn per token: right for decode, wasteful for a long prefill) and everything is computed before
        returning."""
        T, n, D = streams.shape
        f32 = dict(dtype=torch.float32, device=streams.device)
        sc, bs = scale.float().contiguous(), base.float().contiguous()
        if not (self.fused_glue and 0 < T <= HC_MIX_MAX_TOKENS and streams.dtype in (torch.bfloat16, torch.float32)
                and D % 8 == 0 and fn.dtype == torch.float32):
            flat = streams.flatten(1).float()
            mixes = flat @ fn.T
            sq = flat.square().mean(-1)
            pre, post, comb = (torch.empty((T, k), **f32) for k in (n, n, n * n))
            if T:
                args = (mixes, sq, sc, bs, pre, post, comb)
                _hc_launcher(n, iters, hc_eps, norm_eps, 0, *args)(*args, 1.0)
            x = torch.einsum("tn,tnd->td", pre, streams.float()).to(streams.dtype)
            x = x if norm_weight is None else self.rms_norm(x, norm_weight, norm_eps)
            return x, lambda: (post, comb.view(T, n, n))
        from dsv4_kernels.mhc_pre import num_chunks
        K = n * D
        m = fn.shape[0]
        flat = streams.reshape(T, K)
        flat = flat if flat.is_contiguous() else flat.contiguous()
        fnc = fn if fn.is_contiguous() else fn.contiguous()
        part = torch.empty((T, num_chunks(K), m + 1), **f32)
        _mix_launcher(m, flat, fnc, part)(flat, fnc, part)
        x = torch.empty((T, D), dtype=streams.dtype, device=streams.device)
        fuse_norm = norm_weight is not None and norm_fits(D) and norm_weight.shape == (D,) and norm_weight.is_cuda
        if fuse_norm:
            nw = norm_weight if norm_weight.dtype == torch.float32 else norm_weight.float()
            nw = nw if nw.is_contiguous() else nw.contiguous()
        else:
            nw = placeholder((8,), torch.float32, streams.device)
        args = (flat, part, sc, bs, nw, x)
        own = unconverted((scale, sc), (base, bs), (norm_weight if fuse_norm else None, nw))
        _collapse_launcher(n, D, part.shape[1], hc_eps, norm_eps, fuse_norm, *args, constant=own)(*args, 1.0 / K)
        if norm_weight is not None and not fuse_norm:
            x = self.rms_norm(x, norm_weight, norm_eps)

        def coefficients() -> tuple[Tensor, Tensor]:
            pre, post, comb = (torch.empty((T, k), **f32) for k in (n, n, n * n))     # pre: HcCollapse's already
            args = (part, sc, sc, bs, pre, post, comb)          # the mean-square argument is unused here
            _hc_launcher(n, iters, hc_eps, norm_eps, part.shape[1], *args)(*args, 1.0 / K)
            return post, comb.view(T, n, n)
        return x, coefficients

    def moe(self, x: Tensor, expert_ids: Tensor, expert_weights: Tensor, experts: Any, swiglu_limit: float) -> Tensor:
        if isinstance(experts, PackedExperts):
            y = nvfp4_moe(x.to(torch.bfloat16), expert_ids, expert_weights, experts, swiglu_limit,
                          sort_kernel=self.fused_glue)
            return y.to(x.dtype)
        return super().moe(x, expert_ids, expert_weights, experts, swiglu_limit)


HC_MIX_MAX_TOKENS = 256
_HC_SPEC = (("t", False),) * 7 + (("f",),)
_COMPRESS_SPEC = (("t", True), ("t", True)) + (("t", False),) * 9 + (("t", True),)


def _hc_launcher(n: int, iters: int, eps: float, norm_eps: float, num_partials: int, *example: Tensor) -> Launcher:
    """num_partials: 0 for (mixes, mean square) inputs, else the number of HcMix partials per token."""
    from dsv4_kernels.mhc import HcCoefficients
    pdl = chain_pdl(example[0].shape[0])
    return Launcher(("mhc", n, iters, eps, norm_eps, num_partials, pdl),
                    lambda: HcCoefficients(n, iters, eps, norm_eps, num_partials > 0, num_partials, pdl), _HC_SPEC,
                    list(example) + [1.0])


def _mix_launcher(m: int, *example: Tensor) -> Launcher:
    from dsv4_kernels import mhc_pre
    pdl, prefetch = chain_pdl(example[0].shape[0]), mhc_pre.MIX_PREFETCH
    return Launcher(("hc_mix", m, example[0].dtype, pdl, prefetch), lambda: mhc_pre.HcMix(m, pdl, prefetch),
                    (("t", True), ("t", True), ("t", False)), list(example))


def _collapse_launcher(n: int, dim: int, num_partials: int, eps: float, norm_eps: float, out_norm: bool,
                       *example: Tensor, constant: bool = True) -> Launcher:
    """out_norm: x also gets the sub-layer's RMSNorm (with norm_eps, as the model's). constant: scale, base and the
    norm weight are no kernel's output in this step, so the kernel may load them before its wait."""
    from dsv4_kernels.mhc_pre import HcCollapse
    out_eps = norm_eps if out_norm else None
    pdl, early = chain_pdl(example[0].shape[0]), hoist(example[0].shape[0]) and constant
    return Launcher(("hc_collapse", n, dim, num_partials, eps, norm_eps, out_eps, example[0].dtype, pdl, early),
                    lambda: HcCollapse(n, dim, num_partials, eps, norm_eps, out_eps, pdl, early),
                    (("t", True), ("t", False), ("t", False), ("t", False), ("t", True), ("t", True), ("f",)),
                    list(example) + [1.0])


_ROPE_SPEC = (("t", True), ("t", False), ("t", False), ("t", False), ("t", True), ("t", True), ("i",))


def _rope_launcher(dim: int, rope_dim: int, inverse: bool, norm: str, eps: float, *example: Tensor,
                   constant: bool = True) -> Launcher:
    """constant: the norm weight is no kernel's output in this step, so the kernel may load it before its wait."""
    from dsv4_kernels.rope import RopeTail
    pdl, early = chain_pdl(example[1].shape[0]), hoist(example[1].shape[0]) and constant   # positions: one a token
    return Launcher(("rope", dim, rope_dim, inverse, norm, eps, example[0].dtype, pdl, early),
                    lambda: RopeTail(dim, rope_dim, inverse, norm, eps, pdl, early), _ROPE_SPEC, list(example) + [1])


def _side_streams_setting() -> int:
    raw = os.environ.get("DSV4_CUTE_STREAMS", "3")
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 0 <= n <= 4:
        from dsv4.errors import ConfigError
        raise ConfigError(f"DSV4_CUTE_STREAMS={raw!r}: the number of side streams for decode must be 0-4")
    return n


def _record_stream(x: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(x, torch.Tensor):
        x.record_stream(stream)
    elif isinstance(x, (tuple, list)):
        for t in x:
            _record_stream(t, stream)


def _to(w: NVFP4Tensor, device: torch.device) -> NVFP4Tensor:
    """Move the container to the GPU first so the re-layout runs there."""
    return NVFP4Tensor(packed=w.packed.to(device), scale=w.scale.to(device), scale_2=w.scale_2.to(device))


def _fp8_to(w: FP8BlockTensor, device: torch.device) -> FP8BlockTensor:
    """Move the container to the GPU first so the re-layout runs there."""
    return FP8BlockTensor(weight=w.weight.to(device), scale=w.scale.to(device), block=w.block)
