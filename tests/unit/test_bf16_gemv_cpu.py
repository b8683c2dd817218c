"""CPU checks of the BF16 decode GEMV (dsv4_kernels.bf16_gemv): the re-layout is a permutation that the kernel's
fragment pairing with x (modelled in torch on the packed words) turns back into x @ W^T, the errors say what is
wrong, and the kernel compiles for sm_90a (CUTE_DSL_ARCH=sm_90a, no GPU needed)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import cutlass  # noqa: E402,F401  - a hard requirement: CI must compile every kernel, never skip

from dsv4_kernels import bf16_gemv as B  # noqa: E402


@pytest.mark.parametrize("n,k", [(16, 64), (64, 256), (48, 192)])
def test_packing_is_a_permutation_the_unpack_undoes(n, k):
    w = torch.randn(n, k).to(torch.bfloat16)
    packed = B.pack_bf16(w)
    assert packed.shape == (n // 16, k // 64, 4, 32, 4) and packed.dtype == torch.int32
    assert torch.equal(B.unpack_bf16(packed), w)


def test_the_kernels_pairing_of_fragments_and_x_computes_x_times_w_transposed():
    """Lane (g, t), k16 step s of chunk c: A registers (a0, a1, a2, a3) = rows (g, g + 8) at K = base + 4s + {0, 1}
    and base + 4s + {2, 3}, base = 64c + 16t, against x words 2s and 2s + 1 of x's 16-value group 4c + t."""
    n, k = 32, 128
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(k, generator=g).to(torch.bfloat16)
    regs = B.pack_bf16(w).view(torch.bfloat16).view(n // 16, k // 64, 4, 32, 4, 2).double()
    xg = x.double().view(k // 16, 16)
    y = torch.zeros(n, dtype=torch.float64)
    for tile in range(n // 16):
        for c in range(k // 64):
            for s in range(4):
                for lane in range(32):
                    gg, t = divmod(lane, 4)
                    b0, b1 = xg[4 * c + t, 4 * s:4 * s + 2], xg[4 * c + t, 4 * s + 2:4 * s + 4]
                    a = regs[tile, c, s, lane]
                    y[tile * 16 + gg] += (a[0] * b0).sum() + (a[2] * b1).sum()
                    y[tile * 16 + gg + 8] += (a[1] * b0).sum() + (a[3] * b1).sum()
    assert torch.allclose(y, w.double() @ x.double(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("w,match", [(torch.zeros(20, 64, dtype=torch.bfloat16), "multiple of 16"),
                                     (torch.zeros(16, 96, dtype=torch.bfloat16), "multiple of 64"),
                                     (torch.zeros(16, 64), "bf16"),
                                     (torch.zeros(B.MAX_N + 16, 64, dtype=torch.bfloat16), "<= 16384")])
def test_prepare_refuses_what_the_kernel_cannot_take(w, match):
    assert not B.bf16_kernel_ok(w)
    with pytest.raises(ValueError, match=match):
        B.prepare_bf16_weight(w)


def test_the_plan_fills_the_gpu_with_whole_iterations():
    for n, k in [(1024, 4096), (64, 4096), (2048, 4096), (1024, 7168), (16, 64)]:
        splits, unroll = B.bf16_gemv_plan(n, k)
        assert (k // 64) % (splits * unroll) == 0
    assert B.bf16_gemv_plan(1024, 4096) == (16, 4)          # 16 CTAs x 16 splits: 256 CTAs on 132 SMs


@pytest.mark.parametrize("n,k,m", [(1024, 4096, 1), (64, 4096, 8), (2048, 4096, 16), (48, 192, 64)])
@pytest.mark.parametrize("pdl", [False, True])
def test_the_kernel_compiles_for_sm90a(n, k, m, pdl):
    splits, unroll = B.bf16_gemv_plan(n, k)
    assert B.compile_gemv_bf16(n, k, -(-m // 8), splits, unroll, pdl) is not None


def test_cute_ops_packs_the_checkpoints_bf16_projections_and_nothing_else():
    from dsv4.checkpoint.formats import quantize_fp8_block
    from dsv4.ops.cute import CuteOps
    ops = CuteOps.__new__(CuteOps)                   # CuteOps' dispatch without a GPU
    ops.device, ops.dtype, ops.fp8_weights, ops.fused_glue = torch.device("cpu"), torch.bfloat16, True, True
    w = torch.randn(1024, 4096).to(torch.bfloat16)
    pw = ops.prepare_linear(w)
    assert isinstance(pw, B.PackedBF16) and torch.equal(pw.dense, w) and torch.equal(B.unpack_bf16(pw.codes), w)
    head = torch.randn(B.MAX_N + 16, 64).to(torch.bfloat16)          # an LM head: cuBLAS, FP32 logits
    assert isinstance(ops.prepare_linear(head), torch.Tensor)
    ragged_fp8 = quantize_fp8_block(torch.randn(64, 128), block=(64, 32))   # dequantised, as before
    assert isinstance(ops.prepare_linear(ragged_fp8), torch.Tensor)
    x = torch.randn(2, 4096).to(torch.bfloat16)
    logits = ops.lm_head(x, pw)                      # a small head that got packed: FP32 logits off the dense weight
    assert logits.dtype == torch.float32 and torch.allclose(logits, x.float() @ w.float().T, rtol=1e-3, atol=1e-3)


def _cpu_cute_ops():
    from dsv4.ops.cute import CuteOps
    ops = CuteOps.__new__(CuteOps)                   # CuteOps' dispatch without a GPU
    ops.device, ops.dtype, ops.fp8_weights, ops.fused_glue = torch.device("cpu"), torch.bfloat16, True, True
    return ops


def test_a_compressed_layers_projections_of_x_become_one_stacked_weight_whose_outputs_split_back():
    from dsv4.ops.cute import LinearStack
    from dsv4.ops.torch_ops import TorchOps
    ops = _cpu_cute_ops()
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(n, 256, generator=g).to(torch.bfloat16) for n in (128, 128, 32, 32, 16)]
    stack = ops.prepare_linear_stack(ws)
    assert isinstance(stack, LinearStack) and stack.sizes == (128, 128, 32, 32, 16)
    assert torch.equal(stack.weight.dense, torch.cat(ws))
    for part, w in zip(stack.parts, ws):             # each projection's own weight: views of the stacked rows
        assert torch.equal(part.dense, w) and torch.equal(B.unpack_bf16(part.codes), w)
        assert part.codes.data_ptr() >= stack.weight.codes.data_ptr() and part.codes.is_contiguous()
    torch_ops = TorchOps("cpu", torch.bfloat16)
    for t in (1, 3):
        x = torch.randn(t, 256, generator=g).to(torch.bfloat16)
        y = x @ stack.weight.dense.T                 # what the GEMV (or cuBLAS above 64 rows) returns
        parts = stack.split(y)
        for part, w in zip(parts, ws):
            assert part.shape == (t, w.shape[0]) and torch.equal(part, torch_ops.linear(x, w))
        if t == 1:                                   # one token: compact slices, no copy for the kernels after
            assert all(p.is_contiguous() and p.stride() == (p.shape[1], 1) for p in parts)


def test_stacks_the_kernel_cannot_take_stay_separate_projections():
    from dsv4.checkpoint.formats import quantize_fp8_block
    ops = _cpu_cute_ops()
    mixed = ops.prepare_linear_stack([torch.randn(32, 128).to(torch.bfloat16), torch.randn(32, 64).to(torch.bfloat16)])
    assert isinstance(mixed, tuple) and len(mixed) == 2                 # different K
    fp8 = ops.prepare_linear_stack([quantize_fp8_block(torch.randn(64, 128))])
    assert isinstance(fp8, tuple)
