"""The LM head writes FP32 logits, as DeepSeek's inference code does (`F.linear(x.float(), head.float())`), so two
backends do not break exact BF16 ties differently."""

from __future__ import annotations

import pytest
import torch

from dsv4.ops.torch_ops import TorchOps


def _ops(device: str = "cpu") -> TorchOps:
    return TorchOps(device, torch.bfloat16)


def test_lm_head_is_the_fp32_product_of_the_bf16_operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
    w = torch.randn(1000, 256, generator=g).to(torch.bfloat16)
    got = _ops().lm_head(x, w)
    assert got.dtype == torch.float32 and got.shape == (3, 1000)
    want = x.double() @ w.double().T
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-4)


def test_lm_head_resolves_what_a_bf16_head_rounds_to_a_tie():
    # two vocabulary rows whose exact logits differ by less than one BF16 step at |logit| ~ 10
    x = torch.ones(1, 64, dtype=torch.bfloat16)
    w = torch.full((2, 64), 10.0 / 64, dtype=torch.bfloat16)
    w[1, 0] += 2 ** -7
    ops = _ops()
    bf16 = ops.linear(x, w).float()
    assert bf16[0, 0] == bf16[0, 1], "premise: BF16 logits tie"
    fp32 = ops.lm_head(x, w)
    assert fp32[0, 1] > fp32[0, 0] and int(fp32.argmax()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 64])
def test_lm_head_on_the_gpu_matches_the_fp32_product(m):
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(32000, 4096, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    got = _ops("cuda").lm_head(x, w)
    assert got.dtype == torch.float32 and got.shape == (m, 32000)
    want = x.float() @ w.float().T
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), float((got - want).abs().max())
