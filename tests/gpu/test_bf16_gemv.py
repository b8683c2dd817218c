"""BF16 decode GEMV (dsv4_kernels.bf16_gemv) on the GPU against x @ W^T in float64 (fresh random inputs, NaN-poisoned
outputs), through the PDL chain and without it, and replayed in a CUDA graph.

Tolerance: the kernel multiplies bf16 weights by bf16 x (exact fp32 products), sums them in fp32 in its own order
(split partials summed by the split reduce) and rounds y to bf16 once. So |y - ref| <= 2^-9 |ref| (we allow 2^-8)
plus the fp32 summation error, which we bound by 2^-18 * sum_k |w x| (as tests/gpu/test_fp8_gemm.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # module-level skip: CPU CI reports these as skipped, never as passed
    pytest.skip("no CUDA device: the CuTe DSL kernels need a Hopper GPU", allow_module_level=True)

from dsv4_kernels import bf16_gemv as B  # noqa: E402
from dsv4_kernels import pdl  # noqa: E402

DEV = torch.device("cuda")
# V4-Flash CSA / HCA compressors, the indexer's compressor and weights_proj, V4-Pro's, the small preset's, odd ones
SHAPES = [(1024, 4096), (512, 4096), (256, 4096), (64, 4096), (1024, 7168), (256, 7168), (64, 7168),
          (1024, 1024), (16, 1024), (16, 64), (48, 192), (2048, 4096)]
MS = [1, 2, 5, 8, 9, 16, 33, 64]


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, what: str) -> None:
    assert torch.isfinite(y).all(), f"{what}: NaN/Inf in the output (unwritten rows)"
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    bound = 2.0 ** -8 * ref.abs() + 2.0 ** -18 * mag + 1e-30
    err = (y.double() - ref).abs()
    assert not (err > bound).any(), f"{what}: worst |err| / bound {float((err / bound).max()):.2f}"


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("chain", [True, False])
def test_the_gemv_matches_float64_for_every_row_count(n, k, chain, monkeypatch):
    monkeypatch.setattr(pdl, "CHAIN", chain)
    g = torch.Generator(device=DEV).manual_seed(n + k)
    w = (torch.randn(n, k, device=DEV, generator=g) * k ** -0.5).to(torch.bfloat16)
    w[0, :64] = 0
    pw = B.prepare_bf16_weight(w)
    for m in MS:
        x = torch.randn(m, k, device=DEV, generator=g).to(torch.bfloat16)
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
        B.bf16_linear(x, pw, out=out)
        torch.cuda.synchronize()
        check(out, x, w, f"n={n} k={k} m={m} chain={chain}")


def test_more_rows_than_the_gemv_takes_go_to_cublas_on_the_dense_weight():
    w = torch.randn(256, 1024, device=DEV).to(torch.bfloat16)
    x = torch.randn(65, 1024, device=DEV).to(torch.bfloat16)
    assert torch.equal(B.bf16_linear(x, B.prepare_bf16_weight(w)), x @ w.T)


def test_the_gemv_replays_in_a_cuda_graph():
    w = torch.randn(1024, 4096, device=DEV).to(torch.bfloat16)
    pw = B.prepare_bf16_weight(w)
    x = torch.randn(1, 4096, device=DEV).to(torch.bfloat16)
    B.bf16_linear(x, pw)                         # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = B.bf16_linear(x, pw)
    x.copy_(torch.randn_like(x))
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(y, x, w, "graph replay")
