"""Small CuTe DSL helpers shared by the kernels."""

from __future__ import annotations

import cutlass
import cutlass.cute as cute


def mn_view(acc: cute.Tensor) -> cute.Tensor:
    """Accumulator -> (rows, columns) view of the thread's values: ((2,2), MMA_M, MMA_N) of mma.sync ->
    ((2, MMA_M), (2, MMA_N)); ((2,2,V), MMA_M, MMA_N) of wgmma (V column groups of 8) -> ((2, MMA_M), (2, V, MMA_N))."""
    lay = cute.make_layout(acc.layout.shape)
    if cute.rank(lay.shape[0]) == 3:
        mn = cute.make_layout(
            ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[0][2], lay.shape[2])),
            stride=((lay.stride[0][1], lay.stride[1]), (lay.stride[0][0], lay.stride[0][2], lay.stride[2])),
        )
    else:
        mn = cute.make_layout(
            ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[2])),
            stride=((lay.stride[0][1], lay.stride[1]), (lay.stride[0][0], lay.stride[2])),
        )
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


WARP_OFFSETS = (16, 8, 4, 2, 1)


def add(a, b):
    return a + b


def butterfly(v, op, offsets=WARP_OFFSETS):
    """All-reduce of `v` with `op` over the lanes that differ in the bits of `offsets` (the whole warp by default;
    (2, 1): groups of 4 lanes), by xor shuffles: every lane ends with the result."""
    for off in offsets:
        v = op(v, cute.arch.shuffle_sync_bfly(v, offset=off, mask=-1, mask_and_clamp=31))
    return v


def partial_sum(mPart: cute.Tensor, t, k, num_partials: int):
    """sum_s mPart[t, s, k] for a compile-time number of partials, in order: the loads are all in flight at once
    (as a run-time loop they went one L2 round trip after another)."""
    v = mPart[t, 0, k]
    for s in range(1, num_partials):                # a Python loop: unrolled at trace time
        v = v + mPart[t, s, k]
    return v


@cute.jit
def block_sum(v, red: cute.Tensor, tidx, warps: cutlass.Constexpr):
    """Sum of `v` over a CTA of `warps` whole warps, every thread gets it: a butterfly in each warp, then the warp
    sums through shared memory `red` (`warps` floats) in warp order. This is RmsNorm's order for a row of whole
    warps, so a kernel that fuses a norm with this gets RmsNorm's bits."""
    v = butterfly(v, add)
    if tidx % 32 == 0:
        red[tidx // 32] = v
    cute.arch.barrier()
    s = cutlass.Float32(0.0)
    for w in cutlass.range_constexpr(warps):
        s = s + red[w]
    return s
