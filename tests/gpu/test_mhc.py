"""The mHC coefficient kernel (CuteOps.hc_pre) vs TorchOps.hc_pre on random streams, outputs poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI compiles the kernel (tests/unit/test_attention_kernels_compile.py)",
                allow_module_level=True)

from dsv4.ops.cute import CuteOps, _hc_launcher  # noqa: E402
from dsv4.ops.torch_ops import TorchOps  # noqa: E402


def _inputs(T, n, D, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    streams = torch.randn((T, n, D), device="cuda", generator=g).to(torch.bfloat16)
    m = 2 * n + n * n
    fn = torch.randn((m, n * D), device="cuda", generator=g) / (n * D) ** 0.5
    scale = torch.rand(3, device="cuda", generator=g) + 0.5
    base = torch.randn(m, device="cuda", generator=g)
    base[2 * n:].view(n, n).diagonal().add_(2.0)
    return streams, fn, scale, base


@pytest.mark.parametrize("T", [1, 7, 64, 129, 1000])
@pytest.mark.parametrize("n,D,iters", [(4, 1024, 20), (4, 4096, 20), (2, 256, 3)])
def test_hc_pre_matches_torch(T, n, D, iters):
    streams, fn, scale, base = _inputs(T, n, D, seed=T * 31 + D)
    want = TorchOps("cuda", torch.bfloat16).hc_pre(streams, fn, scale, base, 1e-6, iters, 1e-6)
    got = CuteOps("cuda", torch.bfloat16).hc_pre(streams, fn, scale, base, 1e-6, iters, 1e-6)
    for name, a, b in zip(("x", "post", "comb"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a.float()).all(), name
        tol = 1e-2 if name == "x" else 1e-5
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol), \
            f"{name}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}"


def test_every_output_element_is_written():
    T, n = 300, 4
    mixes = torch.randn((T, 2 * n + n * n), device="cuda")
    sq = torch.rand(T, device="cuda") + 0.1
    scale, base = torch.ones(3, device="cuda"), torch.zeros(2 * n + n * n, device="cuda")
    outs = [torch.full((T, k), float("nan"), device="cuda") for k in (n, n, n * n)]
    _hc_launcher(n, 20, 1e-6, 1e-6, mixes, sq, scale, base, *outs)(mixes, sq, scale, base, *outs)
    torch.cuda.synchronize()
    assert all(torch.isfinite(o).all() for o in outs)
    comb = outs[2].view(T, n, n)
    assert torch.allclose(comb.sum(-2), torch.ones(T, n, device="cuda"), atol=1e-4)   # columns end normalised
