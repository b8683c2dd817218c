"""CuTe DSL attention-side ops for CuteOps: `store_window_kv`, `sparse_attention`, `indexer_topk`.

`CuteAttentionMixin` has the TorchOps signatures; CuteOps mixes it in ahead of TorchOps (or calls the functions
below). Anything the kernels do not cover (CPU tensors, non-BF16 caches, head dims not a multiple of 64) goes to the
TorchOps implementation through `super()`.

Status:
- `sparse_attention`: CuTe kernel (kernels/dsv4_kernels/attention_decode.py) for decode *and* prefill (one CTA per
  query token and KV split; prefill re-reads shared rows per token, mostly from L2).
- `store_window_kv`: CuTe scatter kernel (kernels/dsv4_kernels/kv_write.py).
- `indexer_topk`: still TorchOps (scores + stable top-k in torch on the GPU).
- compressed-entry writes (`compress_and_store`) stay in TorchOps.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsv4.ops.base import ForwardBatch, LayerCache

Tensor = torch.Tensor

_COMPILED: dict[tuple, Any] = {}


def _cute():
    import cuda.bindings.driver as cuda  # noqa: F401
    import cutlass  # noqa: F401
    import cutlass.cute as cute  # noqa: F401
    from cutlass.cute.runtime import from_dlpack
    return from_dlpack


def to_cute(t: Tensor, row_align: bool = True):
    """torch -> cute tensor, every mode dynamic (one compiled kernel serves all sizes); innermost stride 1."""
    from_dlpack = _cute()
    align = 16 if row_align else t.element_size()
    ct = from_dlpack(t, assumed_align=align).mark_layout_dynamic(leading_dim=t.dim() - 1)
    if row_align:
        ct = ct.mark_compact_shape_dynamic(mode=t.dim() - 1, stride_order=t.dim_order(),
                                           divisibility=16 // t.element_size())
    return ct


def _stream():
    import cuda.bindings.driver as cuda
    return cuda.CUstream(torch.cuda.current_stream().cuda_stream)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def heads_per_cta(h: int) -> int:
    return 16 if h <= 16 else (32 if h <= 32 else 64)


class AttentionPlan:
    """Per-ForwardBatch device tensors shared by all layers of one step (token -> sequence, block tables)."""

    def __init__(self, batch: ForwardBatch, device: torch.device):
        n = [batch.query_start[b + 1] - batch.query_start[b] for b in range(batch.num_seqs)]
        self.seq = torch.repeat_interleave(torch.arange(batch.num_seqs, dtype=torch.int32), torch.tensor(n)).to(device)
        self.pos = batch.positions.to(device=device, dtype=torch.int32).contiguous()
        self.swa_bt = _table(batch.swa_block_tables, device)
        self.comp_bt = _table(batch.comp_block_tables, device)
        self.max_pos = max((batch.seq_len(b) - 1 for b in range(batch.num_seqs) if n[b] > 0), default=0)


def _table(rows: list[list[int]], device: torch.device) -> Tensor:
    width = max(2, max((len(r) for r in rows), default=0))
    out = torch.full((max(1, len(rows)), width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    return out.to(device)


def plan_for(batch: ForwardBatch, device: torch.device) -> AttentionPlan:
    plan = getattr(batch, "_cute_attention_plan", None)
    if plan is None:
        plan = AttentionPlan(batch, device)
        batch._cute_attention_plan = plan
    return plan


def sparse_attention(q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                     sink: Tensor, scale: float, batch: ForwardBatch, plan: AttentionPlan | None = None,
                     num_splits: int | None = None) -> Tensor:
    """The CuTe kernel path of Ops.sparse_attention (BF16 caches, head_dim % 64 == 0)."""
    launch, result = prepare_sparse_attention(q, cache, ratio, window, topk_entries, sink, scale, batch, plan,
                                              num_splits)
    launch()
    return result()


def prepare_sparse_attention(q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                             sink: Tensor, scale: float, batch: ForwardBatch, plan: AttentionPlan | None = None,
                             num_splits: int | None = None):
    """-> (launch, result): launch() enqueues the kernel(s) on the current stream with arguments converted once
    (what the benchmark times); result() returns the [T, H, d] output in q's dtype."""
    from dsv4_kernels.attention_decode import (MODE_CSA, MODE_HCA, MODE_WINDOW, SparseDecodeAttention,
                                               SplitCombine, plan_splits)

    T, H, d = q.shape
    dev = q.device
    plan = plan or plan_for(batch, dev)
    M = heads_per_cta(H)
    Hp = -(-H // M) * M
    qk = q.to(torch.bfloat16)
    sk = sink.float()
    if Hp != H:
        qk = torch.cat([qk, qk.new_zeros(T, Hp - H, d)], 1)
        sk = torch.cat([sk, sk.new_zeros(Hp - H)])
    qk, sk = qk.contiguous(), sk.contiguous()
    if ratio == 4 and topk_entries is not None:
        mode, topk = MODE_CSA, topk_entries.shape[1]
        tk = topk_entries.to(torch.int32).contiguous()
        n_comp = topk
    elif ratio and ratio != 4:
        mode, topk, tk = MODE_HCA, 0, plan.pos.view(-1, 1)
        n_comp = (plan.max_pos + 1) // ratio
    else:
        mode, topk, tk = MODE_WINDOW, 0, plan.pos.view(-1, 1)
        n_comp = 0
    swa = cache.swa_kv.view(-1, d)
    comp = cache.comp_kv.view(-1, d) if (mode != MODE_WINDOW and cache.comp_kv is not None) else swa
    max_rows = min(plan.max_pos + 1, window) + n_comp
    G = Hp // M
    if num_splits is None:
        splits, per = plan_splits(max_rows, T, G, num_sms=_num_sms(dev))
    else:
        tiles = max(1, math.ceil(max_rows / 64))
        per = math.ceil(tiles / num_splits)
        splits = math.ceil(tiles / per)
    split = splits > 1
    out = torch.empty((T, Hp, d), dtype=torch.bfloat16, device=dev)
    if split:
        opart = torch.empty((T, splits, Hp, d), dtype=torch.float32, device=dev)
        ml = torch.empty((T, splits, Hp, 2), dtype=torch.float32, device=dev)
    else:
        opart = torch.empty((1, 1, 1, d), dtype=torch.float32, device=dev)
        ml = torch.empty((1, 1, 1, 2), dtype=torch.float32, device=dev)
    import cutlass
    import cutlass.cute as cute
    args = [to_cute(qk), to_cute(swa), to_cute(comp), to_cute(plan.pos, False), to_cute(plan.seq, False),
            to_cute(plan.swa_bt, False), to_cute(plan.comp_bt, False), to_cute(tk, False), to_cute(sk, False),
            to_cute(out), to_cute(opart), to_cute(ml, False),
            cutlass.Float32(scale * 1.4426950408889634), cutlass.Int32(per), cutlass.Int32(splits), _stream()]
    key = ("attn", d, M, mode, window, cache.block_size, ratio, topk, split)
    fn = _COMPILED.get(key)
    if fn is None:
        kern = SparseDecodeAttention(d, M, mode, window, cache.block_size, ratio if ratio else 1, topk, split)
        fn = _COMPILED[key] = cute.compile(kern, *args)
    cfn = cargs = None
    if split:
        ckey = ("combine", d)
        cfn = _COMPILED.get(ckey)
        cargs = [to_cute(opart), to_cute(ml, False), to_cute(sk, False), to_cute(out), cutlass.Int32(splits),
                 _stream()]
        if cfn is None:
            cfn = _COMPILED[ckey] = cute.compile(SplitCombine(d), *cargs)

    def launch():
        fn(*args)
        if cfn is not None:
            cfn(*cargs)

    def result():
        res = out if Hp == H else out[:, :H]
        return res.to(q.dtype)

    return launch, result


def store_window_kv(kv: Tensor, cache: LayerCache, batch: ForwardBatch) -> None:
    import cutlass.cute as cute

    from dsv4_kernels.kv_write import KVScatter

    d = kv.shape[-1]
    src = kv.to(cache.swa_kv.dtype).contiguous()
    slots = batch.swa_slot_mapping.to(device=kv.device, dtype=torch.int64).contiguous()
    pool = cache.swa_kv.view(-1, d)
    args = [to_cute(src), to_cute(slots, False), to_cute(pool), _stream()]
    key = ("kvw", d, src.dtype)
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = cute.compile(KVScatter(d), *args)
    fn(*args)


def supported(q_or_kv: Tensor, cache: LayerCache) -> bool:
    return (q_or_kv.is_cuda and cache.swa_kv.dtype == torch.bfloat16 and q_or_kv.shape[-1] % 64 == 0)


class CuteAttentionMixin:
    """Mix in ahead of TorchOps: class CuteOps(CuteAttentionMixin, TorchOps)."""

    def store_window_kv(self, kv: Tensor, cache: LayerCache, batch: ForwardBatch) -> None:
        if supported(kv, cache) and kv.shape[0] > 0:
            return store_window_kv(kv, cache, batch)
        return super().store_window_kv(kv, cache, batch)

    def sparse_attention(self, q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                         sink: Tensor, scale: float, batch: ForwardBatch) -> Tensor:
        if supported(q, cache) and q.shape[0] > 0:
            return sparse_attention(q, cache, ratio, window, topk_entries, sink, scale, batch)
        return super().sparse_attention(q, cache, ratio, window, topk_entries, sink, scale, batch)

    def indexer_topk(self, q: Tensor, head_weights: Tensor, index_k: Tensor, block_size: int, topk: int,
                     batch: ForwardBatch) -> Tensor:
        return super().indexer_topk(q, head_weights, index_k, block_size, topk, batch)
