"""The RoPE kernel (CuteOps.rope_tail) vs TorchOps.rope_tail: every shape the model rotates, both directions."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI compiles the kernel (tests/unit/test_attention_kernels_compile.py)",
                allow_module_level=True)

from dsv4.config import RopeConfig  # noqa: E402
from dsv4.ops.cute import CuteOps  # noqa: E402
from dsv4.ops.torch_ops import TorchOps  # noqa: E402

YARN = RopeConfig(theta=160000.0, original_seq_len=4096, factor=16.0, beta_fast=32.0, beta_slow=1.0)


@pytest.mark.parametrize("shape,dtype", [((1, 16, 512), torch.bfloat16), ((300, 64, 512), torch.bfloat16),
                                         ((7, 512), torch.bfloat16), ((33, 64, 128), torch.bfloat16),
                                         ((5, 512), torch.float32), ((4, 4, 64), torch.float32)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_tail_matches_torch(shape, dtype, inverse):
    rd = 64 if shape[-1] >= 128 else 16
    x = torch.randn(shape, device="cuda").to(dtype)
    pos = torch.randint(0, 8000, (shape[0],), device="cuda")
    want = TorchOps("cuda", dtype).rope_tail(x, pos, YARN, rd, inverse)
    cute_ops = CuteOps("cuda", dtype)
    got = cute_ops.rope_tail(x, pos, YARN, rd, inverse)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got.float()).all()
    assert torch.equal(got[..., :-rd], x[..., :-rd]), "the head part must pass through unchanged"
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol), \
        f"max |diff| {(got.float() - want.float()).abs().max().item():.3g}"


@pytest.mark.parametrize("shape,dtype", [((1, 64, 512), torch.bfloat16), ((37, 64, 512), torch.bfloat16),
                                         ((5, 512), torch.bfloat16), ((3, 256), torch.float32),
                                         ((9, 2, 128), torch.bfloat16)])      # 128: no fused norm, the two kernels
@pytest.mark.parametrize("weighted", [False, True])
def test_norm_then_rope_in_one_kernel_gives_the_two_kernels_bits(shape, dtype, weighted):
    """norm_rope_tail (the queries' per-head norm, the keys' weighted norm) equals rms_norm then rope_tail, bit for
    bit, and TorchOps within rounding."""
    D, rd = shape[-1], 64
    g = torch.Generator(device="cuda").manual_seed(D + shape[0])
    x = (3 * torch.randn(shape, device="cuda", generator=g)).to(dtype)
    w = torch.rand(D, device="cuda", generator=g) + 0.5 if weighted else None
    pos = torch.randint(0, 8000, (shape[0],), device="cuda", generator=g)
    cute_ops = CuteOps("cuda", dtype, fused_glue=True)
    got = cute_ops.norm_rope_tail(x, w, 1e-6, pos, YARN, rd)
    apart = cute_ops.rope_tail(cute_ops.rms_norm(x, w, 1e-6), pos, YARN, rd)
    assert torch.isfinite(got.float()).all()
    assert torch.equal(got, apart), f"max |diff| {(got.float() - apart.float()).abs().max().item():.3g}"
    want = TorchOps("cuda", dtype).norm_rope_tail(x, w, 1e-6, pos, YARN, rd)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
