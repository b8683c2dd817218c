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


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("T", [1, 7, 64, 129, 1000])
@pytest.mark.parametrize("n,D,iters", [(4, 1024, 20), (4, 4096, 20), (4, 7168, 20), (2, 256, 3)])
def test_hc_pre_matches_torch(T, n, D, iters, fused):
    streams, fn, scale, base = _inputs(T, n, D, seed=T * 31 + D)
    want = TorchOps("cuda", torch.bfloat16).hc_pre(streams, fn, scale, base, 1e-6, iters, 1e-6)
    got = CuteOps("cuda", torch.bfloat16, fused_glue=fused).hc_pre(streams, fn, scale, base, 1e-6, iters, 1e-6)
    for name, a, b in zip(("x", "post", "comb"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a.float()).all(), name
        tol = 1e-2 if name == "x" else 1e-5
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol), \
            f"{name}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}"


@pytest.mark.parametrize("T", [1, 300])
def test_prefill_sized_batches_take_the_cublas_mixes(T, monkeypatch):
    """Above HC_MIX_MAX_TOKENS the mixes come from cuBLAS (one partial per token): same results."""
    import dsv4.ops.cute as cute_mod
    monkeypatch.setattr(cute_mod, "HC_MIX_MAX_TOKENS", 0)
    streams, fn, scale, base = _inputs(T, 4, 1024, seed=5)
    want = TorchOps("cuda", torch.bfloat16).hc_pre(streams, fn, scale, base, 1e-6, 20, 1e-6)
    got = CuteOps("cuda", torch.bfloat16, fused_glue=True).hc_pre(streams, fn, scale, base, 1e-6, 20, 1e-6)
    for a, b in zip(got, want):
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_every_output_element_is_written():
    T, n, S = 300, 4, 3
    m = 2 * n + n * n
    part = torch.randn((T, S, m + 1), device="cuda")
    part[:, :, m] = torch.rand((T, S), device="cuda") + 0.1
    scale, base = torch.ones(3, device="cuda"), torch.zeros(m, device="cuda")
    outs = [torch.full((T, k), float("nan"), device="cuda") for k in (n, n, n * n)]
    args = (part, scale, scale, base, *outs)
    _hc_launcher(n, 20, 1e-6, 1e-6, S, *args)(*args, 1.0 / 64)
    torch.cuda.synchronize()
    assert all(torch.isfinite(o).all() for o in outs)


def test_mix_and_collapse_write_every_element():
    from dsv4.ops.cute import _collapse_launcher, _mix_launcher
    from dsv4_kernels.mhc_pre import num_chunks
    T, n, D, m = 37, 4, 1024, 24
    streams, fn, scale, base = _inputs(T, n, D, seed=9)
    flat = streams.reshape(T, n * D)
    part = torch.full((T, num_chunks(n * D), m + 1), float("nan"), device="cuda")
    _mix_launcher(m, flat, fn, part)(flat, fn, part)
    f = flat.float()
    want = torch.cat([f @ fn.T, f.square().sum(-1, keepdim=True)], 1)
    assert torch.allclose(part.sum(1), want, rtol=1e-4, atol=1e-3)
    x = torch.full((T, D), float("nan"), device="cuda").to(torch.bfloat16)
    args = (flat, part, scale, base, torch.ones(8, device="cuda"), x)        # no fused norm: its weight unread
    _collapse_launcher(n, D, part.shape[1], 1e-6, 1e-6, False, *args)(*args, 1.0 / (n * D))
    want_x, _, _ = TorchOps("cuda", torch.bfloat16).hc_pre(streams, fn, scale, base, 1e-6, 20, 1e-6)
    assert torch.isfinite(x.float()).all()
    assert torch.allclose(x.float(), want_x.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("T", [1, 64])
def test_coefficients_piece_on_a_side_stream_gives_what_hc_pre_gives(T):
    """hc_pre_split's coefficient piece, run on another stream after the collapse (as the model runs it beside the
    sub-layer), writes the same bits as hc_pre."""
    streams, fn, scale, base = _inputs(T, 4, 4096, seed=T)
    ops = CuteOps("cuda", torch.bfloat16, fused_glue=True)
    want = ops.hc_pre(streams, fn, scale, base, 1e-6, 20, 1e-6)
    x, coefficients = ops.hc_pre_split(streams, fn, scale, base, 1e-6, 20, 1e-6)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        post, comb = coefficients()
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip((x, post, comb), want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("D", [4096, 7168, 1000])          # 1000: no fused norm (not whole warps), two kernels
def test_collapse_with_the_sub_layer_norm_gives_the_two_kernels_bits(T, D):
    """hc_pre_split(norm_weight=w) folds the sub-layer's RMSNorm into the collapse: the same bits as rms_norm of
    hc_pre's x, and post / comb unchanged."""
    streams, fn, scale, base = _inputs(T, 4, D, seed=T + D)
    w = torch.rand(D, device="cuda") + 0.5
    ops = CuteOps("cuda", torch.bfloat16, fused_glue=True)
    x, post, comb = ops.hc_pre(streams, fn, scale, base, 1e-6, 20, 1e-6)
    want = ops.rms_norm(x, w, 1e-6)
    got, coefficients = ops.hc_pre_split(streams, fn, scale, base, 1e-6, 20, 1e-6, norm_weight=w)
    got_post, got_comb = coefficients()
    assert torch.isfinite(got.float()).all()
    assert torch.equal(got, want), f"max |diff| {(got.float() - want.float()).abs().max().item():.3g}"
    assert torch.equal(got_post, post) and torch.equal(got_comb, comb)
