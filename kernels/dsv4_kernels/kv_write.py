"""Scatter of [T, d] KV rows into a paged pool by slot mapping: pool.view(-1, d)[slot[t]] = kv[t] (slot < 0: skip).

One CTA per token, d / 8 threads, one 16-byte load and store each. The pool keeps the model dtype (BF16 on the GPU,
as TorchOps does), so the row is copied bit-exactly.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int64


class KVScatter:
    def __init__(self, head_dim: int):
        assert head_dim % 8 == 0
        self.d = head_dim
        self.threads = head_dim // 8

    @cute.jit
    def __call__(self, mKV: cute.Tensor, mSlot: cute.Tensor, mPool: cute.Tensor, stream):
        self.kernel(mKV, mSlot, mPool).launch(grid=(cute.size(mKV.shape[0]), 1, 1), block=[self.threads, 1, 1],
                                              stream=stream)

    @cute.kernel
    def kernel(self, mKV: cute.Tensor, mSlot: cute.Tensor, mPool: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        t, _, _ = cute.arch.block_idx()
        slot = Int64(mSlot[t])
        if slot >= 0:
            frag = cute.make_rmem_tensor((8,), mKV.element_type)
            cute.autovec_copy(cute.local_tile(mKV[t, None], (8,), (tidx,)), frag)
            addr = mPool.iterator.toint() + slot * (self.d * mPool.element_type.width // 8)
            row = cute.make_tensor(cute.make_ptr(mPool.element_type, addr, cute.AddressSpace.gmem, assumed_align=16),
                                   cute.make_layout((self.d,)))
            cute.autovec_copy(frag, cute.local_tile(row, (8,), (tidx,)))
