"""Every attention-side CuTe DSL kernel variant compiles for sm_90a on the CPU (CUTE_DSL_ARCH=sm_90a)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import cutlass  # noqa: E402  - a hard requirement: CI must compile every kernel, never skip
import cutlass.cute as cute  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream  # noqa: E402

from dsv4_kernels.attention_decode import (MODE_CSA, MODE_HCA, MODE_WINDOW, SparseDecodeAttention,  # noqa: E402
                                           SplitCombine, SplitCombineRope, plan_splits)
from dsv4_kernels.attention_decode_wgmma import SparseDecodeAttentionWgmma  # noqa: E402
from dsv4_kernels.gather_read import GatherRead  # noqa: E402
from dsv4_kernels.indexer import IndexerScores, VisibleEntries  # noqa: E402
from dsv4_kernels.kv_write import KVScatter  # noqa: E402
from dsv4_kernels.mhc import HcCoefficients  # noqa: E402
from dsv4_kernels.mhc_pre import HcCollapse, HcMix  # noqa: E402
from dsv4_kernels.rope import RopeTail  # noqa: E402

BF, I32, I64, F32 = cutlass.BFloat16, cutlass.Int32, cutlass.Int64, cutlass.Float32


def _fake(dtype, rank, rows=True):
    shape = tuple(cute.sym_int(divisibility=8 if (rows and i == rank - 1) else 1) for i in range(rank))
    return make_fake_compact_tensor(dtype, shape, stride_order=tuple(range(rank - 1, -1, -1)),
                                    assumed_align=16 if rows else dtype.width // 8)


@pytest.mark.parametrize("d,M,mode,split,part_bf16,i64,table", [
    (512, 16, MODE_CSA, True, True, True, True), (512, 16, MODE_HCA, False, True, False, True),
    (512, 16, MODE_WINDOW, True, False, False, True), (512, 32, MODE_HCA, True, True, False, True),
    (512, 64, MODE_CSA, True, False, False, True), (512, 64, MODE_HCA, False, True, False, True),
    (512, 64, MODE_WINDOW, False, True, False, True), (64, 16, MODE_CSA, False, True, True, True),
    (64, 16, MODE_HCA, True, True, False, True), (512, 64, MODE_CSA, True, False, True, False),
    (512, 32, MODE_HCA, False, True, False, False),
])
def test_sparse_attention_compiles(d, M, mode, split, part_bf16, i64, table):
    k = SparseDecodeAttention(d, M, mode, 128, 128, 4 if mode == MODE_CSA else 128, 64, split, part_bf16=part_bf16,
                              topk_i64=i64, row_table=table)
    assert k.smem_bytes() <= 227 * 1024
    cute.compile(k, _fake(BF, 3), _fake(BF, 2), _fake(BF, 2), _fake(I32, 1, False), _fake(I32, 1, False),
                 _fake(I32, 2, False), _fake(I32, 2, False), _fake(I64 if i64 else I32, 2, False),
                 _fake(F32, 1, False), _fake(BF, 3), _fake(BF if part_bf16 else F32, 4), _fake(F32, 4, False),
                 F32(0.1), I32(1), I32(1), make_fake_stream())


@pytest.mark.parametrize("d,mode,split,part_bf16,i64,block_n,stages,cluster", [
    (512, MODE_CSA, True, False, True, 64, 2, 1), (512, MODE_CSA, False, False, False, 64, 2, 1),
    (512, MODE_HCA, True, True, False, 64, 2, 1), (512, MODE_WINDOW, False, False, False, 64, 2, 1),
    (512, MODE_HCA, True, False, False, 32, 4, 1), (128, MODE_CSA, True, False, False, 64, 2, 1),
    (512, MODE_CSA, False, False, True, 64, 2, 2), (512, MODE_HCA, False, False, False, 32, 4, 5),
    (128, MODE_WINDOW, False, False, False, 64, 2, 8),
])
def test_sparse_attention_wgmma_compiles(d, mode, split, part_bf16, i64, block_n, stages, cluster):
    k = SparseDecodeAttentionWgmma(d, mode, 128, 128, 4 if mode == MODE_CSA else 128, 64, split, block_n=block_n,
                                   stages=stages, part_bf16=part_bf16, topk_i64=i64, cluster=cluster)
    assert k.smem_bytes() <= 227 * 1024
    cute.compile(k, _fake(BF, 3), _fake(BF, 2), _fake(BF, 2), _fake(I32, 1, False), _fake(I32, 1, False),
                 _fake(I32, 2, False), _fake(I32, 2, False), _fake(I64 if i64 else I32, 2, False),
                 _fake(F32, 1, False), _fake(BF, 3), _fake(BF if part_bf16 else F32, 4), _fake(F32, 4, False),
                 F32(0.1), I32(1), I32(1), make_fake_stream())


@pytest.mark.parametrize("d", [64, 512])
@pytest.mark.parametrize("pdt", [F32, BF])
@pytest.mark.parametrize("unroll", [1, 4])
def test_split_combine_compiles(d, pdt, unroll):
    cute.compile(SplitCombine(d, unroll=unroll), _fake(pdt, 4), _fake(F32, 4, False), _fake(F32, 1, False), _fake(BF, 3), I32(2),
                 make_fake_stream())


@pytest.mark.parametrize("d,rd", [(64, 16), (512, 64)])
@pytest.mark.parametrize("pdt", [F32, BF])
def test_split_combine_with_the_inverse_rope_compiles(d, rd, pdt):
    cute.compile(SplitCombineRope(d, rd), _fake(pdt, 4), _fake(F32, 4, False), _fake(F32, 1, False),
                 _fake(I64, 1, False), _fake(F32, 2, False), _fake(F32, 2, False), _fake(BF, 3), I32(2),
                 make_fake_stream())


def test_a_few_tokens_get_16_heads_a_cta_more_get_32_and_the_wgmma_kernel_64():
    from dsv4.ops.cute_attention import SMALL_HEADS_MAX_TOKENS, heads_per_cta
    assert SMALL_HEADS_MAX_TOKENS >= 1
    assert heads_per_cta(64, tokens=1) == heads_per_cta(64, tokens=SMALL_HEADS_MAX_TOKENS) == 16
    assert heads_per_cta(64, tokens=SMALL_HEADS_MAX_TOKENS + 1) == heads_per_cta(64) == 32
    assert heads_per_cta(128, wgmma=True, tokens=1) == 64 and heads_per_cta(16, tokens=64) == 16


@pytest.mark.parametrize("row_words,rows_per_cta", [(256, 16), (256, 64), (128, 32)])
def test_gather_read_peer_compiles(row_words, rows_per_cta):
    rows = make_fake_compact_tensor(I32, (cute.sym_int(), row_words), stride_order=(1, 0), assumed_align=16)
    cute.compile(GatherRead(row_words, rows_per_cta), rows, _fake(I32, 1, False), _fake(I32, 1, False),
                 make_fake_stream())


def test_gather_read_refuses_rows_it_cannot_split():
    with pytest.raises(ValueError, match="rows_per_cta"):
        GatherRead(256, 6)


@pytest.mark.parametrize("dk,M", [(128, 64), (128, 16), (64, 32)])
def test_indexer_scores_compiles(dk, M):
    cute.compile(IndexerScores(dk, M, 128), _fake(BF, 3), _fake(F32, 2, False), _fake(BF, 2), _fake(I32, 1, False),
                 _fake(I32, 1, False), _fake(I32, 2, False), _fake(I64, 2, False), make_fake_stream())


@pytest.mark.parametrize("pdl", [False, True])
def test_indexer_visible_entries_compiles(pdl):
    cute.compile(VisibleEntries(pdl), _fake(I32, 1, False), _fake(I64, 2, False), I32(512), make_fake_stream())


def test_tvm_ffi_compile_path():
    """The host path the engine uses: fake tensors built from torch dtypes, compiled with --enable-tvm-ffi."""
    pytest.importorskip("tvm_ffi")
    import torch

    from dsv4.ops import cute_attention as ca
    if not ca.TVM_FFI:
        pytest.skip("TVM-FFI disabled by DSV4_CUTE_NO_TVM_FFI")
    bf = torch.empty((1, 1, 8), dtype=torch.bfloat16)
    i32 = torch.empty(1, dtype=torch.int32)
    ex = [bf, bf[0], bf[0], i32, i32, i32.view(1, 1), i32.view(1, 1), torch.empty((1, 1), dtype=torch.int64),
          torch.empty(1), bf, torch.empty((1, 1, 1, 8), dtype=torch.bfloat16), torch.empty((1, 1, 1, 2)), 1.0, 1, 1]
    ca.Launcher(("cpu-test-attn",), lambda: SparseDecodeAttention(512, 64, MODE_CSA, 128, 128, 4, 512, True,
                                                                  topk_i64=True), ca._ATTN_SPEC, ex)


@pytest.mark.parametrize("d", [64, 512])
def test_kv_scatter_compiles(d):
    cute.compile(KVScatter(d), _fake(BF, 2), _fake(I64, 1, False), _fake(BF, 2), make_fake_stream())


@pytest.mark.parametrize("d,rd,row_bytes,dtype", [(512, 64, 584, BF), (128, 64, 200, BF), (512, 64, 584, F32)])
def test_fp8_kv_scatter_compiles(d, rd, row_bytes, dtype):
    from dsv4_kernels.kv_write import KVScatterFp8
    cute.compile(KVScatterFp8(d, rd, row_bytes), _fake(dtype, 2), _fake(I64, 1, False),
                 _fake(cutlass.Uint8, 2, False), make_fake_stream())


@pytest.mark.parametrize("n,iters,partials", [(4, 20, 0), (2, 1, 0), (4, 20, 16), (2, 3, 3)])
def test_mhc_coefficients_compile(n, iters, partials):
    cute.compile(HcCoefficients(n, iters, 1e-6, 1e-6, partials > 0, partials), _fake(F32, 3 if partials else 2, False),
                 _fake(F32, 1, False), _fake(F32, 1, False), _fake(F32, 1, False), _fake(F32, 2, False),
                 _fake(F32, 2, False), _fake(F32, 2, False), F32(1.0), make_fake_stream())


@pytest.mark.parametrize("m,dtype", [(24, BF), (8, BF), (24, F32)])
def test_mhc_mix_compiles(m, dtype):
    cute.compile(HcMix(m), _fake(dtype, 2), _fake(F32, 2), _fake(F32, 3, False), make_fake_stream())


@pytest.mark.parametrize("n,d,partials,dtype", [(4, 4096, 16, BF), (4, 7168, 28, BF), (2, 64, 1, F32)])
@pytest.mark.parametrize("out_norm", [False, True])
def test_mhc_collapse_compiles(n, d, partials, dtype, out_norm):
    if out_norm and d % 256:
        with pytest.raises(ValueError):
            HcCollapse(n, d, partials, 1e-6, 1e-6, 1e-6)
        return
    cute.compile(HcCollapse(n, d, partials, 1e-6, 1e-6, 1e-6 if out_norm else None), _fake(dtype, 2),
                 _fake(F32, 3, False), _fake(F32, 1, False), _fake(F32, 1, False), _fake(F32, 1, False),
                 _fake(dtype, 2), F32(1.0), make_fake_stream())


@pytest.mark.parametrize("d,rd,inverse,dtype", [(512, 64, False, BF), (512, 64, True, BF), (128, 64, False, BF),
                                                (512, 64, False, F32), (64, 16, True, F32)])
def test_rope_tail_compiles(d, rd, inverse, dtype):
    cute.compile(RopeTail(d, rd, inverse), _fake(dtype, 2), _fake(I64, 1, False), _fake(F32, 2, False),
                 _fake(F32, 2, False), _fake(F32, 1, False), _fake(dtype, 2), I32(1), make_fake_stream())


@pytest.mark.parametrize("d,rd,norm,dtype", [(512, 64, "plain", BF), (512, 64, "weight", BF), (256, 64, "weight", F32),
                                             (1024, 64, "plain", BF)])
def test_norm_rope_tail_compiles(d, rd, norm, dtype):
    """The queries' per-head norm and the keys' weighted norm fused ahead of the rotation."""
    cute.compile(RopeTail(d, rd, False, norm, 1e-6), _fake(dtype, 2), _fake(I64, 1, False), _fake(F32, 2, False),
                 _fake(F32, 2, False), _fake(F32, 1, False), _fake(dtype, 2), I32(1), make_fake_stream())


def test_norm_rope_tail_needs_whole_warps():
    with pytest.raises(ValueError):
        RopeTail(128, 64, False, "plain", 1e-6)


def test_plan_splits_fills_gpu():
    assert plan_splits(640, 1, 1) == (10, 1)         # batch 1: one tile per split when it all fits in one wave
    assert plan_splits(640, 1, 2) == (10, 1)
    assert plan_splits(640, 16, 2) == (4, 3)         # batch 16, 2 groups of 32 heads: one wave, >= 2 tiles
    s, per = plan_splits(65536 // 128 + 128, 1, 1)
    assert s * per >= (640 + 63) // 64 and s > 1
    assert plan_splits(640, 64, 2) == (1, 10)         # 128 CTAs already fill the GPU (best measured at batch 64)
    assert plan_splits(640, 300, 1)[0] == 1           # 300 CTAs already fill the GPU


@pytest.mark.parametrize("d,ratio,rd,dtype", [(512, 4, 64, BF), (512, 128, 64, BF), (128, 4, 64, BF),
                                              (64, 4, 16, F32), (64, 128, 16, F32)])
def test_compress_decode_compiles(d, ratio, rd, dtype):
    from dsv4_kernels.compress_decode import CompressDecode
    cute.compile(CompressDecode(d, ratio, rd, 128, 1e-6), _fake(dtype, 2), _fake(dtype, 2), _fake(F32, 2, False),
                 _fake(F32, 1, False), _fake(I64, 1, False), _fake(I64, 1, False), _fake(I32, 2, False),
                 _fake(F32, 3, False), _fake(F32, 3, False), _fake(F32, 2, False), _fake(F32, 2, False),
                 _fake(dtype, 2), make_fake_stream())
