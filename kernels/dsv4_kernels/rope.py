"""RoPE on the last `rope_dim` channels of each row, interleaved pairs (DeepSeek's layout), out of place.

x [R, D] rows belong to tokens r // heads; out[r] = x[r] with pairs (2i, 2i+1) of the tail rotated by
angle(pos[token], i) (negated for the inverse rotation the attention output gets). One CTA per row, D / 8 threads,
8 channels (one 16/32-byte vector) each: threads of the head part copy, threads of the tail rotate in fp32 and round
once to x's dtype, as TorchOps.rope_tail does. Replaces ~12 launches per call (decode runs 5-7 calls per layer).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from dsv4_kernels.cute_utils import load_norm_weight, norm_fits, rms_normalize
from dsv4_kernels import pdl as pdl_flags
from dsv4_kernels.pdl import chain_entry

VEC = 8


NORMS = ("none", "plain", "weight")


class RopeTail:
    """`norm` "plain" / "weight": each row is first RMS-normalised (times the fp32 weight w [D] for "weight") and
    rounded to x's dtype, as CuteOps.rms_norm writes it, then rotated: the norm and RoPE of the attention's
    queries and keys in one launch instead of two, with the same bits (the row sum in RmsNorm's order)."""

    def __init__(self, dim: int, rope_dim: int, inverse: bool, norm: str = "none", eps: float = 0.0,
                 pdl: bool = False, hoist: bool | None = None):
        assert dim % VEC == 0 and rope_dim % VEC == 0 and rope_dim <= dim
        if norm not in NORMS or (norm != "none" and not norm_fits(dim)):
            raise ValueError(f"RopeTail: norm {norm!r} with dim {dim} (norms {NORMS}; a norm needs dim % 256 == 0)")
        self.d, self.rd, self.inverse = dim, rope_dim, inverse
        self.norm, self.eps, self.pdl = norm, eps, pdl
        self.hoist = pdl_flags.HOIST if hoist is None else hoist     # see dsv4_kernels.pdl.hoist
        self.threads = dim // VEC

    @cute.jit
    def __call__(self, mX: cute.Tensor, mPos: cute.Tensor, mCos: cute.Tensor, mSin: cute.Tensor, mW: cute.Tensor,
                 mOut: cute.Tensor, heads: Int32, stream):
        @cute.struct
        class Storage:
            red: cute.struct.Align[cute.struct.MemRange[Float32, max(1, self.threads // 32)], 16]

        self.kernel(mX, mPos, mCos, mSin, mW, mOut, heads, Storage).launch(
            grid=(cute.size(mX.shape[0]), 1, 1), block=[self.threads, 1, 1], smem=Storage.size_in_bytes(),
            stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mPos: cute.Tensor, mCos: cute.Tensor, mSin: cute.Tensor, mW: cute.Tensor,
               mOut: cute.Tensor, heads: Int32, Storage: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        r, _, _ = cute.arch.block_idx()
        # the norm weight before the wait (dsv4_kernels.pdl.hoist). The position is a step input, read after it
        early = self.hoist and self.norm == "weight"
        w = load_norm_weight(mW, tidx) if cutlass.const_expr(early) else mW
        chain_entry(self.pdl)
        frag = cute.make_rmem_tensor((VEC,), mX.element_type)
        cute.autovec_copy(cute.local_tile(mX[r, None], (VEC,), (tidx,)), frag)
        if cutlass.const_expr(self.norm != "none"):
            smem = cutlass.memory.SmemAllocator()
            red = smem.allocate(Storage).red.get_tensor(cute.make_layout((self.threads // 32,)))
            rms_normalize(frag, red, tidx, self.threads // 32, self.d, self.eps, w, self.norm == "weight", early)
        first = tidx * VEC - (self.d - self.rd)          # channel index inside the tail (< 0: head part)
        if first >= 0:
            rotate_tail(frag, first, mPos[r // heads], mCos, mSin, self.inverse)
        cute.autovec_copy(frag, cute.local_tile(mOut[r, None], (VEC,), (tidx,)))


@cute.jit
def rotate_tail(frag: cute.Tensor, first: Int32, p, mCos: cute.Tensor, mSin: cute.Tensor, inverse: cutlass.Constexpr):
    """frag (VEC channels of the tail from channel `first`, x's dtype) rotated in place by position p's angles:
    fp32 math, one rounding back to frag's dtype. Shared with the split combine's fused inverse rotation
    (attention_decode.SplitCombineRope), so that both give the same bits."""
    f = cute.make_rmem_tensor((VEC,), Float32)
    f.store(frag.load().to(Float32))
    rot = cute.make_rmem_tensor((VEC,), Float32)
    for k in cutlass.range_constexpr(VEC // 2):
        i = first // 2 + k
        c = mCos[p, i]
        s = mSin[p, i]
        if cutlass.const_expr(inverse):
            s = -s
        ev = f[2 * k]
        od = f[2 * k + 1]
        rot[2 * k] = ev * c - od * s
        rot[2 * k + 1] = ev * s + od * c
    frag.store(rot.load().to(frag.element_type))
