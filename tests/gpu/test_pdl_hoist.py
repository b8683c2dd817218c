"""The chain kernels that load their weights before griddepcontrol.wait (dsv4_kernels.pdl.hoist, one-token steps)
write the same bits as with those loads after it: only the load order changed (RMSNorm, the keys' RoPE with its
weighted norm, the mHC collapse with its norm, the routing's bias, the split combine's sinks). Fresh random inputs per
case, outputs poisoned where the kernel is launched directly."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI compiles the kernels (tests/unit/test_pdl_chain_compile.py)",
                allow_module_level=True)

from dsv4.config import RopeConfig  # noqa: E402
from dsv4.ops.cute import CuteOps  # noqa: E402
from dsv4_kernels import pdl  # noqa: E402

YARN = RopeConfig(theta=160000.0, original_seq_len=4096, factor=16.0, beta_fast=32.0, beta_slow=1.0)
DEV = torch.device("cuda")


def both(monkeypatch, run):
    """run() with the loads before the wait, then after it -> the two results (tuples of tensors)."""
    outs = []
    for early in (True, False):
        monkeypatch.setattr(pdl, "HOIST", early)
        assert pdl.hoist(1) is early
        outs.append(run())
        torch.cuda.synchronize()
    return outs


def assert_same_bits(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        if x.is_floating_point():
            assert torch.isfinite(x.float()).all()
        assert torch.equal(x, y), f"max |diff| {(x.double() - y.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dim", [512, 1024, 4096])
def test_rms_norm(monkeypatch, weighted, dim):
    g = torch.Generator(device=DEV).manual_seed(dim + weighted)
    x = (3 * torch.randn(1, dim, device=DEV, generator=g)).to(torch.bfloat16)
    w = torch.rand(dim, device=DEV, generator=g) + 0.5 if weighted else None
    ops = CuteOps(DEV, torch.bfloat16, fused_glue=True)
    assert_same_bits(*both(monkeypatch, lambda: (ops.rms_norm(x, w, 1e-6),)))


@pytest.mark.parametrize("dim", [512, 1024])
def test_keys_norm_and_rope(monkeypatch, dim):
    g = torch.Generator(device=DEV).manual_seed(dim)
    x = (3 * torch.randn(1, dim, device=DEV, generator=g)).to(torch.bfloat16)
    w = torch.rand(dim, device=DEV, generator=g) + 0.5
    pos = torch.randint(0, 8000, (1,), device=DEV, generator=g)
    ops = CuteOps(DEV, torch.bfloat16, fused_glue=True)
    assert_same_bits(*both(monkeypatch, lambda: (ops.norm_rope_tail(x, w, 1e-6, pos, YARN, 64),)))


def test_mhc_collapse_with_its_norm(monkeypatch):
    g = torch.Generator(device=DEV).manual_seed(3)
    n, D, m = 4, 4096, 24
    streams = torch.randn(1, n, D, device=DEV, generator=g).to(torch.bfloat16)
    fn = torch.randn(m, n * D, device=DEV, generator=g) * 0.01
    scale = torch.rand(3, device=DEV, generator=g) + 0.5
    base = torch.randn(m, device=DEV, generator=g) * 0.1
    nw = torch.rand(D, device=DEV, generator=g) + 0.5
    ops = CuteOps(DEV, torch.bfloat16, fused_glue=True)
    run = lambda: (ops.hc_pre_split(streams, fn, scale, base, 1e-6, 20, 1e-6, norm_weight=nw)[0],)  # noqa: E731
    assert_same_bits(*both(monkeypatch, run))


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_routing(monkeypatch, score_func):
    g = torch.Generator(device=DEV).manual_seed(11)
    E, k, D = 256, 6, 4096
    x = torch.randn(1, D, device=DEV, generator=g).to(torch.bfloat16)
    gate = torch.randn(E, D, device=DEV, generator=g) * 0.02
    bias = torch.randn(E, device=DEV, generator=g) * 0.1          # large enough to change the choice
    tokens = torch.tensor([37], device=DEV)
    ops = CuteOps(DEV, torch.bfloat16, fused_glue=True)
    assert_same_bits(*both(monkeypatch, lambda: ops.route(x, gate, bias, None, tokens, k, score_func, 2.5)))


@pytest.mark.parametrize("splits", [2, 3, 10])
def test_split_combine_with_the_inverse_rope(monkeypatch, splits):
    from dsv4.ops.cute_attention import _rope_combine
    g = torch.Generator(device=DEV).manual_seed(splits)
    H, d, rd = 64, 512, 64
    opart = torch.randn(1, splits, H, d, device=DEV, generator=g)
    ml = torch.stack([torch.randn(1, splits, H, device=DEV, generator=g) * 4,
                      torch.rand(1, splits, H, device=DEV, generator=g) + 0.1], -1)
    sink = torch.randn(H, device=DEV, generator=g)
    pos = torch.randint(0, 8000, (1,), device=DEV, generator=g)
    cos, sin = (torch.rand(8192, rd // 2, device=DEV, generator=g) * 2 - 1 for _ in range(2))
    outs = []
    for early in (True, False):
        out = torch.full((1, H, d), float("nan"), device=DEV).to(torch.bfloat16)
        args = [opart, ml, sink, pos, cos, sin, out, splits]
        _rope_combine(d, rd, False, early, args)(*args)
        torch.cuda.synchronize()
        outs.append((out,))
    assert_same_bits(*outs)
