"""The mHC stream mixer's per-token coefficients in one kernel: (mixes, mean square) -> (pre, post, comb).

TorchOps computes them with ~130 tiny launches per call (20 Sinkhorn iterations of sum/add/div on a 4x4 matrix);
at decode each costs a microsecond or two even inside a CUDA graph, and there are two calls per layer. Here n*n
lanes of a warp own one token, one matrix element each; row and column sums are butterfly shuffles inside the
group. (A first version gave each token one thread: 20 unrolled iterations of 32 dependent divisions took 60 us
on H100, latency-bound.)

Inputs, two variants (`partials`):
- False: mixes [T, m] and the mean square sq [T] (cuBLAS GEMV + torch mean), r = rsqrt(sq[t] + norm_eps);
- True: part [T, S, m + 1], S partial sums per token (dsv4_kernels.mhc_pre.HcMix, one per 1024-wide chunk of the
  streams; the sq argument is unused): mix[t, k] = sum_s part[t, s, k], r = rsqrt(sum_s part[t, s, m] * inv_k +
  norm_eps). S is a compile-time constant (`num_partials`) so that the S loads of a sum are all in flight at
  once: as a run-time loop they went one L2 round trip after another, 9.6 us per call for V4-Flash's S = 16.
Per token t (m = 2n + n*n mixes, x_k = mix[t, k] * r):
    pre[i]  = sigmoid(x_i * scale[0] + base[i]) + eps
    post[i] = 2 * sigmoid(x_{n+i} * scale[1] + base[n+i])
    comb    = softmax_rows(x_{2n..} * scale[2] + base[2n..]) + eps, then columns normalised (sum + eps), then
              iters - 1 times rows, columns (Sinkhorn), in the order TorchOps.hc_pre uses.

`HcPost` (below) is the other end of the sub-layer: TorchOps.hc_post's stream update in one kernel.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from dsv4_kernels.cute_utils import add, butterfly, partial_sum
from dsv4_kernels.pdl import chain_entry

LOG2_E = 1.4426950408889634
THREADS = 128


def pre_weight(mix, r, scale0, base, eps):
    """pre[i] = sigmoid(mix_i * r * scale[0] + base[i]) + eps: shared by HcCoefficients and
    mhc_pre.HcPreCollapse, which must agree bit for bit."""
    a = mix * r * scale0 + base
    return 1.0 / (1.0 + cute.math.exp2(-a * LOG2_E)) + eps


def rms_factor(mean_square, norm_eps: float):
    return cute.math.rsqrt(mean_square + Float32(norm_eps))


class HcCoefficients:
    def __init__(self, n: int, iters: int, eps: float, norm_eps: float, partials: bool = False,
                 num_partials: int = 0, pdl: bool = False):
        if n * n not in (4, 16):
            raise ValueError(f"HcCoefficients: hc_mult must be 2 or 4 (n*n lanes per token), got {n}")
        if partials and num_partials < 1:
            raise ValueError(f"HcCoefficients: partials=True needs num_partials >= 1, got {num_partials}")
        self.n, self.iters, self.eps, self.norm_eps = n, iters, eps, norm_eps
        self.partials = partials
        self.num_partials, self.pdl = num_partials, pdl
        self.g = n * n
        self.row_offsets = tuple(1 << k for k in range((n - 1).bit_length()))          # lanes of one row
        self.col_offsets = tuple(n << k for k in range((n - 1).bit_length()))          # lanes of one column

    @cute.jit
    def __call__(self, mMix: cute.Tensor, mSq: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
                 mPre: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor, inv_k: Float32, stream):
        T = cute.size(mMix.shape[0])
        per_cta = THREADS // self.g
        self.kernel(mMix, mSq, mScale, mBase, mPre, mPost, mComb, inv_k).launch(
            grid=((T + per_cta - 1) // per_cta, 1, 1), block=[THREADS, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mMix: cute.Tensor, mSq: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
               mPre: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor, inv_k: Float32):
        chain_entry(self.pdl)
        n, g = self.n, self.g
        eps = Float32(self.eps)
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        T = cute.size(mMix.shape[0])
        t = bidx * (THREADS // g) + tidx // g
        lane = tidx % g
        # every lane runs the shuffles; a group past the last token works on token T-1 and stores nothing
        tc = cutlass.min(t, T - 1)
        r = rms_factor(self._mean_square(mMix, mSq, tc, inv_k), self.norm_eps)
        if t < T:
            if lane < n:
                mPre[tc, lane] = pre_weight(self._mix(mMix, tc, lane), r, mScale[0], mBase[lane], eps)
            if lane >= n:
                if lane < 2 * n:
                    b = self._mix(mMix, tc, lane) * r * mScale[1] + mBase[lane]
                    mPost[tc, lane - n] = 2.0 / (1.0 + cute.math.exp2(-b * LOG2_E))
        x = self._mix(mMix, tc, 2 * n + lane) * r * mScale[2] + mBase[2 * n + lane]
        mx = butterfly(x, cute.arch.fmax, self.row_offsets)
        e = cute.math.exp2((x - mx) * LOG2_E)
        c = e / butterfly(e, add, self.row_offsets) + eps
        c = c / (butterfly(c, add, self.col_offsets) + eps)
        for _ in cutlass.range(self.iters - 1, unroll=1):
            c = c / (butterfly(c, add, self.row_offsets) + eps)
            c = c / (butterfly(c, add, self.col_offsets) + eps)
        if t < T:
            mComb[tc, lane] = c

    @cute.jit
    def _mean_square(self, mMix: cute.Tensor, mSq: cute.Tensor, t, inv_k: Float32):
        if cutlass.const_expr(self.partials):
            return self._mix(mMix, t, 2 * self.n + self.g) * inv_k
        return mSq[t]

    @cute.jit
    def _mix(self, mMix: cute.Tensor, t, k):
        if cutlass.const_expr(self.partials):
            return partial_sum(mMix, t, k, self.num_partials)
        return mMix[t, k]


VEC = 8
POST_THREADS = 128


class HcPost:
    """The mHC stream update after a sub-layer: out[t, j] = post[t, j] * y[t] + sum_i comb[t, i, j] * streams[t, i].

    TorchOps.hc_post spends ~6 launches (two fp32 copies, a broadcast product, the einsum's bmm, an add, a cast);
    two calls per layer. Layout: y [T, D], streams and out [T, n, D] (bf16, or fp32 for an fp32 model), post [T, n]
    and comb [T, n * n] fp32 (row-major, comb[t, i * n + j]); D a multiple of 8. Grid (T, D / 1024): a thread owns
    one 8-channel vector of every stream (reads y's and the n streams' vectors once, writes n); the n + n*n
    coefficients of its token are broadcast loads. fp32 math, one rounding to out's dtype, as TorchOps.

    With `sum_y` the sub-layer's output comes in two parts, y = y1 + y2 (the MoE's routed and shared experts), added
    here and rounded to y1's dtype first, as TorchOps' `y1 + y2` does: one torch add kernel (and the stall of a
    launch outside the PDL chain) less per layer. Without it y2 is not read (pass y1 twice).

    With `splits` > 0, y comes as the output projection's split-K partials, fp32 [splits * T, D] (split s of token t
    in row s * T + t), summed here in split order and rounded to bf16, as the GEMV's split reduce writes y: that
    reduce kernel (one launch of the decode chain) less per layer.
    """

    def __init__(self, n: int, pdl: bool = False, sum_y: bool = False, splits: int = 0):
        if not 1 <= n <= 8:
            raise ValueError(f"HcPost: hc_mult must be in [1, 8], got {n}")
        if splits and sum_y:
            raise ValueError("HcPost: y as split partials has no second part")
        self.n, self.pdl, self.sum_y, self.splits = n, pdl, sum_y, splits

    @cute.jit
    def __call__(self, mY: cute.Tensor, mY2: cute.Tensor, mStreams: cute.Tensor, mPost: cute.Tensor,
                 mComb: cute.Tensor, mOut: cute.Tensor, stream):
        nv = cute.size(mStreams.shape[2]) // VEC
        self.kernel(mY, mY2, mStreams, mPost, mComb, mOut).launch(
            grid=(cute.size(mStreams.shape[0]), (nv + POST_THREADS - 1) // POST_THREADS, 1),
            block=[POST_THREADS, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mY: cute.Tensor, mY2: cute.Tensor, mStreams: cute.Tensor, mPost: cute.Tensor,
               mComb: cute.Tensor, mOut: cute.Tensor):
        chain_entry(self.pdl)
        n = self.n
        tidx, _, _ = cute.arch.thread_idx()
        t, c, _ = cute.arch.block_idx()
        v = c * POST_THREADS + tidx
        if v < cute.size(mStreams.shape[2]) // VEC:
            yf = cute.make_rmem_tensor((VEC,), mY.element_type)
            cute.autovec_copy(cute.local_tile(mY[t, None], (VEC,), (v,)), yf)
            y = yf.load().to(Float32)
            if cutlass.const_expr(self.splits > 0):
                # the split reduce's sum: from 0, in split order (-0.0 partials included), one rounding
                rows = cute.size(mStreams.shape[0])
                acc0 = cute.make_rmem_tensor((VEC,), Float32)
                acc0.fill(0.0)
                y = acc0.load() + y
                for sp in cutlass.range_constexpr(1, self.splits):
                    pf = cute.make_rmem_tensor((VEC,), mY.element_type)
                    cute.autovec_copy(cute.local_tile(mY[sp * rows + t, None], (VEC,), (v,)), pf)
                    y = y + pf.load().to(Float32)
                y = y.to(cutlass.BFloat16).to(Float32)
            if cutlass.const_expr(self.sum_y):
                y2f = cute.make_rmem_tensor((VEC,), mY2.element_type)
                cute.autovec_copy(cute.local_tile(mY2[t, None], (VEC,), (v,)), y2f)
                y = (y + y2f.load().to(Float32)).to(mY.element_type).to(Float32)
            xs = []
            for i in cutlass.range_constexpr(n):
                f = cute.make_rmem_tensor((VEC,), mStreams.element_type)
                cute.autovec_copy(cute.local_tile(mStreams[t, i, None], (VEC,), (v,)), f)
                xs.append(f.load().to(Float32))
            o = cute.make_rmem_tensor((VEC,), mOut.element_type)
            for j in cutlass.range_constexpr(n):
                acc = y * mPost[t, j]
                for i in cutlass.range_constexpr(n):
                    acc = acc + xs[i] * mComb[t, i * n + j]
                o.store(acc.to(mOut.element_type))
                cute.autovec_copy(o, cute.local_tile(mOut[t, j, None], (VEC,), (v,)))
