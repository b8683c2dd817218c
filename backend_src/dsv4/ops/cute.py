"""CuTe DSL ops for Hopper: NVFP4 linear layers and routed experts through dsv4_kernels, everything else TorchOps.

Weights
- NVFP4 linear weights (N % 16 == 0, K % 64 == 0) stay NVFP4 in GPU memory in the kernels' layout
  (`dsv4_kernels.nvfp4_gemm.prepare_nvfp4_weight`); others fall back to TorchOps' dense weight.
- FP8-block and BF16 weights stay on the torch path: requantising them to NVFP4 would change the model's numbers
  (FP8 e4m3 with 128x128 scales is far more precise than e2m1 with 16-element scales), so no requantisation at load.
- Routed experts: all-NVFP4 expert lists become `PackedExperts` (grouped kernel); MXFP4 experts (the official
  checkpoint) and dense ones use TorchOps until an MXFP4 path exists.
"""

from __future__ import annotations

from typing import Any

import torch

from dsv4.checkpoint.formats import NVFP4Tensor
from dsv4.ops.cute_attention import CuteAttentionMixin
from dsv4.ops.torch_ops import TorchOps

import dsv4_kernels  # noqa: F401  (raises ImportError where CuTe DSL is missing: select_ops then picks torch)
from dsv4_kernels.nvfp4_gemm import KCHUNK, ROWTILE, PackedNVFP4, nvfp4_linear, prepare_nvfp4_weight
from dsv4_kernels.nvfp4_moe import PackedExperts, nvfp4_moe, prepare_nvfp4_experts

Tensor = torch.Tensor


def _kernel_ok(w: Any) -> bool:
    if not isinstance(w, NVFP4Tensor) or w.packed.dim() != 2:
        return False
    n, k = w.shape
    return n % ROWTILE == 0 and k % KCHUNK == 0


class CuteOps(CuteAttentionMixin, TorchOps):
    name = "cute"

    def __init__(self, device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16):
        super().__init__(device, dtype)
        if self.device.type != "cuda":
            raise ValueError(f"CuteOps needs a CUDA device, got {self.device}")

    # --- weights ---------------------------------------------------------------------------------------------
    def prepare_linear(self, weight: Any) -> Any:
        if _kernel_ok(weight):
            return prepare_nvfp4_weight(_to(weight, self.device), self.device)
        return super().prepare_linear(weight)

    def prepare_experts(self, w1: list[Any], w2: list[Any], w3: list[Any]) -> Any:
        if all(isinstance(t, NVFP4Tensor) for t in (*w1, *w2, *w3)):
            inter, dim = w1[0].shape
            if inter % KCHUNK == 0 and dim % KCHUNK == 0:
                return prepare_nvfp4_experts(w1, w2, w3, self.device)
        return super().prepare_experts(w1, w2, w3)

    # --- math ------------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, w: Any) -> Tensor:
        if isinstance(w, PackedNVFP4):
            y = nvfp4_linear(x.to(torch.bfloat16), w)
            return y if self.dtype == torch.bfloat16 else y.to(self.dtype)
        return super().linear(x, w)

    def moe(self, x: Tensor, expert_ids: Tensor, expert_weights: Tensor, experts: Any, swiglu_limit: float) -> Tensor:
        if isinstance(experts, PackedExperts):
            y = nvfp4_moe(x.to(torch.bfloat16), expert_ids, expert_weights, experts, swiglu_limit)
            return y.to(x.dtype)
        return super().moe(x, expert_ids, expert_weights, experts, swiglu_limit)


def _to(w: NVFP4Tensor, device: torch.device) -> NVFP4Tensor:
    """Move the container to the GPU first so the re-layout runs there."""
    return NVFP4Tensor(packed=w.packed.to(device), scale=w.scale.to(device), scale_2=w.scale_2.to(device))
