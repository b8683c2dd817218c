"""Specification of the checkpoint weight formats in dsv4.checkpoint.formats.

NVFP4  : e2m1 pairs packed low-nibble-first, e4m3 scale per 16 K elements, fp32 per-tensor scale_2.
MXFP4  : e2m1 pairs packed low-nibble-first, UE8M0 scale (2**(byte-127)) per 32 K elements.
FP8    : e4m3 weight, one multiplier per 128x128 block (ragged edges allowed).
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.checkpoint.formats import (
    E2M1_VALUES,
    HAS_FLOAT8_E8M0,
    FP8BlockTensor,
    MXFP4Tensor,
    NVFP4Tensor,
    dequantize_fp8_block,
    dequantize_mxfp4,
    dequantize_nvfp4,
    e2m1_decode,
    e2m1_encode,
    float_to_ue8m0,
    pack_e2m1,
    quantize_fp8_block,
    quantize_mxfp4,
    quantize_nvfp4,
    ue8m0_to_float,
    unpack_e2m1,
)
from dsv4.errors import CheckpointFormatError, DSV4Error

E4M3 = torch.float8_e4m3fn
needs_e8m0 = pytest.mark.skipif(not HAS_FLOAT8_E8M0, reason="torch has no float8_e8m0fnu")


def u8(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def rel_err(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return float((approx.float() - ref.float()).norm() / ref.float().norm())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (distinguishes -0.0 from 0.0; works for fp8)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


# ---------------------------------------------------------------------------------------------
# e2m1 codes and nibble packing
# ---------------------------------------------------------------------------------------------

class TestE2M1:
    def test_value_table(self):
        mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
        assert E2M1_VALUES.dtype == torch.float32
        assert E2M1_VALUES.tolist() == mags + [-m for m in mags]
        assert torch.signbit(E2M1_VALUES[8])  # code 8 is -0.0

    def test_byte_0x21_is_codes_1_2_low_nibble_first(self):
        assert unpack_e2m1(u8(0x21)).tolist() == [1, 2]
        assert e2m1_decode(unpack_e2m1(u8(0x21))).tolist() == [0.5, 1.0]

    def test_byte_0x8f_is_minus_six_then_minus_zero(self):
        codes = unpack_e2m1(u8(0x8F))
        assert codes.tolist() == [15, 8]
        vals = e2m1_decode(codes)
        assert vals.tolist() == [-6.0, 0.0] and torch.signbit(vals).tolist() == [True, True]

    def test_pack_puts_even_element_in_low_nibble(self):
        assert pack_e2m1(u8(1, 2, 15, 8)).tolist() == [0x21, 0x8F]
        assert pack_e2m1(torch.tensor([[3, 0], [0, 3]], dtype=torch.uint8)).tolist() == [[0x03], [0x30]]

    def test_pack_unpack_roundtrip(self):
        codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
        packed = pack_e2m1(codes)
        assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
        assert torch.equal(unpack_e2m1(packed), codes)

    def test_unpack_accepts_int8_and_float4x2_storage(self):
        packed = u8(0x21, 0x8F, 0x7A)
        assert torch.equal(unpack_e2m1(packed.view(torch.int8)), unpack_e2m1(packed))
        if hasattr(torch, "float4_e2m1fn_x2"):
            assert torch.equal(unpack_e2m1(packed.view(torch.float4_e2m1fn_x2)), unpack_e2m1(packed))

    def test_encode_grid_values_exactly(self):
        codes = torch.arange(16, dtype=torch.uint8)
        assert torch.equal(e2m1_encode(E2M1_VALUES), codes)

    @pytest.mark.parametrize(
        "x, expected",
        [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
         (-0.75, -1.0), (-5.0, -4.0)],
    )
    def test_encode_midpoints_round_half_to_even(self, x, expected):
        assert e2m1_decode(e2m1_encode(torch.tensor([x]))).item() == expected

    def test_encode_saturates_at_six(self):
        vals = e2m1_decode(e2m1_encode(torch.tensor([6.5, 100.0, -1e30])))
        assert vals.tolist() == [6.0, 6.0, -6.0]

    def test_encode_is_nearest_grid_point(self):
        x = torch.empty(20000).uniform_(-7, 7)
        grid = E2M1_VALUES[:8]
        dist = (x.abs()[:, None] - grid[None, :]).abs()
        best = dist.min(dim=1).values
        got = e2m1_decode(e2m1_encode(x))
        assert torch.allclose((got.abs() - x.abs()).abs(), best, rtol=0, atol=0)
        assert torch.equal(torch.signbit(got), torch.signbit(x))


# ---------------------------------------------------------------------------------------------
# UE8M0
# ---------------------------------------------------------------------------------------------

class TestUE8M0:
    def test_known_bytes(self):
        assert ue8m0_to_float(u8(127, 128, 126, 130, 120)).tolist() == [1.0, 2.0, 0.5, 8.0, 2.0**-7]

    def test_every_byte_is_exact_power_of_two(self):
        b = torch.arange(255, dtype=torch.uint8)
        expected = torch.tensor([2.0 ** (i - 127) for i in range(255)], dtype=torch.float64)
        assert torch.equal(ue8m0_to_float(b).double(), expected)
        assert torch.isnan(ue8m0_to_float(u8(255))).all()

    @needs_e8m0
    def test_float8_e8m0fnu_matches_uint8(self):
        b = torch.arange(255, dtype=torch.uint8)
        assert torch.equal(ue8m0_to_float(b.view(torch.float8_e8m0fnu)), ue8m0_to_float(b))
        assert torch.equal(ue8m0_to_float(b), b.view(torch.float8_e8m0fnu).float())

    def test_float_to_ue8m0_roundtrip_and_rejects_non_powers(self):
        assert float_to_ue8m0(torch.tensor([1.0, 2.0, 0.5, 2.0**-127])).tolist() == [127, 128, 126, 0]
        with pytest.raises(CheckpointFormatError):
            float_to_ue8m0(torch.tensor([3.0]))
        with pytest.raises(CheckpointFormatError):
            float_to_ue8m0(torch.tensor([0.0]))

    def test_rejects_other_dtypes(self):
        with pytest.raises(CheckpointFormatError, match="UE8M0"):
            ue8m0_to_float(torch.ones(2))


# ---------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------

def e4m3(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(E4M3)


class TestNVFP4Layout:
    def test_hand_packed_tensor_dequantizes_exactly(self):
        # one row, K = 16: codes 1,2 | 15,8 | 7,0 | 0x5 0x4 | rest 0  ; scale 2.0 * scale_2 0.5 = 1.0
        packed = torch.tensor([[0x21, 0x8F, 0x07, 0x45, 0, 0, 0, 0xF3]], dtype=torch.uint8)
        t = NVFP4Tensor(packed=packed, scale=e4m3(2.0).view(1, 1),
                        scale_2=torch.tensor(0.5, dtype=torch.float32))
        expected = [0.5, 1.0, -6.0, -0.0, 6.0, 0.0, 3.0, 2.0] + [0.0] * 6 + [1.5, -6.0]
        assert t.shape == (1, 16)
        assert t.dequantize().tolist() == [expected]

    def test_scale_times_scale_2(self):
        packed = torch.full((1, 8), 0x72, dtype=torch.uint8)  # codes [2 (1.0), 7 (6.0)] * 8
        out = dequantize_nvfp4(packed, e4m3(3.0).view(1, 1), torch.tensor([0.25]))
        assert out.tolist() == [[0.75, 4.5] * 8]

    def test_block_j_covers_k_16j_to_16j_plus_15(self):
        # 2 rows, K = 48 (3 blocks); every code = 2 (1.0), so the output shows the scale grid.
        packed = torch.full((2, 24), 0x22, dtype=torch.uint8)
        scale = torch.tensor([[1.0, 2.0, 4.0], [8.0, 0.5, 0.0]]).to(E4M3)
        out = NVFP4Tensor(packed, scale, torch.tensor(1.0)).dequantize()
        expected = scale.float().repeat_interleave(16, dim=1)
        assert torch.equal(out, expected)
        assert out[0, 15] == 1.0 and out[0, 16] == 2.0 and out[0, 31] == 2.0 and out[0, 32] == 4.0

    def test_output_dtype(self):
        t = quantize_nvfp4(torch.randn(4, 32))
        assert t.dequantize(torch.bfloat16).dtype == torch.bfloat16
        assert torch.equal(t.dequantize(torch.bfloat16), t.dequantize().to(torch.bfloat16))


class TestNVFP4Quantize:
    def test_modelopt_scale_recipe(self):
        torch.manual_seed(0)
        w = torch.randn(8, 64)
        t = quantize_nvfp4(w)
        amax = w.abs().max()
        assert t.scale_2.dtype == torch.float32 and t.scale_2.numel() == 1
        assert t.scale_2.item() == (amax / (6 * 448)).item()
        block_amax = w.view(8, 4, 16).abs().amax(-1)
        assert same_bits(t.scale, (block_amax / 6 / t.scale_2).to(E4M3))
        assert t.scale.float().max().item() == 448.0  # the block holding amax uses the top scale
        assert t.packed.shape == (8, 32) and t.scale.shape == (8, 4)

    def test_codes_are_rne_of_w_over_effective_scale(self):
        torch.manual_seed(1)
        w = torch.randn(4, 64)
        t = quantize_nvfp4(w)
        eff = (t.scale.float() * t.scale_2).repeat_interleave(16, dim=1)
        assert torch.equal(unpack_e2m1(t.packed), e2m1_encode(w / eff))

    @pytest.mark.parametrize("shape", [(16, 64), (64, 256), (3, 32, 128), (128, 1024)])
    def test_random_normal_error_bound(self, shape):
        torch.manual_seed(2)
        w = torch.randn(shape)
        out = quantize_nvfp4(w).dequantize()
        assert out.shape == w.shape
        assert rel_err(out, w) < 0.105  # measured ~0.095

    def test_bf16_input(self):
        torch.manual_seed(3)
        w = torch.randn(32, 128, dtype=torch.bfloat16)
        assert rel_err(quantize_nvfp4(w).dequantize(), w) < 0.105

    def test_on_grid_values_roundtrip_bit_exactly(self):
        torch.manual_seed(4)
        n, nblk = 8, 4
        codes = torch.randint(0, 16, (n, nblk, 16), dtype=torch.uint8)
        codes[..., 0] = 7  # every block reaches +6 so block_amax / 6 recovers its scale
        grid_scales = torch.tensor([0.015625, 0.25, 1.0, 1.125, 3.5, 14.0, 96.0, 448.0])
        scale = grid_scales[torch.randint(0, 8, (n, nblk))]
        scale[0, 0] = 448.0  # the tensor amax lives here, so scale_2 is recovered exactly
        ref = NVFP4Tensor(pack_e2m1(codes.view(n, -1)), scale.to(E4M3), torch.tensor(2.0**-5))
        again = quantize_nvfp4(ref.dequantize())
        assert same_bits(again.scale_2, ref.scale_2)
        assert same_bits(again.scale, ref.scale)
        assert torch.equal(again.packed, ref.packed)

    def test_zero_blocks_and_zero_tensor(self):
        w = torch.randn(4, 64)
        w[1] = 0.0
        w[2, 16:32] = 0.0
        t = quantize_nvfp4(w)
        out = t.dequantize()
        assert t.scale[1].float().eq(0).all() and t.scale[2, 1].float() == 0
        assert out[1].eq(0).all() and out[2, 16:32].eq(0).all()
        z = quantize_nvfp4(torch.zeros(2, 32))
        assert z.scale_2.item() == 0.0 and z.scale.float().eq(0).all()
        assert z.dequantize().eq(0).all()

    def test_no_nan_or_inf_with_extreme_dynamic_range(self):
        w = torch.zeros(2, 64)
        w[0, :16] = 3e4
        w[0, 16:32] = 1e-9  # its e4m3 block scale underflows to 0: block must become 0, not NaN
        w[1, :] = torch.linspace(-1e-3, 1e-3, 64)
        out = quantize_nvfp4(w).dequantize()
        assert torch.isfinite(out).all()
        assert out[0, :16].eq(3e4).all() and out[0, 16:32].eq(0).all()


# ---------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------

class TestMXFP4:
    @pytest.mark.parametrize("byte, mult", [(127, 1.0), (128, 2.0), (126, 0.5), (131, 16.0)])
    def test_scale_byte_multiplier(self, byte, mult):
        packed = torch.full((1, 16), 0x21, dtype=torch.uint8)  # [0.5, 1.0] * 16
        out = MXFP4Tensor(packed, torch.full((1, 1), byte, dtype=torch.uint8)).dequantize()
        assert out.tolist() == [[0.5 * mult, 1.0 * mult] * 16]

    def test_block_j_covers_k_32j_to_32j_plus_31(self):
        packed = torch.full((1, 48), 0x22, dtype=torch.uint8)  # K = 96, all 1.0
        out = dequantize_mxfp4(packed, u8(127, 129, 125).view(1, 3))
        assert torch.equal(out[0], torch.tensor([1.0] * 32 + [4.0] * 32 + [0.25] * 32))

    @needs_e8m0
    def test_e8m0_scale_dtype_reads_like_uint8(self):
        torch.manual_seed(5)
        t = quantize_mxfp4(torch.randn(4, 64))
        e = MXFP4Tensor(t.packed, t.scale.view(torch.float8_e8m0fnu))
        assert torch.equal(e.dequantize(), t.dequantize())
        q = quantize_mxfp4(torch.randn(4, 64), scale_dtype=torch.float8_e8m0fnu)
        assert q.scale.dtype == torch.float8_e8m0fnu

    def test_ocp_shared_exponent_rule(self):
        w = torch.zeros(1, 128)
        w[0, 0:32] = 1.0          # amax 1   -> floor(log2) 0 -> 2**-2 -> byte 125
        w[0, 32:64] = 6.0         # amax 6   -> 2 -> 2**0  -> byte 127
        w[0, 64] = 7.9            # amax 7.9 -> 2 -> byte 127; 7.9 clamps to 6
        w[0, 96] = -0.1           # amax .1  -> -4 -> 2**-6 -> byte 121
        t = quantize_mxfp4(w)
        assert t.scale.dtype == torch.uint8
        assert t.scale.tolist() == [[125, 127, 127, 121]]
        out = t.dequantize()
        assert out[0, 0] == 1.0 and out[0, 32] == 6.0 and out[0, 64] == 6.0
        assert out[0, 96] == -0.09375  # -0.1 / 2**-6 = -6.4 -> -6 -> -6 * 2**-6

    @pytest.mark.parametrize("shape", [(16, 64), (64, 256), (3, 32, 128), (128, 1024)])
    def test_random_normal_error_bound(self, shape):
        torch.manual_seed(6)
        w = torch.randn(shape)
        t = quantize_mxfp4(w)
        assert t.packed.shape == shape[:-1] + (shape[-1] // 2,)
        assert t.scale.shape == shape[:-1] + (shape[-1] // 32,)
        assert rel_err(t.dequantize(), w) < 0.125  # measured ~0.115

    def test_on_grid_values_roundtrip_bit_exactly(self):
        torch.manual_seed(7)
        codes = torch.randint(0, 16, (6, 4, 32), dtype=torch.uint8)
        codes[..., 5] = 6 + torch.randint(0, 2, (6, 4), dtype=torch.uint8)  # block max 4 or 6
        scale = torch.randint(100, 150, (6, 4), dtype=torch.uint8)
        ref = MXFP4Tensor(pack_e2m1(codes.view(6, -1)), scale)
        again = quantize_mxfp4(ref.dequantize())
        assert torch.equal(again.scale, ref.scale) and torch.equal(again.packed, ref.packed)

    def test_zero_blocks(self):
        w = torch.randn(2, 64)
        w[0, 32:] = 0
        t = quantize_mxfp4(w)
        out = t.dequantize()
        assert t.scale[0, 1] == 127 and out[0, 32:].eq(0).all()
        assert quantize_mxfp4(torch.zeros(3, 32)).dequantize().eq(0).all()
        assert torch.isfinite(quantize_mxfp4(torch.randn(4, 64) * 1e30).dequantize()).all()


# ---------------------------------------------------------------------------------------------
# FP8 e4m3 with 128x128 block scales
# ---------------------------------------------------------------------------------------------

class TestFP8Block:
    def test_block_scale_placement(self):
        w = torch.ones(256, 256).to(E4M3)
        scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        out = FP8BlockTensor(w, scale).dequantize()
        assert out[0, 0] == 1 and out[127, 127] == 1 and out[0, 128] == 2
        assert out[128, 0] == 3 and out[255, 255] == 4 and out[128, 127] == 3

    def test_ragged_edges(self):
        w = torch.full((130, 200), 0.5).to(E4M3)
        scale = torch.tensor([[1.0, 2.0], [4.0, 8.0]])  # ceil(130/128) x ceil(200/128)
        out = dequantize_fp8_block(w, scale)
        assert out.shape == (130, 200)
        assert out[127, 127] == 0.5 and out[127, 128] == 1.0 and out[129, 0] == 2.0
        assert out[129, 199] == 4.0

    def test_scale_name_agnostic_and_ue8m0_scales(self):
        torch.manual_seed(8)
        w = torch.randn(256, 384).to(E4M3)
        weight_scale_inv = 2.0 ** torch.randint(-10, 3, (2, 3)).float()  # HF V3-style name
        ref = dequantize_fp8_block(w, weight_scale_inv)
        assert torch.equal(ref, w.float() * weight_scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1))
        as_bytes = float_to_ue8m0(weight_scale_inv)
        assert torch.equal(dequantize_fp8_block(w, as_bytes), ref)
        if HAS_FLOAT8_E8M0:
            assert torch.equal(dequantize_fp8_block(w, as_bytes.view(torch.float8_e8m0fnu)), ref)

    def test_batched_experts(self):
        torch.manual_seed(9)
        w = torch.randn(3, 130, 256)
        t = quantize_fp8_block(w)
        assert t.scale.shape == (3, 2, 2)
        assert rel_err(t.dequantize(), w) < 0.035

    def test_quantize_recipe(self):
        torch.manual_seed(10)
        w = torch.randn(200, 300)
        t = quantize_fp8_block(w)
        assert t.weight.dtype == E4M3 and t.scale.dtype == torch.float32
        assert t.scale.shape == (2, 3)
        assert t.scale[1, 2].item() == (w[128:, 256:].abs().max() / 448).item()
        assert t.weight[128:, 256:].float().abs().max() == 448

    def test_ue8m0_scale_is_power_of_two_rounded_up(self):
        torch.manual_seed(11)
        w = torch.randn(256, 256)
        t = quantize_fp8_block(w, ue8m0_scale=True)
        exact = w.view(2, 128, 2, 128).abs().amax(dim=(1, 3)) / 448
        assert torch.equal(t.scale, 2.0 ** torch.ceil(torch.log2(exact)))
        float_to_ue8m0(t.scale)  # representable
        assert rel_err(t.dequantize(), w) < 0.035

    @pytest.mark.parametrize("shape", [(128, 128), (256, 512), (300, 200), (64, 1000)])
    def test_random_normal_error_bound(self, shape):
        torch.manual_seed(12)
        w = torch.randn(shape)
        assert rel_err(quantize_fp8_block(w).dequantize(), w) < 0.035  # measured ~0.027

    def test_on_grid_values_roundtrip_bit_exactly(self):
        torch.manual_seed(13)
        q = (torch.randn(256, 256) * 50).clamp(-440, 440).to(E4M3)
        q[0, 0] = q[0, 200] = q[200, 0] = q[200, 200] = 448.0  # each block's amax is 448
        scale = torch.tensor([[2.0**-8, 1.0], [0.125, 4.0]])
        again = quantize_fp8_block(FP8BlockTensor(q, scale).dequantize())
        assert same_bits(again.weight, q) and torch.equal(again.scale, scale)

    def test_zero_blocks(self):
        w = torch.randn(256, 256)
        w[:128, 128:] = 0
        t = quantize_fp8_block(w)
        out = t.dequantize()
        assert t.scale[0, 1] == 0 and out[:128, 128:].eq(0).all() and torch.isfinite(out).all()
        t = quantize_fp8_block(w, ue8m0_scale=True)
        assert t.scale[0, 1] == 1.0 and t.dequantize()[:128, 128:].eq(0).all()


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

class TestErrors:
    def test_error_hierarchy(self):
        assert issubclass(CheckpointFormatError, DSV4Error)

    def test_nvfp4_wrong_dtypes(self):
        good_scale = torch.ones(2, 2).to(E4M3)
        with pytest.raises(CheckpointFormatError, match="uint8"):
            NVFP4Tensor(torch.zeros(2, 16), good_scale, torch.tensor(1.0))
        with pytest.raises(CheckpointFormatError, match="float8_e4m3fn"):
            NVFP4Tensor(torch.zeros(2, 16, dtype=torch.uint8), torch.ones(2, 2), torch.tensor(1.0))
        with pytest.raises(CheckpointFormatError, match="float32"):
            NVFP4Tensor(torch.zeros(2, 16, dtype=torch.uint8), good_scale,
                        torch.tensor(1.0, dtype=torch.bfloat16))

    def test_nvfp4_shape_errors(self):
        p = torch.zeros(2, 16, dtype=torch.uint8)  # K = 32 -> 2 blocks
        with pytest.raises(CheckpointFormatError, match="shape"):
            NVFP4Tensor(p, torch.ones(2, 1).to(E4M3), torch.tensor(1.0))
        with pytest.raises(CheckpointFormatError, match="scalar"):
            NVFP4Tensor(p, torch.ones(2, 2).to(E4M3), torch.ones(2))
        with pytest.raises(CheckpointFormatError, match="divisible by the block size 16"):
            dequantize_nvfp4(torch.zeros(2, 12, dtype=torch.uint8), torch.ones(2, 1).to(E4M3), 1.0)

    def test_mxfp4_errors(self):
        p = torch.zeros(2, 32, dtype=torch.uint8)  # K = 64 -> 2 blocks
        with pytest.raises(CheckpointFormatError, match="UE8M0"):
            MXFP4Tensor(p, torch.ones(2, 2))
        with pytest.raises(CheckpointFormatError, match="shape"):
            MXFP4Tensor(p, torch.ones(2, 4, dtype=torch.uint8))
        with pytest.raises(CheckpointFormatError, match="divisible by the block size 32"):
            dequantize_mxfp4(torch.zeros(2, 24, dtype=torch.uint8), torch.ones(2, 1, dtype=torch.uint8))

    def test_fp8_block_errors(self):
        with pytest.raises(CheckpointFormatError, match="float8_e4m3fn"):
            FP8BlockTensor(torch.ones(128, 128, dtype=torch.bfloat16), torch.ones(1, 1))
        with pytest.raises(CheckpointFormatError, match="expected \\(2, 1\\)"):
            dequantize_fp8_block(torch.ones(129, 128).to(E4M3), torch.ones(1, 1))
        with pytest.raises(CheckpointFormatError, match="block scale"):
            dequantize_fp8_block(torch.ones(128, 128).to(E4M3), torch.ones(1, 1, dtype=torch.int32))
        with pytest.raises(CheckpointFormatError, match="at least 2 dims"):
            dequantize_fp8_block(torch.ones(128).to(E4M3), torch.ones(1))

    def test_quantize_input_errors(self):
        with pytest.raises(CheckpointFormatError, match="divisible by the block size 16"):
            quantize_nvfp4(torch.randn(4, 24))
        with pytest.raises(CheckpointFormatError, match="divisible by the block size 32"):
            quantize_mxfp4(torch.randn(4, 48))
        with pytest.raises(CheckpointFormatError, match="float32/float16/bfloat16"):
            quantize_nvfp4(torch.ones(4, 32, dtype=torch.int32))
        with pytest.raises(CheckpointFormatError, match="float32/float16/bfloat16"):
            quantize_fp8_block(torch.ones(4, 32).to(E4M3))
        w = torch.randn(4, 32)
        w[1, 3] = math.nan
        for fn in (quantize_nvfp4, quantize_mxfp4, quantize_fp8_block):
            with pytest.raises(CheckpointFormatError, match="NaN or Inf"):
                fn(w)

    def test_pack_errors(self):
        with pytest.raises(CheckpointFormatError, match="even"):
            pack_e2m1(torch.zeros(3, dtype=torch.uint8))
        with pytest.raises(CheckpointFormatError, match="\\[0, 15\\]"):
            pack_e2m1(u8(16, 0))
        with pytest.raises(CheckpointFormatError, match="uint8"):
            pack_e2m1(torch.zeros(4, dtype=torch.int64))
