"""Shared by the MoE GPU tests: random NVFP4 experts and a poisoned allocator."""

from __future__ import annotations

import torch

from dsv4.checkpoint.formats import quantize_nvfp4

DEV = torch.device("cuda")


def poison_allocator(mb: int = 512) -> None:
    """Fill free cached memory with NaN so buffers the kernels should overwrite start poisoned."""
    t = torch.full((mb << 18,), float("nan"), dtype=torch.float32, device=DEV)
    del t


def make_experts(E, D, I, gen):
    w1 = [quantize_nvfp4(torch.randn(I, D, device=DEV, generator=gen) * 0.5) for _ in range(E)]
    w3 = [quantize_nvfp4(torch.randn(I, D, device=DEV, generator=gen) * 0.5) for _ in range(E)]
    w2 = [quantize_nvfp4(torch.randn(D, I, device=DEV, generator=gen) * 0.5) for _ in range(E)]
    return w1, w2, w3
