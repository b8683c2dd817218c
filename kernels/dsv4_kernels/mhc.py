"""The mHC stream mixer's per-token coefficients in one kernel: (mixes, mean square) -> (pre, post, comb).

TorchOps computes them with ~130 tiny launches per call (20 Sinkhorn iterations of sum/add/div on a 4x4 matrix);
at decode each costs a microsecond or two even inside a CUDA graph, and there are two calls per layer. Here n*n
lanes of a warp own one token, one matrix element each; row and column sums are butterfly shuffles inside the
group. (A first version gave each token one thread: 20 unrolled iterations of 32 dependent divisions took 60 us
on H100, latency-bound.)

Per token t (m = 2n + n*n mixes, r = rsqrt(sq[t] + norm_eps), x_k = mix[t, k] * r):
    pre[i]  = sigmoid(x_i * scale[0] + base[i]) + eps
    post[i] = 2 * sigmoid(x_{n+i} * scale[1] + base[n+i])
    comb    = softmax_rows(x_{2n..} * scale[2] + base[2n..]) + eps, then columns normalised (sum + eps), then
              iters - 1 times rows, columns (Sinkhorn), in the order TorchOps.hc_pre uses.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32

LOG2_E = 1.4426950408889634
THREADS = 128


def _bfly(v, offsets, op):
    for off in offsets:
        v = op(v, cute.arch.shuffle_sync_bfly(v, offset=off, mask=-1, mask_and_clamp=31))
    return v


def _add(a, b):
    return a + b


class HcCoefficients:
    def __init__(self, n: int, iters: int, eps: float, norm_eps: float):
        if n * n not in (4, 16):
            raise ValueError(f"HcCoefficients: hc_mult must be 2 or 4 (n*n lanes per token), got {n}")
        self.n, self.iters, self.eps, self.norm_eps = n, iters, eps, norm_eps
        self.g = n * n
        self.row_offsets = tuple(1 << k for k in range((n - 1).bit_length()))          # lanes of one row
        self.col_offsets = tuple(n << k for k in range((n - 1).bit_length()))          # lanes of one column

    @cute.jit
    def __call__(self, mMix: cute.Tensor, mSq: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
                 mPre: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor, stream):
        T = cute.size(mMix.shape[0])
        per_cta = THREADS // self.g
        self.kernel(mMix, mSq, mScale, mBase, mPre, mPost, mComb).launch(
            grid=((T + per_cta - 1) // per_cta, 1, 1), block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mMix: cute.Tensor, mSq: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
               mPre: cute.Tensor, mPost: cute.Tensor, mComb: cute.Tensor):
        n, g = self.n, self.g
        eps = Float32(self.eps)
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        T = cute.size(mMix.shape[0])
        t = bidx * (THREADS // g) + tidx // g
        lane = tidx % g
        # every lane runs the shuffles; a group past the last token works on token T-1 and stores nothing
        tc = cutlass.min(t, T - 1)
        r = cute.math.rsqrt(mSq[tc] + Float32(self.norm_eps))
        if t < T:
            if lane < n:
                a = mMix[tc, lane] * r * mScale[0] + mBase[lane]
                mPre[tc, lane] = 1.0 / (1.0 + cute.math.exp2(-a * LOG2_E)) + eps
            if lane >= n:
                if lane < 2 * n:
                    b = mMix[tc, lane] * r * mScale[1] + mBase[lane]
                    mPost[tc, lane - n] = 2.0 / (1.0 + cute.math.exp2(-b * LOG2_E))
        x = mMix[tc, 2 * n + lane] * r * mScale[2] + mBase[2 * n + lane]
        mx = _bfly(x, self.row_offsets, cute.arch.fmax)
        e = cute.math.exp2((x - mx) * LOG2_E)
        c = e / _bfly(e, self.row_offsets, _add) + eps
        c = c / (_bfly(c, self.col_offsets, _add) + eps)
        for _ in cutlass.range(self.iters - 1, unroll=1):
            c = c / (_bfly(c, self.row_offsets, _add) + eps)
            c = c / (_bfly(c, self.col_offsets, _add) + eps)
        if t < T:
            mComb[tc, lane] = c
