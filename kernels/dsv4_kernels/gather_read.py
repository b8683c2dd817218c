"""A read-only gather of whole rows: the ceiling peer for decode attention's row gathers (`scripts/gather_peer.py`).

Decode attention reads, per token, a list of KV rows (1 KiB each for d = 512 in BF16) scattered over the paged
caches. How fast can this GPU read such rows at all, with nothing else going on? Here every CTA of 256 threads reads
`rows_per_cta` rows given by an index list, 16 bytes per thread and load, all of a thread's loads issued before any
is used, and folds them into one word per thread (XOR, so that the loads cannot be dropped); nothing else is
written. Many small CTAs per SM keep far more bytes in flight than the attention kernel's one CTA per SM can.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64

THREADS = 256


class GatherRead:
    """out[b * THREADS + t] = XOR of the 16-byte words thread t of CTA b read from rows idx[b * rows_per_cta ...]."""

    def __init__(self, row_words: int, rows_per_cta: int):
        chunks = row_words // 4                     # 16-byte chunks per row
        if row_words % 4 or THREADS % chunks or rows_per_cta % (THREADS // chunks):
            raise ValueError(f"gather read: rows of {row_words} words need 16-byte chunks that divide {THREADS} "
                             f"threads and rows_per_cta ({rows_per_cta}) a multiple of the rows one pass covers")
        self.row_words = row_words
        self.chunks = chunks
        self.rows_per_pass = THREADS // chunks
        self.rpc = rows_per_cta

    @cute.jit
    def __call__(self, mRows: cute.Tensor, mIdx: cute.Tensor, mOut: cute.Tensor, stream):
        grid = cute.size(mIdx.shape[0]) // self.rpc
        self.kernel(mRows, mIdx, mOut).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mRows: cute.Tensor, mIdx: cute.Tensor, mOut: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        c = tidx % self.chunks
        s = tidx // self.chunks
        U = self.rpc // self.rows_per_pass
        rows = cute.make_rmem_tensor((U,), Int32)
        for u in cutlass.range_constexpr(U):
            rows[u] = mIdx[bidx * self.rpc + u * self.rows_per_pass + s]
        v = cute.make_rmem_tensor((U, 4), Int32)
        base = mRows.iterator.toint()
        for u in cutlass.range_constexpr(U):
            addr = base + Int64(rows[u]) * (self.row_words * 4) + c * 16
            src = cute.make_tensor(cute.make_ptr(Int32, addr, cute.AddressSpace.gmem, assumed_align=16),
                                   cute.make_layout((4,)))
            cute.autovec_copy(src, v[u, None])
        acc = Int32(0)
        for u in cutlass.range_constexpr(U):
            for q in cutlass.range_constexpr(4):
                acc = acc ^ v[u, q]
        mOut[bidx * THREADS + tidx] = acc


_COMPILED: dict = {}


def gather_read(pool, idx, rows_per_cta: int = 32, out=None):
    """Launch on the current stream: pool int32 [R, W] (rows 16-byte aligned), idx int32 [N] (N a multiple of
    rows_per_cta) -> out int32 [N / rows_per_cta * THREADS]. Compiled once per (W, rows_per_cta, N)."""
    import cuda.bindings.driver as cuda
    import torch
    from cutlass.cute.runtime import from_dlpack

    n, w = idx.shape[0], pool.shape[1]
    if pool.dtype != torch.int32 or idx.dtype != torch.int32 or n % rows_per_cta:
        raise ValueError(f"gather read: int32 pool and idx with len(idx) a multiple of {rows_per_cta}, got "
                         f"{pool.dtype}, {idx.dtype}, {n}")
    if out is None:
        out = torch.empty(n // rows_per_cta * THREADS, dtype=torch.int32, device=pool.device)
    args = (from_dlpack(pool, assumed_align=16), from_dlpack(idx), from_dlpack(out))
    stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream)
    key = (w, rows_per_cta, n, pool.shape[0])
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = cute.compile(GatherRead(w, rows_per_cta), *args, stream)
    fn(*args, stream)
    return out


def gather_read_reference(pool, idx, rows_per_cta: int = 32):
    """What gather_read writes, computed by torch."""
    import torch

    n, w = idx.shape[0], pool.shape[1]
    rows_per_pass = THREADS * 4 // w
    got = pool[idx.long()].view(n // rows_per_cta, rows_per_cta // rows_per_pass, THREADS, 4)
    ref = torch.zeros(n // rows_per_cta, THREADS, dtype=torch.int32, device=pool.device)
    for u in range(got.shape[1]):
        for q in range(4):
            ref ^= got[:, u, :, q]
    return ref.view(-1)
