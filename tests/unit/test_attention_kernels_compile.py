"""Every attention-side CuTe DSL kernel variant compiles for sm_90a on the CPU (CUTE_DSL_ARCH=sm_90a)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import cutlass  # noqa: E402  - a hard requirement: CI must compile every kernel, never skip
import cutlass.cute as cute  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream  # noqa: E402

from dsv4_kernels.attention_decode import (MODE_CSA, MODE_HCA, MODE_WINDOW, SparseDecodeAttention,  # noqa: E402
                                           SplitCombine, plan_splits)
from dsv4_kernels.kv_write import KVScatter  # noqa: E402

BF, I32, I64, F32 = cutlass.BFloat16, cutlass.Int32, cutlass.Int64, cutlass.Float32


def _fake(dtype, rank, rows=True):
    shape = tuple(cute.sym_int(divisibility=8 if (rows and i == rank - 1) else 1) for i in range(rank))
    return make_fake_compact_tensor(dtype, shape, stride_order=tuple(range(rank - 1, -1, -1)),
                                    assumed_align=16 if rows else dtype.width // 8)


@pytest.mark.parametrize("d,M,mode,split", [
    (512, 16, MODE_CSA, True), (512, 16, MODE_HCA, False), (512, 16, MODE_WINDOW, True),
    (512, 32, MODE_HCA, True), (512, 64, MODE_CSA, True), (512, 64, MODE_HCA, False),
    (512, 64, MODE_WINDOW, False), (64, 16, MODE_CSA, False), (64, 16, MODE_HCA, True),
])
def test_sparse_attention_compiles(d, M, mode, split):
    k = SparseDecodeAttention(d, M, mode, 128, 128, 4 if mode == MODE_CSA else 128, 64, split)
    assert k.smem_bytes() <= 227 * 1024
    cute.compile(k, _fake(BF, 3), _fake(BF, 2), _fake(BF, 2), _fake(I32, 1, False), _fake(I32, 1, False),
                 _fake(I32, 2, False), _fake(I32, 2, False), _fake(I32, 2, False), _fake(F32, 1, False),
                 _fake(BF, 3), _fake(F32, 4), _fake(F32, 4, False), F32(0.1), I32(1), I32(1), make_fake_stream())


@pytest.mark.parametrize("d", [64, 512])
def test_split_combine_compiles(d):
    cute.compile(SplitCombine(d), _fake(F32, 4), _fake(F32, 4, False), _fake(F32, 1, False), _fake(BF, 3), I32(2),
                 make_fake_stream())


@pytest.mark.parametrize("d", [64, 512])
def test_kv_scatter_compiles(d):
    cute.compile(KVScatter(d), _fake(BF, 2), _fake(I64, 1, False), _fake(BF, 2), make_fake_stream())


def test_plan_splits_fills_gpu():
    assert plan_splits(640, 1, 1) == (5, 2)          # batch 1: two tiles per split
    s, per = plan_splits(65536 // 128 + 128, 1, 1)
    assert s * per >= (640 + 63) // 64 and s > 1
    assert plan_splits(640, 64, 1) == (2, 5)          # best measured split count at batch 64, H=64
    assert plan_splits(640, 300, 1)[0] == 1           # 300 CTAs already fill the GPU
