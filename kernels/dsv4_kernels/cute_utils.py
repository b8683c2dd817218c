"""Small CuTe DSL helpers shared by the kernels."""

from __future__ import annotations

import cutlass.cute as cute


def mn_view(acc: cute.Tensor) -> cute.Tensor:
    """((2,2), MMA_M, MMA_N) mma.sync accumulator -> ((2, MMA_M), (2, MMA_N)) row/column view."""
    lay = cute.make_layout(acc.layout.shape)
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
