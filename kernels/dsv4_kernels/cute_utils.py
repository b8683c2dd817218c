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


def norm_fits(dim: int) -> bool:
    """Whether a row of `dim` values, 8 per thread, is whole warps: what block_sum / rms_normalize need."""
    return dim % (8 * 32) == 0


def load_norm_weight(mW: cute.Tensor, tidx) -> cute.Tensor:
    """This thread's 8 fp32 norm weights (vector tidx) in registers: loaded before griddepcontrol.wait (a weight
    depends on nothing the previous kernel writes), so the load is not one more L2 round trip after the row sum."""
    w = cute.make_rmem_tensor((8,), cutlass.Float32)
    cute.autovec_copy(cute.local_tile(mW, (8,), (tidx,)), w)
    return w


@cute.jit
def rms_normalize(frag: cute.Tensor, red: cute.Tensor, tidx, warps: cutlass.Constexpr, dim: cutlass.Constexpr,
                  eps: cutlass.Constexpr, mW: cute.Tensor, weighted: cutlass.Constexpr,
                  preloaded: cutlass.Constexpr = False):
    """frag, this thread's 8 values (vector tidx) of a row spread over a CTA of `warps` whole warps <- the row's
    RMSNorm (times mW's matching 8 fp32 values if `weighted`; with `preloaded`, mW is those values already in
    registers: load_norm_weight), rounded to frag's dtype: RmsNorm's math in its order, so kernels that fuse a norm
    ahead of their own work write RmsNorm's bits."""
    xf = cute.make_rmem_tensor((8,), cutlass.Float32)
    xf.store(frag.load().to(cutlass.Float32))
    ssq = cutlass.Float32(0.0)
    for k in cutlass.range_constexpr(8):
        ssq = ssq + xf[k] * xf[k]
    rstd = cute.math.rsqrt(block_sum(ssq, red, tidx, warps) / cutlass.Float32(dim) + cutlass.Float32(eps))
    y = cute.make_rmem_tensor((8,), cutlass.Float32)
    if cutlass.const_expr(weighted):
        if cutlass.const_expr(preloaded):
            y.store(xf.load() * rstd * mW.load())
        else:
            cute.autovec_copy(cute.local_tile(mW, (8,), (tidx,)), y)
            y.store(xf.load() * rstd * y.load())
    else:
        y.store(xf.load() * rstd)
    frag.store(y.load().to(frag.element_type))
