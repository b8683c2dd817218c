"""NVFP4 W4A16 GEMM on the GPU against the dequantised torch reference (fresh random inputs, poisoned outputs)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # module-level skip: CPU CI reports these as skipped, never as passed
    pytest.skip("no CUDA device: the CuTe DSL kernels need a Hopper GPU", allow_module_level=True)

from dsv4.checkpoint.formats import NVFP4Tensor, quantize_nvfp4  # noqa: E402
from dsv4_kernels import nvfp4_gemm as G  # noqa: E402

DEV = torch.device("cuda")
# (N, K) of V4-Flash / V4-Pro projections (wq_a, wq_b, wkv, wo_b, experts, shared, index heads) and small ones
SHAPES = [(1024, 4096), (512, 4096), (4096, 8192), (2048, 4096), (4096, 2048), (64, 4096), (1536, 7168),
          (7168, 16384), (3072, 7168), (7168, 3072), (32768, 1024), (128, 256), (1024, 1536)]
MS = [1, 2, 3, 5, 8, 13, 16, 31, 32, 47, 64, 65, 100, 128, 777, 4096]


def rand_weight(n: int, k: int, gen: torch.Generator) -> NVFP4Tensor:
    w = torch.randn(n, k, device=DEV, generator=gen) * torch.rand(n, 1, device=DEV, generator=gen).add(0.05)
    # some structure: a few blocks of tiny / zero values so subnormal and zero scales occur
    w[: max(1, n // 64), :16] = 0
    w[1, 16:32] *= 1e-6
    return quantize_nvfp4(w)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("n,k", SHAPES)
def test_dequant_kernel_exact(n, k):
    gen = torch.Generator(device=DEV).manual_seed(n * 7 + k)
    q = rand_weight(n, k, gen)
    pw = G.prepare_nvfp4_weight(q)
    ref = q.dequantize(torch.float32).to(torch.bfloat16)
    w = G.dequantize_packed(pw)
    assert torch.equal(w, ref), f"dequant kernel differs from torch in {(w != ref).sum().item()} elements"


@pytest.mark.parametrize("n,k", SHAPES)
def test_gemm_against_reference(n, k):
    gen = torch.Generator(device=DEV).manual_seed(n + 13 * k)
    q = rand_weight(n, k, gen)
    pw = G.prepare_nvfp4_weight(q)
    wref = q.dequantize(torch.float32)
    ms = MS if n * k <= 8192 * 4096 else [1, 8, 16, 64, 512]
    for m in ms:
        for path in ("gemv", "dequant") if m <= G.GEMV_MAX_M else ("dequant",):
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)   # poison
            G.nvfp4_linear(x, pw, out=y, force=path)
            torch.cuda.synchronize()
            assert torch.isfinite(y).all(), f"NaN/Inf in output (M={m}, path {path}): unwritten or overflow"
            ref = x.float() @ wref.T
            err = rel_err(y, ref)
            assert err < 1e-2, f"M={m} N={n} K={k} path={path}: relative error {err:.3e}"


@pytest.mark.parametrize("n,k", [(512, 4096), (1024, 1536), (64, 4096)])
@pytest.mark.parametrize("fused_max", [0, 1024])
def test_split_k_variants(n, k, fused_max):
    """Split-K through the partials + reduce kernel (0) and always through the single-launch last-warp reduce,
    repeated calls (the per-tile counters must reset themselves)."""
    gen = torch.Generator(device=DEV).manual_seed(n + k + fused_max)
    q = rand_weight(n, k, gen)
    pw = G.prepare_nvfp4_weight(q)
    wref = q.dequantize(torch.float32)
    old = G.FUSED_MAX
    try:
        G.FUSED_MAX = fused_max
        for m in (1, 7, 16, 33, 64):
            for _ in range(3):
                x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
                y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
                G.nvfp4_linear(x, pw, out=y, force="gemv")
                torch.cuda.synchronize()
                assert torch.isfinite(y).all()
                err = rel_err(y, x.float() @ wref.T)
                assert err < 1e-2, f"M={m} N={n} K={k} fused_max={fused_max}: relative error {err:.3e}"
        assert int(pw.cache["ctr"].abs().sum()) == 0, "split-K counters not reset"
    finally:
        G.FUSED_MAX = old


def test_shape_and_dtype_errors():
    gen = torch.Generator(device=DEV).manual_seed(1)
    pw = G.prepare_nvfp4_weight(rand_weight(128, 256, gen))
    with pytest.raises(ValueError, match="K=128"):
        G.nvfp4_linear(torch.zeros(2, 128, dtype=torch.bfloat16, device=DEV), pw)
    with pytest.raises(TypeError, match="bfloat16"):
        G.nvfp4_linear(torch.zeros(2, 256, dtype=torch.float32, device=DEV), pw)
    with pytest.raises(ValueError, match="multiple"):
        G.prepare_nvfp4_weight(quantize_nvfp4(torch.randn(100, 256)))


def test_leading_dims_and_empty():
    gen = torch.Generator(device=DEV).manual_seed(2)
    q = rand_weight(256, 512, gen)
    pw = G.prepare_nvfp4_weight(q)
    x = torch.randn(3, 5, 512, device=DEV, generator=gen).to(torch.bfloat16)
    y = G.nvfp4_linear(x, pw)
    assert y.shape == (3, 5, 256)
    assert rel_err(y, x.float() @ q.dequantize().cuda().T) < 1e-2
    assert G.nvfp4_linear(torch.empty(0, 512, dtype=torch.bfloat16, device=DEV), pw).shape == (0, 256)


def test_cuda_graph_capture():
    gen = torch.Generator(device=DEV).manual_seed(3)
    q = rand_weight(1024, 4096, gen)
    pw = G.prepare_nvfp4_weight(q)
    G.warmup(pw, (4,))
    x = torch.randn(4, 4096, device=DEV, generator=gen).to(torch.bfloat16)
    y = torch.empty(4, 1024, dtype=torch.bfloat16, device=DEV)
    G.nvfp4_linear(x, pw, out=y)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        G.nvfp4_linear(x, pw, out=y)
    x.copy_(torch.randn(4, 4096, device=DEV, generator=gen).to(torch.bfloat16))
    y.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, x.float() @ q.dequantize().cuda().T) < 1e-2


@pytest.mark.parametrize("n,k", [(512, 4096), (4096, 8192), (32768, 1024), (7168, 16384)])
def test_programmatic_dependent_launch_chain_is_bit_identical(n, k):
    """With PDL the decode kernel issues weight loads before it waits for the kernel that writes x: a chain where
    each GEMV reads the previous one's output (written by its split reduce) must give bit-identical results with
    PDL on and off, eagerly and replayed from a CUDA graph, for 4, 16 and the rule's chunks of loads in flight."""
    gen = torch.Generator(device=DEV).manual_seed(n ^ k)
    w1 = G.prepare_nvfp4_weight(rand_weight(n, k, gen))
    w2 = G.prepare_nvfp4_weight(rand_weight(k, n, gen))
    x = torch.randn(4, k, device=DEV, generator=gen).to(torch.bfloat16)

    def chain():
        h = G.nvfp4_linear(x * 2, w1)           # x * 2: a torch kernel right before the first GEMV
        return G.nvfp4_linear(h, w2)

    old = G.GEMV_PDL, G.GEMV_UNROLL
    try:
        results = {}
        for unroll in (4, 16, 0):          # 0: the automatic rule
            for pdl in (False, True):
                G.GEMV_PDL, G.GEMV_UNROLL = pdl, unroll
                w1.cache.clear()
                w2.cache.clear()
                G.warmup(w1, (4,))
                G.warmup(w2, (4,))
                eager = chain()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = chain()
                out.fill_(float("nan"))
                g.replay()
                torch.cuda.synchronize()
                assert torch.isfinite(eager).all() and torch.equal(out, eager)
                results[unroll, pdl] = eager
        base = results[4, False]
        for key, y in results.items():
            assert torch.equal(y, base), f"{key} differs from unroll 4 without PDL"
    finally:
        G.GEMV_PDL, G.GEMV_UNROLL = old
        w1.cache.clear()
        w2.cache.clear()
