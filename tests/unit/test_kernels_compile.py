"""CPU checks of the CuTe DSL kernels: every kernel compiles for sm_90a (CUTE_DSL_ARCH=sm_90a, no GPU needed) and
the NVFP4 weight re-layout is exact (its inverse, and a torch model of the kernel's shift/mask decode)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import cutlass  # noqa: E402,F401  - a hard requirement: CI must compile every kernel, never skip

from dsv4.checkpoint.formats import NVFP4Tensor, quantize_nvfp4, unpack_e2m1  # noqa: E402
from dsv4_kernels import nvfp4_gemm as G  # noqa: E402
from dsv4_kernels import nvfp4_moe as MO  # noqa: E402


@pytest.mark.parametrize("n,k,mt,splits", [(1024, 4096, 1, 4), (4096, 8192, 8, 1), (512, 7168, 2, 7),
                                           (128, 256, 1, 1)])
def test_gemv_compiles(n, k, mt, splits):
    _, unroll = G.gemv_plan(n, k)
    if (k // 64 // unroll) % splits:
        splits = 1
    assert G.compile_gemv(n, k, mt, splits, unroll) is not None
    assert G.compile_gemv(n, k, mt, splits, unroll, fused=True) is not None
    assert G.compile_split_reduce(n, max(splits, 2)) is not None
    # programmatic dependent launch: first weight loads before griddepcontrol.wait, reduce scheduled early
    assert G.compile_gemv(n, k, mt, splits, unroll, pdl=True) is not None
    assert G.compile_gemv(n, k, mt, splits, 16 if (k // 64 // splits) % 16 == 0 else unroll, pdl=True) is not None
    assert G.compile_split_reduce(n, max(splits, 2), pdl=True) is not None


def test_dequant_compiles():
    assert G.compile_dequant(4096, 2048) is not None


@pytest.mark.parametrize("mode,n,k,mt", [("gateup", 4096, 4096, 1), ("down", 4096, 2048, 2), ("gateup", 128, 128, 8)])
def test_moe_kernels_compile(mode, n, k, mt):
    assert MO.compile_grouped(mode, 16, n, k, mt, mode == "gateup", n // 2 if mode == "gateup" else n) is not None


@pytest.mark.parametrize("mode,n,k,mt,ks", [("gateup", 4096, 4096, 1, 2), ("down", 4096, 2048, 2, 2),
                                             ("down", 128, 128, 8, 1)])
def test_moe_decode_kernels_compile(mode, n, k, mt, ks):
    inter, dim = (n // 2, k) if mode == "gateup" else (k, n)
    assert MO.compile_decode(mode, 16, n, k, mt, ks, 6) is not None
    assert MO.compile_decode(mode, 16, n, k, mt, ks, 6, cutlass.Int32, cutlass.BFloat16) is not None
    assert MO.compile_decode_swiglu(16, inter, ks, True) is not None
    assert MO.compile_decode_swiglu(16, inter, ks, False, cutlass.Int32) is not None
    assert MO.compile_finalize(dim, 6, ks) is not None
    # the programmatic-dependent-launch chain (down prefetches its weights before griddepcontrol.wait)
    assert MO.compile_decode(mode, 16, n, k, mt, ks, 6, unroll=16, pdl=True) is not None
    assert MO.compile_decode_swiglu(16, inter, ks, True, pdl=True) is not None
    assert MO.compile_finalize(dim, 6, ks, pdl=True) is not None


def test_gemv_plan_divides_k():
    for n, k in [(512, 4096), (1024, 4096), (4096, 8192), (32768, 1024), (129280, 4096), (64, 4096), (512, 1536)]:
        splits, unroll = G.gemv_plan(n, k)
        assert splits >= 1 and (k // 64) % (splits * unroll) == 0
        for mt in (1, 2, 8):
            assert (k // 64 // splits) % G.gemv_unroll(n, k, splits, mt, unroll) == 0


@pytest.mark.parametrize("dim,inter", [(4096, 2048), (7168, 3072), (1024, 512), (512, 256), (128, 64)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 8, 10])
def test_moe_decode_plan_splits_k_into_whole_unrolled_chunks(dim, inter, tokens):
    """V4-Flash, V4-Pro and the test shapes: each K split is a whole number of 64-wide chunks (>= 8 unless K is
    not split) and the loads in flight per lane divide a split's chunks, so no chunk is skipped or read twice."""
    from types import SimpleNamespace
    _, ks_gateup, ks_down, unroll = MO.decode_plan(SimpleNamespace(dim=dim, inter=inter), tokens * 6, 6)
    for k, ks in ((dim, ks_gateup), (inter, ks_down)):
        chunks = k // 64
        assert chunks % ks == 0 and (ks == 1 or chunks // ks >= 8)
        assert (chunks // ks) % MO._unroll(chunks // ks, unroll) == 0


def _weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    w[0, :16] = 0
    w[1, 16:32] *= 1e-7          # e4m3 subnormal / zero scales
    return quantize_nvfp4(w)


@pytest.mark.parametrize("n,k", [(16, 64), (64, 256), (48, 1536)])
def test_relayout_roundtrip_exact(n, k):
    q = _weight(n, k, n + k)
    pw = G.prepare_nvfp4_weight(q)
    codes, _ = G.unpack_to_codes(pw)
    assert torch.equal(codes, unpack_e2m1(q.packed))
    assert torch.equal(G.decode_reference(pw), q.dequantize(torch.float32))


def test_relayout_negative_and_subnormal_scales():
    q = _weight(32, 128, 5)
    neg = NVFP4Tensor(packed=q.packed, scale=(-q.scale.float()).to(torch.float8_e4m3fn), scale_2=q.scale_2)
    assert torch.equal(G.decode_reference(G.prepare_nvfp4_weight(neg)), neg.dequantize())
    sub = torch.tensor([2.0 ** -9 * i for i in range(1, 8)] * 40)[: 32 * 8].view(32, 8).to(torch.float8_e4m3fn)
    qs = NVFP4Tensor(packed=q.packed, scale=sub, scale_2=q.scale_2)
    assert torch.equal(G.decode_reference(G.prepare_nvfp4_weight(qs)), qs.dequantize())


def _bf16_bits_to_f32(b: torch.Tensor) -> torch.Tensor:
    return ((b.to(torch.int64) & 0xFFFF) << 16).to(torch.int32).view(torch.float32)


def test_kernel_bit_decode_model():
    """The kernel's exact shift/mask sequence, run in torch on the packed words, yields the dequantised weight."""
    n, k = 32, 256
    q = _weight(n, k, 11)
    pw = G.prepare_nvfp4_weight(q)
    w = pw.codes.to(torch.int64) & 0xFFFFFFFF                          # [N/16, K/64, 32, 4]
    p = [w & 0x81C081C0, (w << 3) & 0x81C081C0, (w << 6) & 0x81C081C0,
         ((w >> 4) & 0x00C000C0) | ((w >> 5) & 0x01000100) | ((w << 1) & 0x80008000)]
    sc = pw.scales.to(torch.int64) & 0xFFFF                            # [N/16, K/64, 32]
    sg, sg8 = (sc & 0xFF) * 16 + 0x7600, (sc >> 8) * 16 + 0x7600
    out = torch.zeros(n // 16, 16, k // 64, 4, 16)                     # [r, row in tile, c, t, K in lane group]
    for slot in range(4):
        s_bits = sg if slot % 2 == 0 else sg8
        scale = _bf16_bits_to_f32(s_bits)                               # scale * 2^118, [r, c, lane]
        for half in range(2):
            e2m1 = _bf16_bits_to_f32((p[slot] >> (16 * half)) & 0xFFFF)   # e2m1 * 2^-126, [r, c, lane, s]
            v = (e2m1.double() * scale[..., None].double()).float()      # the bf16x2 fma: e2m1 * scale * 2^-8
            for s in range(4):
                kk = 4 * s + 2 * (slot // 2) + half
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    out[:, g + 8 * (slot % 2), :, t, kk] = v[:, :, lane, s]
    dense = out.reshape(n, k) * 2.0 ** 8 * q.scale_2.float()
    assert torch.equal(dense, q.dequantize(torch.float32))


@pytest.mark.parametrize("e,topk,ids_i64", [(256, 6, True), (32, 2, False), (384, 6, True), (1024, 8, False)])
def test_moe_sort_compiles(e, topk, ids_i64):
    MO.compile_sort(e, topk, ids_i64)


@pytest.mark.parametrize("d,inter,mt,ks2,clamp", [(4096, 2048, 1, 4, True), (7168, 3072, 1, 4, True),
                                                  (1024, 512, 2, 2, False), (256, 128, 8, 1, True)])
def test_fused_moe_decode_compiles(d, inter, mt, ks2, clamp):
    from dsv4_kernels import nvfp4_moe_fused as MF
    assert MF.compile_fused(16, d, inter, mt, ks2, 6, clamp) is not None
    assert MF.compile_fused(16, d, inter, mt, ks2, 6, clamp, cutlass.Int32, cutlass.BFloat16, 8, 4) is not None


def test_fused_moe_decode_rejects_tiles_the_grid_cannot_split():
    from dsv4_kernels import nvfp4_moe_fused as MF
    with pytest.raises(ValueError, match="multiples of"):
        MF.compile_fused(16, 4096 + 16, 2048, 1, 4, 6, True)


@pytest.mark.parametrize("n,k", [(32768, 1024), (4096, 8192), (65536, 1536), (129280, 4096)])
def test_ring_gemv_compiles(n, k):
    from dsv4_kernels import nvfp4_gemv_async as R
    splits, _ = G.gemv_plan(n, k)
    assert R.use_ring(n, k, 1, splits)
    assert R.compile_gemv_async(n, k, splits, R.RING_U, R.RING_STAGES) is not None
    assert R.compile_gemv_async(n, k, splits, R.RING_U, R.RING_STAGES, pdl=True) is not None
    for mt in (1, 2):       # 8-token tiles, x read from global memory
        assert R.compile_gemv_async(n, k, splits, R.RING_U, R.RING_STAGES, mt, pdl=mt == 1) is not None


@pytest.mark.parametrize("mode,n,k,mt,ks", [("gateup", 4096, 4096, 1, 4), ("down", 4096, 2048, 1, 4),
                                           ("gateup", 6144, 7168, 2, 4), ("down", 7168, 3072, 1, 2)])
def test_moe_ring_decode_compiles(mode, n, k, mt, ks):
    from dsv4_kernels import nvfp4_moe_ring as MR
    assert MR.ring_fits(k, ks)
    assert MR.compile_decode_ring(mode, 16, n, k, mt, ks, 6, pdl=mode == "down") is not None
    assert MR.compile_decode_ring(mode, 16, n, k, mt, ks, 6, cutlass.Int32, cutlass.BFloat16) is not None
    if mode == "gateup":    # the SwiGLU epilogue of an unsplit gate_up, clamped and not
        assert MR.compile_decode_ring("gateup_h", 16, n, k, mt, 1, 6, clamp=True) is not None
        assert MR.compile_decode_ring("gateup_h", 16, n, k, mt, 1, 6, cutlass.Int32, cutlass.BFloat16,
                                      clamp=False) is not None


def test_moe_ring_down_kernel_of_a_one_token_step_is_the_deep_ring_and_compiles():
    """A one-token step's down kernel keeps 7 of V4-Flash's 8 ring iterations in flight before its wait; more tokens
    keep the shallow ring (more CTAs resident)."""
    from dsv4_kernels import nvfp4_moe_ring as MR
    assert MR.down_stages(1) == MR.RING_DOWN_STAGES_ONE_TOKEN > MR.RING_DOWN_STAGES
    assert MR.down_stages(2) == MR.down_stages(8) == MR.RING_DOWN_STAGES
    assert MR.compile_decode_ring("down", 16, 4096, 2048, 1, 1, 6, pdl=True, stages=MR.down_stages(1)) is not None


def test_moe_ring_gate_up_kernel_of_a_one_token_step_is_the_deeper_ring_and_compiles():
    from dsv4_kernels import nvfp4_moe_ring as MR
    assert MR.up_stages(1) == MR.RING_UP_STAGES_ONE_TOKEN > MR.RING_STAGES
    assert MR.up_stages(2) == MR.up_stages(8) == MR.RING_STAGES
    assert MR.compile_decode_ring("gateup_h", 16, 4096, 4096, 1, 1, 6, pdl=True, stages=MR.up_stages(1)) is not None


def test_moe_ring_rejects_splits_that_are_not_whole_stages():
    from dsv4_kernels import nvfp4_moe_ring as MR
    assert not MR.ring_fits(64 * 6, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        MR.compile_decode_ring("down", 16, 1024, 64 * 6, 1, 1, 6)
    with pytest.raises(ValueError, match="whole K in one split"):
        MR.compile_decode_ring("gateup_h", 16, 1024, 1024, 1, 2, 6)

