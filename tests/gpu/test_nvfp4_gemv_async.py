"""The cp.async-ring NVFP4 GEMV (up to 16 tokens, large weights) is bit-identical to the register GEMV with the same K
splits, and close to the dequantised reference."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # module-level skip: CPU CI reports these as skipped, never as passed
    pytest.skip("no CUDA device: the CuTe DSL kernels need a Hopper GPU", allow_module_level=True)

from dsv4.checkpoint.formats import quantize_nvfp4  # noqa: E402
from dsv4_kernels import nvfp4_gemm as G  # noqa: E402
from dsv4_kernels import nvfp4_gemv_async as R  # noqa: E402

DEV = torch.device("cuda")


def linear(x, pw, ring: bool):
    old = G.GEMV_RING
    try:
        G.GEMV_RING = ring
        y = torch.full((x.shape[0], pw.n), float("nan"), dtype=torch.bfloat16, device=DEV)   # poisoned
        G.nvfp4_linear(x, pw, out=y, force="gemv")
        torch.cuda.synchronize()
        return y
    finally:
        G.GEMV_RING = old


@pytest.mark.parametrize("n,k,m", [(32768, 1024, 1), (4096, 8192, 1), (65536, 1536, 1), (16384, 2048, 1),
                                   (129280, 4096, 1), (7168, 16384, 1), (7168, 16384, 2), (7168, 16384, 5),
                                   (7168, 16384, 8), (4096, 32768, 3)])
def test_ring_gemv_equals_the_register_gemv(n, k, m):
    gen = torch.Generator(device=DEV).manual_seed(n + k + m)
    pw = G.prepare_nvfp4_weight(quantize_nvfp4(torch.randn(n, k, device=DEV, generator=gen)), DEV)
    splits, _ = G.gemv_plan(n, k)
    assert R.use_ring(n, k, m, splits), "these shapes must take the ring path"
    for trial in range(2):
        x = (torch.randn(m, k, device=DEV, generator=gen) * (1 + trial)).to(torch.bfloat16)
        a, b = linear(x, pw, True), linear(x, pw, False)
        assert torch.isfinite(a.float()).all(), "NaN/Inf (or an unwritten output) from the ring GEMV"
        assert torch.equal(a, b), f"ring != register GEMV at {(a != b).nonzero()[:3].tolist()}"
        ref = x.float() @ G.decode_reference(pw).t()
        err = float((a.float() - ref).norm() / ref.norm())
        assert err < 1e-2, f"relative error {err:.3e} against the dequantised weight"


@pytest.mark.parametrize("n,k,m", [(32768, 1024, 1), (7168, 16384, 6)])
def test_ring_gemv_in_a_cuda_graph(n, k, m):
    pw = G.prepare_nvfp4_weight(quantize_nvfp4(torch.randn(n, k, device=DEV)), DEV)
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    G.warmup(pw, [m])
    want = linear(x, pw, False)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = G.nvfp4_linear(x, pw)
    for _ in range(3):
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, want)


def test_small_weights_and_many_tokens_keep_the_register_gemv():
    assert not R.use_ring(2048, 4096, 1, 4)          # 4 MB: the register GEMV measured faster
    assert not R.use_ring(7168, 16384, R.RING_MAX_M + 1, 4)
    assert not R.use_ring(65536, 1536, 2, 1)         # 24 chunks per warp: the register GEMV is faster
    assert not R.use_ring(129280, 4096, 2, 1)        # 2 020 CTAs: the register GEMV keeps more warps resident
