"""The L2 prefetch kernel compiles for sm_90a on the CPU (CUTE_DSL_ARCH=sm_90a), and refuses what it cannot issue."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import cutlass  # noqa: E402,F401  - a hard requirement: CI must compile every kernel, never skip
import torch  # noqa: E402

from dsv4_kernels import l2_prefetch as lp  # noqa: E402


@pytest.mark.parametrize("chunk,threads", [(lp.CHUNK, lp.THREADS), (4096, 32), (65536, 128)])
def test_l2_prefetch_compiles(chunk, threads):
    lp._COMPILED.clear()
    assert lp.compile_prefetch(chunk, threads) is not None


@pytest.mark.parametrize("chunk,threads", [(0, 32), (100, 32), (4096, 48)])
def test_l2_prefetch_refuses_chunks_it_cannot_issue(chunk, threads):
    with pytest.raises(ValueError, match="multiple of 16"):
        lp.L2Prefetch(chunk, threads)


def test_l2_prefetch_needs_a_cuda_tensor():
    with pytest.raises(ValueError, match="contiguous CUDA tensor"):
        lp.l2_prefetch(torch.zeros(64, dtype=torch.uint8))
