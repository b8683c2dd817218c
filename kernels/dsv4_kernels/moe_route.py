"""The MoE gate after its matmul, in one kernel: logits [T, E] -> (expert ids [T, k] int64, weights [T, k] fp32).

TorchOps.route spends ~10 tiny launches per layer and step on this (score function, bias add, topk, gather, sum,
divide, scale). Here one warp owns one token (4 tokens per CTA); lane l holds experts l, l + 32, ... (E / 32 each,
coalesced loads). Per token t, as TorchOps.route:
    scores  = sqrt(softplus(logits)) | sigmoid(logits) | softmax(logits)     (fp32; softplus with threshold 20)
    ids     = tid2eid[token_ids[t]] (hash layers) else top-k of scores + bias, descending
    weights = scores[ids], divided by their sum unless softmax, times route_scale.
Top-k is k rounds of a warp argmax: each lane scans its own experts, then a butterfly picks the winner; the order is
(biased score descending, expert index ascending), so ties go to the lower expert index (torch.topk does not promise
an order for ties; this kernel is deterministic). Scores compare as order-preserving int32 keys of their fp32 bits:
a NaN then sorts above +inf as in torch, -0 ties with +0, and a taken expert is masked to INT_MIN, which no score
maps to. The winner's unbiased score travels with it through the butterfly, so every lane knows all k weights and
their sum without a second reduction. No shared memory, no barriers: warps past the last token leave at once.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Boolean, Float32, Int32, Int64

from dsv4_kernels.cute_utils import WARP_OFFSETS, add, butterfly, partial_sum
from dsv4_kernels import pdl as pdl_flags
from dsv4_kernels.pdl import chain_entry

WARPS = 4                         # tokens per CTA
MAX_EXPERTS = 1024                # E / 32 scores and keys per lane stay in registers
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
SOFTPLUS_THRESHOLD = 20.0         # torch.nn.functional.softplus default (beta 1)
INT_MIN = -2147483648


def supported(n_experts: int, topk: int, score_func: str) -> bool:
    return (n_experts % 32 == 0 and 32 <= n_experts <= MAX_EXPERTS and 1 <= topk <= 32
            and score_func in SCORE_FUNCS)


def _sel(cond, a, b, ty):
    return ty(cutlass.select_(cond, a, b))




class MoeRoute:
    """`num_partials` > 0: the logits come as mhc_pre.HcMix's partial sums [T, S, E + 1] (S = num_partials, the
    last column unused), summed here in a fixed order: the gate GEMV at decode without a cast and a cuBLAS launch."""

    def __init__(self, n_experts: int, topk: int, score_func: str, route_scale: float, hashed: bool,
                 num_partials: int = 0, pdl: bool = False, hoist: bool | None = None):
        if not supported(n_experts, topk, score_func) or topk > n_experts:
            raise ValueError(f"MoeRoute: unsupported E={n_experts} topk={topk} score_func={score_func!r}")
        self.e, self.k, self.func, self.scale, self.hashed = n_experts, topk, score_func, route_scale, hashed
        self.n = n_experts // 32
        self.num_partials, self.pdl = num_partials, pdl
        self.hoist = pdl_flags.HOIST if hoist is None else hoist     # see dsv4_kernels.pdl.hoist

    @cute.jit
    def __call__(self, mLogits: cute.Tensor, mBias: cute.Tensor, mTid2eid: cute.Tensor, mTokenIds: cute.Tensor,
                 mIds: cute.Tensor, mWeights: cute.Tensor, stream):
        T = cute.size(mLogits.shape[0])
        self.kernel(mLogits, mBias, mTid2eid, mTokenIds, mIds, mWeights).launch(
            grid=((T + WARPS - 1) // WARPS, 1, 1), block=[WARPS * 32, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mLogits: cute.Tensor, mBias: cute.Tensor, mTid2eid: cute.Tensor, mTokenIds: cute.Tensor,
               mIds: cute.Tensor, mWeights: cute.Tensor):
        n, k = self.n, self.k
        softmax = self.func == "softmax"
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        t = bidx * WARPS + tidx // 32
        # the bias before the wait (dsv4_kernels.pdl.hoist): not a round trip after the logits. A hash layer's
        # token id is a step input, read after it
        bias = cute.make_rmem_tensor((n,), Float32)
        early = self.hoist and not self.hashed
        if cutlass.const_expr(early):
            for j in cutlass.range_constexpr(n):
                bias[j] = mBias[lane + 32 * j]
        chain_entry(self.pdl)
        if t < cute.size(mLogits.shape[0]):          # warp-uniform: the shuffles below see full warps
            mx = Float32(0.0)
            den = Float32(1.0)
            s = cute.make_rmem_tensor((n,), Float32)
            if cutlass.const_expr(not self.hashed or softmax):
                for j in cutlass.range_constexpr(n):
                    s[j] = self._logit(mLogits, t, lane + 32 * j)
                if cutlass.const_expr(softmax):
                    mx = s[0]
                    for j in cutlass.range_constexpr(1, n):
                        mx = cute.arch.fmax(mx, s[j])
                    mx = butterfly(mx, cute.arch.fmax)
                    den = Float32(0.0)
                    for j in cutlass.range_constexpr(n):
                        s[j] = cute.math.exp(s[j] - mx)
                        den = den + s[j]
                    den = butterfly(den, add)
                    for j in cutlass.range_constexpr(n):
                        s[j] = s[j] / den
                else:
                    for j in cutlass.range_constexpr(n):
                        s[j] = self._score(s[j])
            my_id = Int64(0)
            my_w = Float32(0.0)
            total = Float32(0.0)
            if cutlass.const_expr(self.hashed):
                tok = mTokenIds[t]
                if lane < k:
                    my_id = Int64(mTid2eid[tok, lane])
                    x = self._logit(mLogits, t, my_id)
                    if cutlass.const_expr(softmax):
                        my_w = cute.math.exp(x - mx) / den
                    else:
                        my_w = self._score(x)
                total = butterfly(my_w, add)
            else:
                biased = cute.make_rmem_tensor((n,), Float32)
                for j in cutlass.range_constexpr(n):
                    if cutlass.const_expr(not early):
                        bias[j] = mBias[lane + 32 * j]
                    biased[j] = s[j] + bias[j]
                key = cute.make_rmem_tensor((n,), Int32)
                key.store(biased.load().bitcast(Int32))
                for j in cutlass.range_constexpr(n):
                    # negative floats: larger bit patterns are smaller numbers, so flip the magnitude bits; the +1
                    # makes -0 equal +0 (a tie, as torch compares) and keeps INT_MIN free to mark taken experts
                    kj = key[j]
                    key[j] = _sel(kj < 0, (kj ^ 0x7FFFFFFF) + 1, kj, Int32)
                for r in cutlass.range_constexpr(k):
                    bk = key[0]
                    bj = Int32(0)
                    bs = s[0]
                    for j in cutlass.range_constexpr(1, n):
                        better = key[j] > bk                                 # strict: the lower index stays
                        bk = _sel(better, key[j], bk, Int32)
                        bj = _sel(better, Int32(j), bj, Int32)
                        bs = _sel(better, s[j], bs, Float32)
                    bi = lane + 32 * bj
                    for off in WARP_OFFSETS:
                        ok = cute.arch.shuffle_sync_bfly(bk, offset=off, mask=-1, mask_and_clamp=31)
                        oi = cute.arch.shuffle_sync_bfly(bi, offset=off, mask=-1, mask_and_clamp=31)
                        os_ = cute.arch.shuffle_sync_bfly(bs, offset=off, mask=-1, mask_and_clamp=31)
                        better = _sel(ok == bk, oi < bi, ok > bk, Boolean)
                        bk = _sel(better, ok, bk, Int32)
                        bi = _sel(better, oi, bi, Int32)
                        bs = _sel(better, os_, bs, Float32)
                    for j in cutlass.range_constexpr(n):
                        key[j] = _sel(lane + 32 * j == bi, INT_MIN, key[j], Int32)
                    my_id = _sel(lane == r, Int64(bi), my_id, Int64)
                    my_w = _sel(lane == r, bs, my_w, Float32)
                    total = total + bs                                       # torch's order: descending
            if lane < k:
                w = my_w
                if cutlass.const_expr(not softmax):
                    w = w / total
                mIds[t, lane] = my_id
                mWeights[t, lane] = w * Float32(self.scale)

    def _logit(self, mLogits: cute.Tensor, t, e):
        if cutlass.const_expr(self.num_partials > 0):
            return partial_sum(mLogits, t, e, self.num_partials)
        return mLogits[t, e]

    def _score(self, x: Float32) -> Float32:
        if cutlass.const_expr(self.func == "sigmoid"):
            return Float32(1.0) / (Float32(1.0) + cute.math.exp(-x))
        # exp overflows to inf above ~88: log1p(inf) = inf, and that lane takes x anyway
        sp = _sel(x > Float32(SOFTPLUS_THRESHOLD), x, cute.math.log1p(cute.math.exp(x)), Float32)
        return cute.math.sqrt(sp)
