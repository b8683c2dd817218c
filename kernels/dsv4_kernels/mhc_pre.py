"""The two streaming halves of the mHC pre-mix at decode: the mixes GEMV and the stream collapse.

TorchOps.hc_pre spends ~10 launches per call around the coefficient kernel (dsv4_kernels.mhc): a bf16->fp32 copy of
the streams, the [T, n*D] x [n*D, m] fp32 GEMV, square + mean for the RMS factor, a second fp32 copy and a bmm for
the weighted sum, a cast back. Two calls per layer. Here:

- `HcMix`: partial mixes and partial sum of squares of the raw (bf16) streams, grid (K chunks of 1024, tokens,
  groups of GROUP outputs), 128 threads x 8 elements per chunk, GROUP fp32 accumulators per thread, CTA reduction
  by butterfly shuffles and shared memory. Writes part[t, chunk, 0..m-1] = sum_k x[k] fn[j, k] and
  part[t, chunk, m] = sum_k x[k]^2 over the chunk; the coefficient kernel sums the (K / 1024) partials of its
  token, deterministically. fn (m x n*D fp32, 1.5 MB for V4-Flash) is read once per token from L2 after the first;
  meant for decode-sized batches. The output groups are there for batch 1: with all m + 1 outputs in one CTA, V4-
  Flash's 16 chunks were 16 CTAs pulling 96 KB of fn each, 7.8 us on H100 (one fifth of the SMs' bandwidth).
- `HcCollapse`: x[t, d] = sum_i pre[t, i] * streams[t, i, d], with pre computed in the kernel from HcMix's
  partials.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32

from dsv4_kernels.cute_utils import add, butterfly, load_norm_weight, norm_fits, partial_sum, rms_normalize
from dsv4_kernels.mhc import pre_weight, rms_factor
from dsv4_kernels import pdl as pdl_flags
from dsv4_kernels.pdl import chain_entry

VEC = 8
THREADS = 128
CHUNK = THREADS * VEC
WARPS = THREADS // 32
GROUP = 4            # outputs (mixes or the sum of squares) per CTA


# In the PDL chain, HcMix loads its fn rows before griddepcontrol.wait (off: after it, for A/B runs:
# scripts/decode_ab.py two_mix_late).
MIX_PREFETCH = True


def num_chunks(k: int) -> int:
    return (k + CHUNK - 1) // CHUNK


class HcMix:
    def __init__(self, m: int, pdl: bool = False, prefetch: bool = True):
        """pdl: launched as a programmatic dependent (dsv4_kernels.pdl); with `prefetch` its fn rows are loaded before
        it waits for the kernel that writes x."""
        self.m, self.pdl, self.prefetch = m, pdl, pdl and prefetch
        self.acc = m + 1
        self.group = min(GROUP, self.acc)
        self.groups = (self.acc + self.group - 1) // self.group

    @cute.jit
    def __call__(self, mX: cute.Tensor, mFn: cute.Tensor, mPart: cute.Tensor, stream):
        @cute.struct
        class Storage:
            red: cute.struct.Align[cute.struct.MemRange[Float32, WARPS * self.group], 16]

        T = cute.size(mX.shape[0])
        S = cute.size(mPart.shape[1])
        self.kernel(mX, mFn, mPart, Storage).launch(grid=(S, T, self.groups), block=[THREADS, 1, 1],
                                                    smem=Storage.size_in_bytes(), stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mFn: cute.Tensor, mPart: cute.Tensor, Storage: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        s, t, grp = cute.arch.block_idx()
        K = cute.size(mX.shape[1])
        j0 = grp * self.group
        k0 = s * CHUNK + tidx * VEC
        w = cute.make_rmem_tensor((self.group, VEC), Float32)
        if cutlass.const_expr(self.prefetch):
            # the mixing weights depend on nothing the previous kernel writes: in flight before the wait
            if k0 < K:
                for i in cutlass.range_constexpr(self.group):
                    if j0 + i < self.m:
                        cute.autovec_copy(cute.local_tile(mFn[j0 + i, None], (VEC,), (k0 // VEC,)), w[i, None])
        chain_entry(self.pdl)
        smem = cutlass.memory.SmemAllocator()
        red = smem.allocate(Storage).red.get_tensor(cute.make_layout((WARPS, self.group), stride=(self.group, 1)))
        acc = cute.make_rmem_tensor((self.group,), Float32)
        acc.fill(0.0)
        if k0 < K:
            xf = cute.make_rmem_tensor((VEC,), mX.element_type)
            cute.autovec_copy(cute.local_tile(mX[t, None], (VEC,), (k0 // VEC,)), xf)
            x = xf.load().to(Float32)
            xs = cute.make_rmem_tensor((VEC,), Float32)
            xs.store(x)
            sq = Float32(0.0)
            for e in cutlass.range_constexpr(VEC):
                sq = sq + xs[e] * xs[e]
            for i in cutlass.range_constexpr(self.group):
                j = j0 + i
                if j < self.m:
                    if cutlass.const_expr(not self.prefetch):
                        cute.autovec_copy(cute.local_tile(mFn[j, None], (VEC,), (k0 // VEC,)), w[i, None])
                    a = Float32(0.0)
                    for e in cutlass.range_constexpr(VEC):
                        a = a + xs[e] * w[i, e]
                    acc[i] = a
                if j == self.m:
                    acc[i] = sq
        lane = tidx % 32
        warp = tidx // 32
        for i in cutlass.range_constexpr(self.group):
            v = butterfly(acc[i], add)
            if lane == 0:
                red[warp, i] = v
        cute.arch.barrier()
        if tidx < self.group:
            if j0 + tidx < self.acc:
                v = Float32(0.0)
                for w_ in cutlass.range_constexpr(WARPS):
                    v = v + red[w_, tidx]
                mPart[t, s, j0 + tidx] = v


class HcCollapse:
    """x[t] = sum_i pre[t, i] * streams[t, i] with the token's pre weights computed here from HcMix's partials
    (what HcCoefficients writes as pre, through the same helpers, so the same bits). So HcCoefficients' Sinkhorn
    chain (post and comb: ~5 us of dependent shuffles at batch 1, which only the sub-layer's hc_post reads) need
    not precede the collapse: the caller runs it beside the sub-layer (CuteOps.hc_pre_split). Arguments: streams
    [T, n*D], part [T, S, m+1] (S = num_partials), scale [3], base [m] fp32, norm_w [D] fp32, out [T, D],
    inv_k = 1 / (n*D). One CTA per token, D / 8 threads; fp32 sums, one rounding to out's dtype (TorchOps: fp32
    bmm, one cast). With `out_norm_eps`, x then gets the sub-layer's RMSNorm (weight norm_w) in the same CTA, with
    RmsNorm's bits: one launch less on every sub-layer's critical path."""

    def __init__(self, n: int, dim: int, num_partials: int, eps: float, norm_eps: float,
                 out_norm_eps: float | None = None, pdl: bool = False, hoist: bool | None = None):
        assert dim % VEC == 0 and num_partials >= 1
        if out_norm_eps is not None and not norm_fits(dim):
            raise ValueError(f"HcCollapse: a fused RMSNorm needs dim % 256 == 0 (whole warps), got {dim}")
        self.n, self.d, self.s = n, dim, num_partials
        self.m = 2 * n + n * n
        self.eps, self.norm_eps = eps, norm_eps
        self.out_norm_eps, self.pdl = out_norm_eps, pdl
        self.hoist = pdl_flags.HOIST if hoist is None else hoist     # see dsv4_kernels.pdl.hoist
        self.threads = dim // VEC

    @cute.jit
    def __call__(self, mStreams: cute.Tensor, mPart: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
                 mNormW: cute.Tensor, mOut: cute.Tensor, inv_k: Float32, stream):
        @cute.struct
        class Storage:
            pre: cute.struct.Align[cute.struct.MemRange[Float32, self.n], 16]
            red: cute.struct.Align[cute.struct.MemRange[Float32, max(1, self.threads // 32)], 16]

        self.kernel(mStreams, mPart, mScale, mBase, mNormW, mOut, inv_k, Storage).launch(
            grid=(cute.size(mStreams.shape[0]), 1, 1), block=[self.threads, 1, 1], smem=Storage.size_in_bytes(),
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mStreams: cute.Tensor, mPart: cute.Tensor, mScale: cute.Tensor, mBase: cute.Tensor,
               mNormW: cute.Tensor, mOut: cute.Tensor, inv_k: Float32, Storage: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        t, _, _ = cute.arch.block_idx()
        fused_norm = self.out_norm_eps is not None
        # weights before the wait (dsv4_kernels.pdl): the norm weight is then not one more L2 round trip after the
        # row sum
        if cutlass.const_expr(not self.hoist):
            chain_entry(self.pdl)
        nw = load_norm_weight(mNormW, tidx) if cutlass.const_expr(fused_norm and self.hoist) else mNormW
        scale0 = mScale[0]
        base = mBase[cutlass.min(tidx, self.n - 1)]
        if cutlass.const_expr(self.hoist):
            chain_entry(self.pdl)
        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(Storage)
        pre = storage.pre.get_tensor(cute.make_layout((self.n,)))
        # hoisted, the streams are in flight together with the partials (they do not depend on pre): one L2 round
        # trip before the barrier instead of one on each side of it
        frags = cute.make_rmem_tensor((self.n, VEC), mStreams.element_type)
        if cutlass.const_expr(self.hoist):
            self._load_streams(mStreams, frags, t, tidx)
        if tidx < self.n:
            r = rms_factor(partial_sum(mPart, t, self.m, self.s) * inv_k, self.norm_eps)
            pre[tidx] = pre_weight(partial_sum(mPart, t, tidx, self.s), r, scale0, base, Float32(self.eps))
        cute.arch.barrier()
        if cutlass.const_expr(not self.hoist):
            self._load_streams(mStreams, frags, t, tidx)
        acc = cute.make_rmem_tensor((VEC,), Float32)
        acc.fill(0.0)
        frag = cute.make_rmem_tensor((VEC,), mStreams.element_type)
        for i in cutlass.range_constexpr(self.n):
            acc.store(acc.load() + frags[i, None].load().to(Float32) * pre[i])
        frag.store(acc.load().to(mOut.element_type))
        if cutlass.const_expr(fused_norm):
            # the sub-layer's RMSNorm of the rounded x, as RmsNorm computes it (same sums in the same order)
            red = storage.red.get_tensor(cute.make_layout((self.threads // 32,)))
            rms_normalize(frag, red, tidx, self.threads // 32, self.d, self.out_norm_eps, nw, True, self.hoist)
        cute.autovec_copy(frag, cute.local_tile(mOut[t, None], (VEC,), (tidx,)))

    def _load_streams(self, mStreams: cute.Tensor, frags: cute.Tensor, t, tidx):
        """This thread's VEC values of each of the n streams into frags (traced inline: a Python loop)."""
        for i in range(self.n):
            cute.autovec_copy(cute.local_tile(mStreams[t, None], (VEC,), (i * self.threads + tidx,)), frags[i, None])
