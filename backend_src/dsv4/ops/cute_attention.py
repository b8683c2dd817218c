"""CuTe DSL attention-side ops for CuteOps: `store_window_kv`, `sparse_attention`, `indexer_topk`.

`CuteAttentionMixin` has the TorchOps signatures; CuteOps mixes it in ahead of TorchOps (or calls the functions
below). Anything the kernels do not cover (CPU tensors, non-BF16 caches, head dims not a multiple of 64) goes to the
TorchOps implementation through `super()`.

Status:
- `sparse_attention`: CuTe kernel (kernels/dsv4_kernels/attention_decode.py) for decode *and* prefill (one CTA per
  query token, KV split and head group; prefill re-reads shared rows per token, mostly from L2).
- `store_window_kv`: CuTe scatter kernel (kernels/dsv4_kernels/kv_write.py).
- `indexer_topk`: CuTe score kernel (kernels/dsv4_kernels/indexer.py) writing unique int64 sort keys, then an
  unsorted `torch.topk` on them (the set a stable descending sort selects: ties toward the earlier entry), or no
  selection where every entry fits in top-k; -1 for entries a query cannot see, as TorchOps.
- compressed-entry writes (`compress_and_store`) stay in TorchOps.

Host cost (decode runs ~60 attention calls per step): kernels are compiled once per variant against fake tensors with
dynamic shapes and, where apache-tvm-ffi is importable, called through the TVM-FFI path (torch tensors passed
directly, the current torch stream taken from the environment: a few µs per launch instead of ~40 µs per
`from_dlpack` conversion). Everything derived from the ForwardBatch alone (token -> sequence, positions, block
tables as int32 device tensors, split plans) is built once per step and kept on the batch object.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from typing import Any

import numpy as np
import torch

from dsv4.config import RopeConfig
from dsv4.ops.base import ForwardBatch, LayerCache

Tensor = torch.Tensor

_COMPILED: dict[tuple, Any] = {}

try:  # the TVM-FFI call path (set DSV4_CUTE_NO_TVM_FFI=1 to force explicit DLPack conversions)
    import tvm_ffi  # noqa: F401
    TVM_FFI = os.environ.get("DSV4_CUTE_NO_TVM_FFI", "0") != "1"
except ImportError:  # pragma: no cover - depends on the machine
    TVM_FFI = False


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


_DT = {torch.bfloat16: "BFloat16", torch.float32: "Float32", torch.int32: "Int32", torch.int64: "Int64",
       torch.uint8: "Uint8"}


def _fake(t: Tensor, row_align: bool = True):
    """Fake compile-time tensor matching `t`: dtype and rank; every extent dynamic; row-major compact; the last
    extent divisible by one 16-byte vector where `row_align`."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor
    dtype = getattr(cutlass, _DT[t.dtype])
    r = t.dim()
    vec = 16 // t.element_size()
    shape = tuple(cute.sym_int(divisibility=vec if (row_align and i == r - 1) else 1) for i in range(r))
    return make_fake_compact_tensor(dtype, shape, stride_order=tuple(range(r - 1, -1, -1)),
                                    assumed_align=16 if row_align else t.element_size())


def chain_pdl(tokens: int) -> bool:
    """Whether a chain kernel of a step with `tokens` tokens launches as a programmatic dependent
    (dsv4_kernels.pdl)."""
    from dsv4_kernels.pdl import chain
    return chain(tokens)


def hoist(tokens: int) -> bool:
    """Whether a chain kernel of a step with `tokens` tokens loads its weights before its wait (dsv4_kernels.pdl.hoist;
    read at every launch, launch keys carry it, so an A/B run can switch it)."""
    from dsv4_kernels.pdl import hoist as early
    return early(tokens)


def unconverted(*pairs: tuple[Tensor | None, Tensor]) -> bool:
    """Whether each (passed, used) pair is one tensor: the kernel reads the caller's own weight (None: no weight), not
    a cast or contiguous copy made for this call, which a kernel of the step writes and so must not be read before
    griddepcontrol.wait (hoist's condition, dsv4_kernels.pdl)."""
    return all(passed is None or used.data_ptr() == passed.data_ptr() for passed, used in pairs)


def _stream():
    import cuda.bindings.driver as cuda
    return cuda.CUstream(torch.cuda.current_stream().cuda_stream)


class Launcher:
    """One compiled kernel variant and how to call it. `spec`: per argument, ("t", row_align) for a tensor,
    ("f",) for a Float32 scalar, ("i",) for an Int32 scalar."""

    def __init__(self, key: tuple, make, spec: tuple, example: list):
        self.tvm = TVM_FFI
        self.spec = spec
        fn = _COMPILED.get(key + (self.tvm,))
        if fn is None:
            import cutlass
            import cutlass.cute as cute
            if self.tvm:
                cargs = [self._fake_arg(s, a) for s, a in zip(spec, example)]
                cargs.append(cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True))
                fn = cute.compile(make(), *cargs, options="--enable-tvm-ffi")
            else:
                fn = cute.compile(make(), *self._convert(example))
            _COMPILED[key + (self.tvm,)] = fn
        self.fn = fn

    @staticmethod
    def _fake_arg(s, a):
        import cutlass
        if s[0] == "t":
            return _fake(a, s[1])
        return cutlass.Float32(a) if s[0] == "f" else cutlass.Int32(a)

    def _convert(self, args):
        import cutlass
        out = []
        for s, a in zip(self.spec, args):
            if s[0] == "t":
                out.append(to_cute(a, s[1]))
            else:
                out.append(cutlass.Float32(a) if s[0] == "f" else cutlass.Int32(a))
        out.append(_stream())
        return out

    def __call__(self, *args):
        if self.tvm:
            return self.fn(*args)
        return self.fn(*self._convert(args))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Up to this many query tokens the mma.sync kernel takes 16 heads a CTA instead of 32: a batch-1 step has too few
# CTAs to fill the GPU, and each does a long serial chain (rows in, S, softmax, P V, partial out), so four times the
# CTAs with a quarter of the heads each finish sooner. H100, flash dims, context 1 024, attention + rotating combine
# (docs/PERF.md, session 29): window 7.43 -> 5.96 us, HCA 8.14 -> 6.93, CSA 12.28 -> 11.52; CSA layers lose from 4
# tokens on. Inside a decode layer the gain is within the run-to-run spread (0.995-1.001x the layer time): wo_a
# streams its weights meanwhile. Env DSV4_ATTN_SMALL_HEADS_TOKENS (0: always 32, as before).
SMALL_HEADS_MAX_TOKENS = int(os.environ.get("DSV4_ATTN_SMALL_HEADS_TOKENS", "4"))


def heads_per_cta(h: int, wgmma: bool = False, tokens: int | None = None) -> int:
    """Heads per CTA. The wgmma kernel serves 64 heads per CTA (wgmma's M), so it takes head counts that are a
    multiple of 64. The mma.sync kernel runs 64 heads as 2 groups of 32 (grid: head groups side by side, so the
    second group reads the rows from L2): measured on H100 faster than one group of 64 at batch 16 and 64
    (docs/PERF_ATTENTION.md); at `tokens` <= SMALL_HEADS_MAX_TOKENS as groups of 16."""
    if wgmma and h % 64 == 0:
        return 64
    if h <= 16 or (tokens is not None and tokens <= SMALL_HEADS_MAX_TOKENS):
        return 16
    return 32


# The wgmma kernel's 64-head CTAs win once there are enough of them, and enough tiles per token, to fill the GPU
# with cluster-merged splits. H100 (docs/PERF.md, session 19): batch 64 with 6-10 tiles per token 30.8-37.1 vs
# 38.2-39.6 us for the mma.sync kernel, but 3 tiles (short HCA lists) 20.5-21.5 vs 19.9-20.4; batch 1 20.4 vs
# 16.8-17.9, batch 16 about equal. So: at least 32 (token, 64-head group) pairs and 4 tiles of 64 rows. Short lists
# take it from 128 pairs up (session 20, HCA 3 tiles, batch 128 / 256: 30.0-31.7 / 50.9-54.3 us vs 34.5-35.9 /
# 60.0-60.5 on mma.sync; batch 64 still 20.7-21.5 vs 20.0-20.2).
WGMMA_MIN_GROUPS = 32
WGMMA_MIN_ROWS = 4 * 64 - 63
WGMMA_MIN_GROUPS_SHORT = 128


def use_wgmma(device: torch.device, T: int, H: int, d: int, max_rows: int, block_n: int = 64) -> bool:
    groups = T * (H // 64)
    return (wgmma_supported(device, d, block_n) and H % 64 == 0 and groups >= WGMMA_MIN_GROUPS
            and (max_rows >= WGMMA_MIN_ROWS or groups >= WGMMA_MIN_GROUPS_SHORT))


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def wgmma_supported(device: torch.device, d: int, block_n: int = 64) -> bool:
    """The warpgroup-MMA decode kernel: sm_90 only (wgmma is Hopper's; Blackwell needs its own path), d / 2 within
    one wgmma's n (<= 256), tiles of a multiple of 32 rows. DSV4_ATTN_WGMMA=0 keeps the mma.sync kernel."""
    return (WGMMA and device.type == "cuda" and _is_sm90(device.index if device.index is not None else 0)
            and d % 64 == 0 and d // 2 <= 256 and block_n % 32 == 0)


def _max_rows(plan: "AttentionPlan", ratio: int, window: int, csa: bool, topk_entries: Tensor | None) -> int:
    """Longest row list of the step: the window rows plus the compressed entries (CSA: the top-k width, HCA: the
    whole compressed prefix)."""
    if csa:
        n_comp = topk_entries.shape[1]
    elif ratio and ratio != 4:
        n_comp = (plan.max_pos + 1) // ratio
    else:
        n_comp = 0
    return min(plan.max_pos + 1, window) + n_comp


class AttentionPlan:
    """Per-ForwardBatch device tensors shared by all layers of one step (token -> sequence, block tables), and the
    per-step launch decisions (split plans, kernel handles) keyed by layer shape."""

    def __init__(self, batch: ForwardBatch, device: torch.device):
        self._batch = batch
        self._device = device
        self._swa: dict[int, Tensor] = {}
        self.pos = batch.positions.to(device=device, dtype=torch.int32).contiguous()
        self.pos2 = self.pos.view(-1, 1)
        self.num_sms = (_num_sms(device.index if device.index is not None else torch.cuda.current_device())
                        if device.type == "cuda" else 132)
        self.launch_cfg: dict[tuple, Any] = {}
        if batch.decode is not None:
            # decode step: tables already on the device; launch plans sized for the bound on positions (a CUDA
            # graph replays them for every later step of its batch size)
            t = batch.decode
            self.max_pos = t.max_position
            self.seq = t.seq_index
            self.comp_bt = t.comp_block_tables
            self._swa_full = t.swa_block_tables
            return
        self._swa_full = None
        n = [batch.query_start[b + 1] - batch.query_start[b] for b in range(batch.num_seqs)]
        seq = [b for b in range(batch.num_seqs) for _ in range(n[b])]
        self.max_pos = max((batch.seq_len(b) - 1 for b in range(batch.num_seqs) if n[b] > 0), default=0)
        # one host->device copy for the small int32 tables (numpy fill; converting Python ints costs ~40 ns each,
        # so the window table is built lazily with only the columns a window can reach: see swa_table)
        comp_w = max(2, max((len(r) for r in batch.comp_block_tables), default=0))
        B = max(1, batch.num_seqs)
        T = len(seq)
        flat = np.full(T + B * comp_w, -1, dtype=np.int32)
        flat[:T] = seq
        _fill_rows(flat, T, comp_w, batch.comp_block_tables)
        dev_flat = torch.from_numpy(flat).to(device)
        self.seq = dev_flat[:T]
        self.comp_bt = dev_flat[T:].view(B, comp_w)

    def swa_table(self, window: int, block_size: int) -> Tensor:
        """[B, width] window block table holding only the columns of blocks some query of this step can see
        (positions >= first query position - window + 1); the other columns are -1 and never read."""
        if self._swa_full is not None:
            return self._swa_full
        key = (window, block_size)
        t = self._swa.get(key)
        if t is None:
            b = self._batch
            width = max(2, max((len(r) for r in b.swa_block_tables), default=0))
            rows = []
            for i, r in enumerate(b.swa_block_tables):
                lo = max(0, b.context_lens[i] - window + 1) // block_size
                hi = min(len(r), (b.seq_len(i) - 1) // block_size + 1)
                rows.append((lo, r[lo:hi]))
            flat = np.full(max(1, len(rows)) * width, -1, dtype=np.int32)
            for i, (lo, part) in enumerate(rows):
                if part:
                    flat[i * width + lo:i * width + lo + len(part)] = part
            t = self._swa[key] = torch.from_numpy(flat).to(self._device).view(-1, width)
        return t


def _fill_rows(flat: np.ndarray, off: int, width: int, rows: list[list[int]]) -> None:
    lens = [len(r) for r in rows]
    n = sum(lens)
    if n:
        starts = np.repeat(np.arange(len(rows)) * width + off, lens)
        within = np.arange(n) - np.repeat(np.cumsum([0] + lens[:-1]), lens)
        flat[starts + within] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=n)


def _table(rows: list[list[int]], device: torch.device) -> Tensor:
    width = max(2, max((len(r) for r in rows), default=0))
    out = torch.full((max(1, len(rows)), width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    return out.to(device)


def plan_for(batch: ForwardBatch, device: torch.device) -> AttentionPlan:
    """The step's plan, built on first use and kept on the batch object (the engine builds one batch per step)."""
    plan = getattr(batch, "_cute_attention_plan", None)
    if plan is None:
        plan = AttentionPlan(batch, device)
        batch._cute_attention_plan = plan
    return plan


def _workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    from dsv4_kernels.workspace import workspace
    return workspace("attn." + name, numel, dtype, device, min_numel=1 << 16)


# split partials in bf16 halve their bytes but measured slower on H100 (half-sector stores): fp32 by default
PART_BF16 = os.environ.get("DSV4_ATTN_PART_BF16", "0") == "1"
# physical rows looked up once per 16 tiles into shared memory (SparseDecodeAttention.row_table); 0 = per tile
ROW_TABLE = os.environ.get("DSV4_ATTN_ROW_TABLE", "1") != "0"
# 64-head CTAs on warpgroup MMA (attention_decode_wgmma.py) where the head count allows; 0 = mma.sync kernel only
WGMMA = os.environ.get("DSV4_ATTN_WGMMA", "1") != "0"
# wgmma kernel with 2-8 splits: the splits of a token form a thread-block cluster and merge through distributed shared
# memory instead of fp32 partials and a combine kernel; 0 = partials + SplitCombine
CLUSTER = os.environ.get("DSV4_ATTN_CLUSTER", "1") != "0"


def sparse_attention(q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                     sink: Tensor, scale: float, batch: ForwardBatch, plan: AttentionPlan | None = None,
                     num_splits: int | None = None, heads_cta: int | None = None) -> Tensor:
    """The CuTe kernel path of Ops.sparse_attention (BF16 caches, head_dim % 64 == 0)."""
    launch, result = prepare_sparse_attention(q, cache, ratio, window, topk_entries, sink, scale, batch, plan,
                                              num_splits, heads_cta)
    launch()
    return result()


def prepare_sparse_attention(q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                             sink: Tensor, scale: float, batch: ForwardBatch, plan: AttentionPlan | None = None,
                             num_splits: int | None = None, heads_cta: int | None = None,
                             part_bf16: bool | None = None, block_n: int = 64, stages: int = 2,
                             wgmma: bool | None = None, cluster: bool | None = None,
                             out_rope: tuple[Tensor, Tensor, Tensor] | None = None):
    """-> (launch, result): launch() enqueues the kernel(s) on the current stream (what the benchmark times);
    result() returns the [T, H, d] output in q's dtype. `num_splits`, `heads_cta`, `part_bf16`, `wgmma`: overrides
    for tests and sweeps (wgmma=None: the warpgroup-MMA kernel wherever it applies; cluster=None: its splits merge
    in a cluster wherever they fit one). `out_rope` (positions int64 [T], RopeTail's cos / sin tables): where a
    split combine kernel runs, it also rotates the output's RoPE'd tail back (launch.rotated says whether it did;
    elsewhere the caller still has to)."""
    T, H, d = q.shape
    dev = q.device
    plan = plan or plan_for(batch, dev)
    part_bf16 = PART_BF16 if part_bf16 is None else part_bf16
    csa = ratio == 4 and topk_entries is not None
    if wgmma is None:
        wgmma = use_wgmma(dev, T, H, d, _max_rows(plan, ratio, window, csa, topk_entries), block_n)
    M = heads_cta or heads_per_cta(H, wgmma, T)
    wg = M == 64 and wgmma
    Hp = -(-H // M) * M
    early = hoist(T) and sink.dtype == torch.float32 and Hp == H       # the sinks unconverted, unpadded
    ck = (H, d, ratio, window, cache.block_size, topk_entries.shape[1] if csa else 0,
          topk_entries.dtype if csa else None, num_splits, M, part_bf16, block_n, stages, wg, cluster,
          chain_pdl(T), _combine_unroll(), early)
    cfg = plan.launch_cfg.get(ck)
    if cfg is None:
        cfg = plan.launch_cfg[ck] = _launch_config(T, H, d, M, ratio, window, cache.block_size, csa,
                                                   topk_entries, plan, num_splits, part_bf16, dev, block_n,
                                                   stages, wg, CLUSTER if cluster is None else cluster, early)
    fn, cfn, splits, per, mode_tk, in_cluster = cfg
    qk = q if q.dtype == torch.bfloat16 else q.to(torch.bfloat16)
    sk = sink if sink.dtype == torch.float32 else sink.float()
    if Hp != H:
        qk = torch.cat([qk, qk.new_zeros(T, Hp - H, d)], 1)
        sk = torch.cat([sk, sk.new_zeros(Hp - H)])
    if not qk.is_contiguous():
        qk = qk.contiguous()
    tk = plan.pos2
    if csa:
        tk = topk_entries if topk_entries.is_contiguous() else topk_entries.contiguous()
    swa = cache.swa_kv.view(-1, d)
    comp = cache.comp_kv.view(-1, d) if (ratio and cache.comp_kv is not None) else swa
    out = torch.empty((T, Hp, d), dtype=torch.bfloat16, device=dev)
    pdt = torch.bfloat16 if part_bf16 else torch.float32
    if splits > 1 and not in_cluster:
        opart = _workspace("opart", T * splits * Hp * d, pdt, dev).view(T, splits, Hp, d)
        ml = _workspace("ml", T * splits * Hp * 2, torch.float32, dev).view(T, splits, Hp, 2)
    else:
        opart = _workspace("opart", d, pdt, dev).view(1, 1, 1, d)
        ml = _workspace("ml", 2, torch.float32, dev).view(1, 1, 1, 2)
    args = (qk, swa, comp, plan.pos, plan.seq, plan.swa_table(window, cache.block_size), plan.comp_bt, tk, sk, out,
            opart, ml,
            scale * 1.4426950408889634, per, splits)

    rfn = None
    if cfn is not None and out_rope is not None:
        pos, cos, sin = out_rope
        rd = 2 * cos.shape[-1]
        rfn = _rope_combine(d, rd, part_bf16, early, [opart, ml, sk, pos, cos, sin, out, splits])

    def launch():
        fn(*args)
        if rfn is not None:
            rfn(opart, ml, sk, pos, cos, sin, out, splits)
        elif cfn is not None:
            cfn(opart, ml, sk, out, splits)

    def result():
        res = out if Hp == H else out[:, :H]
        return res if q.dtype == torch.bfloat16 else res.to(q.dtype)

    launch.splits = splits
    launch.rotated = rfn is not None
    launch.wgmma = wg
    launch.cluster = in_cluster
    return launch, result


_ATTN_SPEC = (("t", True), ("t", True), ("t", True), ("t", False), ("t", False), ("t", False), ("t", False),
              ("t", False), ("t", False), ("t", True), ("t", True), ("t", False), ("f",), ("i",), ("i",))
_COMBINE_SPEC = (("t", True), ("t", False), ("t", False), ("t", True), ("i",))
_COMBINE_ROPE_SPEC = (("t", True), ("t", False), ("t", False), ("t", False), ("t", False), ("t", False), ("t", True),
                      ("i",))


def _rope_combine(d: int, rope_dim: int, part_bf16: bool, early: bool, example: list) -> Launcher:
    """The split combine with the output's inverse RoPE (dsv4_kernels.attention_decode.SplitCombineRope); `early`:
    its sinks loaded before its wait (hoist)."""
    from dsv4_kernels.attention_decode import SplitCombineRope
    unroll = _combine_unroll()
    key = ("combine_rope", d, rope_dim, part_bf16, unroll, early)
    fn = _LAUNCHERS.get(key)
    if fn is None:
        fn = _LAUNCHERS[key] = Launcher(key, lambda: SplitCombineRope(d, rope_dim, unroll=unroll, hoist=early),
                                        _COMBINE_ROPE_SPEC, example)
    return fn


def _combine_unroll() -> int:
    """The split combine's unroll (dsv4_kernels.attention_decode.COMBINE_UNROLL), read at every launch so that an A/B
    run can switch it (scripts/decode_ab.py combine_serial)."""
    from dsv4_kernels import attention_decode
    return attention_decode.COMBINE_UNROLL


def _launch_config(T, H, d, M, ratio, window, block_size, csa, topk_entries, plan, num_splits, part_bf16, dev,
                   block_n=64, stages=2, wgmma=False, cluster=False, early=False):
    """early: the split combine loads the sinks before its wait (dsv4_kernels.pdl.hoist; only where they are the
    layer's own fp32 tensor, not a copy a kernel of the step writes)."""
    from dsv4_kernels.attention_decode import (MODE_CSA, MODE_HCA, MODE_WINDOW, SparseDecodeAttention,
                                               SplitCombine, plan_splits)
    from dsv4_kernels.attention_decode_wgmma import MAX_CLUSTER, SparseDecodeAttentionWgmma
    Hp = -(-H // M) * M
    if csa:
        mode, topk = MODE_CSA, topk_entries.shape[1]
        tk_ex = topk_entries
    elif ratio and ratio != 4:
        mode, topk = MODE_HCA, 0
        tk_ex = plan.pos2
    else:
        mode, topk = MODE_WINDOW, 0
        tk_ex = plan.pos2
    max_rows = _max_rows(plan, ratio, window, csa, topk_entries)
    G = Hp // M
    tiles = max(1, math.ceil(max_rows / block_n))
    if num_splits is None:
        # merged in a cluster, a split costs no partial traffic: split down to one tile where that fills the GPU
        splits, per = plan_splits(max_rows, T, G, block_n=block_n, num_sms=plan.num_sms,
                                  min_tiles=1 if wgmma and cluster else 2)
        if wgmma and cluster and splits > MAX_CLUSTER:     # fewer, longer splits that fit one cluster
            per = math.ceil(tiles / MAX_CLUSTER)
            splits = math.ceil(tiles / per)
    else:
        per = math.ceil(tiles / num_splits)
        splits = math.ceil(tiles / per)
    in_cluster = wgmma and cluster and 1 < splits <= MAX_CLUSTER
    split = splits > 1 and not in_cluster
    i64 = csa and topk_entries.dtype == torch.int64
    pdt = torch.bfloat16 if part_bf16 else torch.float32
    bf = torch.empty((1, 1, 8), dtype=torch.bfloat16, device=dev)
    ex = [bf, bf[0], bf[0], plan.pos, plan.seq, plan.comp_bt, plan.comp_bt, tk_ex,
          torch.empty(1, dtype=torch.float32, device=dev), bf, torch.empty((1, 1, 1, 8), dtype=pdt, device=dev),
          torch.empty((1, 1, 1, 2), dtype=torch.float32, device=dev), 1.0, 1, 1]
    n_cluster = splits if in_cluster else 1
    pdl = chain_pdl(T)
    key = ("attn", d, M, mode, window, block_size, ratio, topk, split, part_bf16, i64, block_n, stages,
           ROW_TABLE or wgmma, wgmma, n_cluster, pdl)
    r = ratio if ratio else 1
    if wgmma:
        def make():
            return SparseDecodeAttentionWgmma(d, mode, window, block_size, r, topk, split, block_n=block_n,
                                              stages=stages, part_bf16=part_bf16, topk_i64=i64, cluster=n_cluster,
                                              pdl=pdl)
    else:
        def make():
            return SparseDecodeAttention(d, M, mode, window, block_size, r, topk, split, block_n=block_n,
                                         stages=stages, part_bf16=part_bf16, topk_i64=i64, row_table=ROW_TABLE,
                                         pdl=pdl)
    fn = Launcher(key, make, _ATTN_SPEC, ex)
    cfn = None
    if split:
        cex = [ex[10], ex[11], ex[8], bf, 1]
        unroll = _combine_unroll()
        cfn = Launcher(("combine", d, part_bf16, unroll, early), lambda: SplitCombine(d, unroll=unroll, hoist=early),
                       _COMBINE_SPEC, cex)
    return fn, cfn, splits, per, mode, in_cluster


# Short contexts (no more indexer entries than top-k): take every visible entry without scoring them
# (dsv4_kernels.indexer.VisibleEntries). Env DSV4_INDEXER_VISIBLE_SHORTCUT=0 scores them first as before session 27
# (A/B runs); read at every call.
VISIBLE_SHORTCUT = os.environ.get("DSV4_INDEXER_VISIBLE_SHORTCUT", "1") != "0"


def indexer_topk(q: Tensor, head_weights: Tensor, index_k: Tensor, block_size: int, topk: int,
                 batch: ForwardBatch, plan: AttentionPlan | None = None, head_scale: float = 1.0) -> Tensor:
    """The CuTe path of Ops.indexer_topk: [T, topk] int64 entry numbers in no particular order, -1 where fewer than
    topk entries are visible (TorchOps' selection, which it returns best first). The heads' weights are
    head_weights.float() * head_scale, computed only where the entries are scored."""
    from dsv4_kernels.indexer import INT64_MIN, IndexerScores

    T, nh, dk = q.shape
    dev = q.device
    plan = plan or plan_for(batch, dev)
    width = (plan.max_pos + 1) // 4
    if 0 < width <= topk and T and VISIBLE_SHORTCUT:
        # every entry fits (the step's positions, or in a graph those it was captured for, reach at most 4 x topk):
        # no selection, so no scores either, only the entries each query may see
        result = torch.empty((T, topk), dtype=torch.long, device=dev)
        key = ("visible", chain_pdl(T))
        fn = _LAUNCHERS.get(key)
        if fn is None:
            from dsv4_kernels.indexer import VisibleEntries
            fn = _LAUNCHERS[key] = Launcher(key, lambda: VisibleEntries(key[1]),
                                            (("t", False), ("t", False), ("i",)), [plan.pos, result, width])
        fn(plan.pos, result, width)
        return result
    result = torch.full((T, topk), -1, dtype=torch.long, device=dev)
    if width == 0 or T == 0:
        return result
    M = 16 if nh <= 16 else (32 if nh <= 32 else 64)      # all heads in one CTA (the sum runs over them)
    qk = q if q.dtype == torch.bfloat16 else q.to(torch.bfloat16)
    w = head_weights.float() * head_scale
    if M != nh:
        qk = torch.cat([qk, qk.new_zeros(T, M - nh, dk)], 1)
        w = torch.cat([w, w.new_zeros(T, M - nh)], 1)
    qk = qk if qk.is_contiguous() else qk.contiguous()
    w = w if w.is_contiguous() else w.contiguous()
    keys = _workspace("idxkeys", T * width, torch.int64, dev).view(T, width)
    pool = index_k.view(-1, dk)
    fkey = ("idxlaunch", dk, M, block_size)
    fn = plan.launch_cfg.get(fkey)
    if fn is None:
        bf = torch.empty((1, 1, 8), dtype=torch.bfloat16, device=dev)
        ex = [bf, torch.empty((1, 1), dtype=torch.float32, device=dev), bf[0], plan.pos, plan.seq, plan.comp_bt,
              torch.empty((1, 1), dtype=torch.int64, device=dev)]
        spec = (("t", True), ("t", False), ("t", True), ("t", False), ("t", False), ("t", False), ("t", False))
        fn = plan.launch_cfg[fkey] = Launcher(("indexer", dk, M, block_size),
                                              lambda: IndexerScores(dk, M, block_size), spec, ex)
    fn(qk, w, pool, plan.pos, plan.seq, plan.comp_bt, keys)
    if width <= topk:          # only with VISIBLE_SHORTCUT off: the same entries, from the scores' keys
        ent = torch.arange(width, device=dev).expand(T, width)
        result[:, :width] = ent.masked_fill(keys == INT64_MIN, -1)
        return result
    # unsorted: attention takes the entries in any order, and torch's sort of the k winners (a radix sort, 26 us of
    # a 43 us top-k at batch 1) bought nothing. The keys are unique, so the set is the one a stable sort selects.
    vals, idx = torch.topk(keys, topk, dim=1, largest=True, sorted=False)
    result[:] = idx.masked_fill_(vals == INT64_MIN, -1)
    return result


def store_window_kv(kv: Tensor, cache: LayerCache, batch: ForwardBatch) -> None:
    from dsv4_kernels.kv_write import KVScatter

    d = kv.shape[-1]
    src = kv if kv.dtype == cache.swa_kv.dtype else kv.to(cache.swa_kv.dtype)
    src = src if src.is_contiguous() else src.contiguous()
    slots = batch.swa_slot_mapping
    if slots.dtype != torch.int64 or slots.device != kv.device or not slots.is_contiguous():
        slots = slots.to(device=kv.device, dtype=torch.int64).contiguous()
    pool = cache.swa_kv.view(-1, d)
    key = ("kvw", d, chain_pdl(src.shape[0]))
    fn = _LAUNCHERS.get(key)
    if fn is None:
        fn = _LAUNCHERS[key] = Launcher(key, lambda: KVScatter(d, key[2]), (("t", True), ("t", False), ("t", True)),
                                        [src, slots, pool])
    fn(src, slots, pool)


def store_window_kv_fp8(kv: Tensor, cache: LayerCache, batch: ForwardBatch) -> None:
    """store_window_kv into a pool of FP8 rows (dsv4_kernels.kv_write.KVScatterFp8, bit-exact with
    Fp8Rows.quantize)."""
    from dsv4_kernels.kv_write import KVScatterFp8

    rows = cache.kv_rows
    src = kv.reshape(-1, rows.dim)
    src = src if src.is_contiguous() else src.contiguous()
    slots = batch.swa_slot_mapping
    if slots.dtype != torch.int64 or slots.device != kv.device or not slots.is_contiguous():
        slots = slots.to(device=kv.device, dtype=torch.int64).contiguous()
    pool = cache.swa_kv.view(-1, rows.row_bytes)
    key = ("kvw8", rows.dim, rows.rope_dim, src.dtype)
    fn = _LAUNCHERS.get(key)
    if fn is None:
        fn = _LAUNCHERS[key] = Launcher(key, lambda: KVScatterFp8(rows.dim, rows.rope_dim, rows.row_bytes),
                                        (("t", True), ("t", False), ("t", False)), [src, slots, pool])
    fn(src, slots, pool)


def fp8_write_supported(kv: Tensor, cache: LayerCache) -> bool:
    rows = cache.kv_rows
    return (rows is not None and kv.is_cuda and kv.dtype in (torch.bfloat16, torch.float32) and kv.shape[0] > 0
            and kv.shape[-1] == rows.dim and rows.nope % 64 == 0 and rows.rope_dim % 8 == 0)


_LAUNCHERS: dict[tuple, Launcher] = {}
_PLACEHOLDERS: dict[tuple, Tensor] = {}


def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero tensor for an argument the compiled kernel variant never reads (a norm without weight, the bias of a
    hash-routed gate): one per (shape, dtype, device), kept, so that a captured decode step allocates nothing."""
    key = (shape, dtype, device)
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = _PLACEHOLDERS[key] = torch.zeros(shape, dtype=dtype, device=device)
    return t




def supported(q_or_kv: Tensor, cache: LayerCache) -> bool:
    return (q_or_kv.is_cuda and cache.swa_kv.dtype == torch.bfloat16 and q_or_kv.shape[-1] % 64 == 0)


def indexer_supported(q: Tensor, index_k: Tensor | None) -> bool:
    return (q.is_cuda and index_k is not None and index_k.dtype == torch.bfloat16 and q.dim() == 3
            and q.shape[-1] % 64 == 0 and q.shape[1] <= 64)


class CuteAttentionMixin:
    """Mix in ahead of TorchOps: class CuteOps(CuteAttentionMixin, TorchOps)."""

    def store_window_kv(self, kv: Tensor, cache: LayerCache, batch: ForwardBatch) -> None:
        if supported(kv, cache) and kv.shape[0] > 0:
            return store_window_kv(kv, cache, batch)
        if getattr(self, "fused_glue", False) and fp8_write_supported(kv, cache):
            return store_window_kv_fp8(kv, cache, batch)
        return super().store_window_kv(kv, cache, batch)

    def sparse_attention(self, q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                         sink: Tensor, scale: float, batch: ForwardBatch,
                         out_rope: tuple[RopeConfig, int] | None = None) -> Tensor:
        """With `out_rope`, where the attention ends in a split combine, that kernel also rotates the output back
        (one launch less on the decode chain); elsewhere rope_tail does."""
        if not (supported(q, cache) and q.shape[0] > 0):
            return super().sparse_attention(q, cache, ratio, window, topk_entries, sink, scale, batch, out_rope)
        tables = None
        pos = batch.positions
        if out_rope is not None and pos.is_cuda and pos.dtype == torch.long and q.dtype == torch.bfloat16:
            pos = pos if pos.is_contiguous() else pos.contiguous()
            tables = (pos,) + tuple(self.rope_table(out_rope[0], out_rope[1], pos))
        launch, result = prepare_sparse_attention(q, cache, ratio, window, topk_entries, sink, scale, batch,
                                                  out_rope=tables)
        launch()
        o = result()
        if out_rope is not None and not launch.rotated:
            o = self.rope_tail(o, batch.positions, out_rope[0], out_rope[1], inverse=True)
        return o

    def indexer_topk(self, q: Tensor, head_weights: Tensor, index_k: Tensor, block_size: int, topk: int,
                     batch: ForwardBatch, key_rows: Any = None, head_scale: float = 1.0) -> Tensor:
        if key_rows is None and indexer_supported(q, index_k):
            return indexer_topk(q, head_weights, index_k, block_size, topk, batch, head_scale=head_scale)
        return super().indexer_topk(q, head_weights, index_k, block_size, topk, batch, key_rows, head_scale)
