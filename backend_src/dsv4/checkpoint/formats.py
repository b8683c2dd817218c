"""Weight quantisation formats used by DeepSeek-V4 checkpoints (pure torch, exact, vectorised).

Three formats are covered:

NVFP4 (NVIDIA ModelOpt)
    ``weight``        uint8 ``[..., K//2]`` -- two e2m1 codes per byte along K (in_features).
    ``weight_scale``  float8_e4m3fn ``[..., K//16]`` -- one scale per 16 consecutive K elements.
    ``weight_scale_2`` float32 scalar (shape ``[]`` or ``[1]``) -- per-tensor second-level scale.
    value = e2m1 * float(weight_scale[block]) * weight_scale_2

MXFP4 (OCP Microscaling; DeepSeek official routed experts)
    packed e2m1 exactly as NVFP4, plus a UE8M0 scale per 32 consecutive K elements stored either
    as uint8 biased exponents (bias 127) or as ``torch.float8_e8m0fnu`` (both accepted on read).
    value = e2m1 * 2**(scale_byte - 127)

FP8 block (DeepSeek official non-expert weights)
    ``weight`` float8_e4m3fn ``[..., N, K]`` and a multiplier per 128x128 block, float32
    ``[..., ceil(N/128), ceil(K/128)]`` (called ``scale`` in DeepSeek's checkpoint and
    ``weight_scale_inv`` in HF V3-style checkpoints -- pass either tensor as ``scale``).
    Scales may also be UE8M0 (``float8_e8m0fnu`` or uint8 exponent bytes).
    value = fp8 * scale[n // 128, k // 128]; ragged edges are allowed.

Nibble order (ModelOpt / vLLM / OCP convention): along the last dim, element ``2i`` lives in the
LOW nibble (bits 0-3) of byte ``i`` and element ``2i+1`` in the HIGH nibble (bits 4-7).
An e2m1 code is ``sign(bit 3) | magnitude index(bits 0-2)`` into ``{0, .5, 1, 1.5, 2, 3, 4, 6}``.

All arithmetic is done in float32. Dequantisation is exact (e2m1 * e4m3 products are exact in
float32; only the final ``* weight_scale_2`` rounds once). Quantisation rounds to nearest, ties to
even, and saturates at the format's maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

from dsv4.errors import CheckpointFormatError

__all__ = [
    "E2M1_VALUES",
    "E2M1_MAX",
    "FP8_E4M3_MAX",
    "NVFP4_BLOCK",
    "MXFP4_BLOCK",
    "FP8_BLOCK",
    "HAS_FLOAT8_E8M0",
    "e2m1_encode",
    "e2m1_decode",
    "pack_e2m1",
    "unpack_e2m1",
    "ue8m0_to_float",
    "float_to_ue8m0",
    "NVFP4Tensor",
    "MXFP4Tensor",
    "FP8BlockTensor",
    "quantize_nvfp4",
    "quantize_mxfp4",
    "quantize_fp8_block",
    "dequantize_nvfp4",
    "dequantize_mxfp4",
    "dequantize_fp8_block",
]

NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
FP8_BLOCK = 128
E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0

_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Code -> value for all 16 codes (8..15 are the negatives; code 8 is -0.0).
E2M1_VALUES: Tensor = torch.tensor(
    list(_E2M1_MAGNITUDES) + [-m for m in _E2M1_MAGNITUDES], dtype=torch.float32
)
# Private copies so that a caller mutating E2M1_VALUES cannot corrupt decoding.
_E2M1_LUT = E2M1_VALUES.clone()
# Byte -> (low-nibble value, high-nibble value), used to decode packed bytes in one gather.
_E2M1_PAIR_LUT = torch.stack(
    [_E2M1_LUT[torch.arange(256) & 0xF], _E2M1_LUT[torch.arange(256) >> 4]], dim=-1
).contiguous()

# Round-to-nearest-even decision thresholds on the magnitude. At a midpoint the code with an
# even index (mantissa bit 0) wins, hence the alternating strict / non-strict comparisons:
# 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0.
_E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
                    (2.5, False), (3.5, True), (5.0, False))  # (threshold, inclusive)

HAS_FLOAT8_E8M0 = hasattr(torch, "float8_e8m0fnu")
_E8M0_DTYPE = getattr(torch, "float8_e8m0fnu", None)
_FP4X2_DTYPE = getattr(torch, "float4_e2m1fn_x2", None)
_FP8_E4M3 = torch.float8_e4m3fn

ScaleLike = Union[Tensor, float]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _shape(t: Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _as_packed_u8(packed: Tensor, what: str) -> Tensor:
    """Accept uint8 (ModelOpt), int8 or float4_e2m1fn_x2 storage of packed e2m1 pairs."""
    if not isinstance(packed, Tensor):
        raise CheckpointFormatError(f"{what}: expected a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype == torch.uint8:
        return packed
    if packed.dtype == torch.int8 or (_FP4X2_DTYPE is not None and packed.dtype == _FP4X2_DTYPE):
        return packed.view(torch.uint8)
    raise CheckpointFormatError(
        f"{what}: packed e2m1 data must be uint8 (two codes per byte), got {packed.dtype}"
    )


def _check_float_input(w: Tensor, min_dim: int, what: str) -> Tensor:
    if not isinstance(w, Tensor):
        raise CheckpointFormatError(f"{what}: expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point() or w.dtype.itemsize < 2:
        raise CheckpointFormatError(
            f"{what}: expected a float32/float16/bfloat16 weight, got {w.dtype}"
        )
    if w.dim() < min_dim:
        raise CheckpointFormatError(f"{what}: expected at least {min_dim} dims, got shape {_shape(w)}")
    w32 = w.to(torch.float32)
    if not bool(torch.isfinite(w32).all()):
        raise CheckpointFormatError(f"{what}: weight contains NaN or Inf")
    return w32


def _check_block_divides(k: int, block: int, what: str) -> None:
    if k % block != 0:
        raise CheckpointFormatError(
            f"{what}: K (last dim) = {k} is not divisible by the block size {block}"
        )


def _safe_div(x: Tensor, s: Tensor) -> Tensor:
    """x / s, with 0 wherever s == 0 (a zero scale means the whole block decodes to zero)."""
    nz = s > 0
    return torch.where(nz, x / torch.where(nz, s, torch.ones_like(s)), torch.zeros_like(x))


# --------------------------------------------------------------------------------------------
# e2m1 codes and packing
# --------------------------------------------------------------------------------------------

def e2m1_encode(x: Tensor) -> Tensor:
    """Float -> e2m1 code (uint8 in [0, 15]), round-to-nearest-even, saturating at +-6.

    The sign bit (bit 3) follows ``signbit(x)``, so -0.0 encodes to code 8.
    """
    x = x.to(torch.float32)
    mag = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for thr, inclusive in _E2M1_THRESHOLDS:
        code += (mag >= thr) if inclusive else (mag > thr)
    code |= torch.signbit(x).to(torch.uint8) << 3
    return code


def e2m1_decode(codes: Tensor) -> Tensor:
    """e2m1 codes (uint8 in [0, 15]) -> float32 values."""
    if codes.dtype != torch.uint8:
        raise CheckpointFormatError(f"e2m1 codes must be uint8, got {codes.dtype}")
    lut = _E2M1_LUT.to(codes.device)
    return lut.index_select(0, (codes & 0xF).reshape(-1).to(torch.int32)).view(codes.shape)


def pack_e2m1(codes: Tensor) -> Tensor:
    """uint8 codes ``[..., K]`` -> packed uint8 ``[..., K//2]``.

    Element 2i goes to the low nibble, element 2i+1 to the high nibble (ModelOpt / vLLM order).
    """
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        raise CheckpointFormatError(
            f"pack_e2m1: codes must be a uint8 tensor, got "
            f"{codes.dtype if isinstance(codes, Tensor) else type(codes).__name__}"
        )
    if codes.dim() < 1 or codes.shape[-1] % 2 != 0:
        raise CheckpointFormatError(
            f"pack_e2m1: last dim must be even, got shape {_shape(codes)}"
        )
    if codes.numel() and int(codes.max()) > 0xF:
        raise CheckpointFormatError("pack_e2m1: codes must be in [0, 15]")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_e2m1(packed: Tensor) -> Tensor:
    """Packed ``[..., K//2]`` (uint8 / int8 / float4_e2m1fn_x2) -> uint8 codes ``[..., K]``."""
    p = _as_packed_u8(packed, "unpack_e2m1")
    if p.dim() < 1:
        raise CheckpointFormatError("unpack_e2m1: packed tensor must have at least 1 dim")
    lo = p & 0xF
    hi = p >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def _decode_packed(p: Tensor) -> Tensor:
    """Packed uint8 ``[..., K//2]`` -> float32 values ``[..., K]`` (one gather per byte)."""
    lut = _E2M1_PAIR_LUT.to(p.device)
    vals = lut.index_select(0, p.reshape(-1).to(torch.int32))
    return vals.view(*p.shape[:-1], p.shape[-1] * 2)


# --------------------------------------------------------------------------------------------
# UE8M0
# --------------------------------------------------------------------------------------------

def _ue8m0_bytes(t: Tensor, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise CheckpointFormatError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.uint8:
        return t
    if _E8M0_DTYPE is not None and t.dtype == _E8M0_DTYPE:
        return t.view(torch.uint8)
    raise CheckpointFormatError(
        f"{what}: UE8M0 scales must be uint8 exponent bytes or float8_e8m0fnu, got {t.dtype}"
    )


def ue8m0_to_float(t: Tensor) -> Tensor:
    """UE8M0 scale (uint8 biased exponent or float8_e8m0fnu) -> float32 ``2**(byte - 127)``.

    Exact for every byte: 0 -> 2**-127 (a float32 subnormal), 254 -> 2**127, 255 -> NaN.
    """
    b = _ue8m0_bytes(t, "ue8m0_to_float").to(torch.int32)
    # Build float32 bit patterns directly: normal exponent field e for 1..254.
    bits = b << 23
    bits = torch.where(b == 0, torch.full_like(bits, 0x00400000), bits)  # 2**-127 subnormal
    bits = torch.where(b == 255, torch.full_like(bits, 0x7FC00000), bits)  # NaN
    return bits.view(torch.float32)


def float_to_ue8m0(t: Tensor, *, as_e8m0: bool = False) -> Tensor:
    """Exact powers of two (float) -> UE8M0 bytes (uint8, or float8_e8m0fnu if ``as_e8m0``).

    Raises CheckpointFormatError for values that are not exactly ``2**e`` with -127 <= e <= 127.
    """
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise CheckpointFormatError("float_to_ue8m0: expected a floating-point tensor")
    x = t.to(torch.float32)
    mant, exp = torch.frexp(x)  # x = mant * 2**exp, mant in [0.5, 1)
    ok = (mant == 0.5) & (exp - 1 >= -127) & (exp - 1 <= 127)
    if not bool(ok.all()):
        raise CheckpointFormatError(
            "float_to_ue8m0: every value must be a power of two in [2**-127, 2**127]"
        )
    out = (exp - 1 + 127).to(torch.uint8)
    if as_e8m0:
        if _E8M0_DTYPE is None:
            raise CheckpointFormatError("float_to_ue8m0: this torch build has no float8_e8m0fnu")
        out = out.view(_E8M0_DTYPE)
    return out


def _scale_to_float(scale: Tensor, what: str) -> Tensor:
    """FP8-block scale -> float32 multiplier (float dtypes as-is, uint8/e8m0 as UE8M0)."""
    if not isinstance(scale, Tensor):
        raise CheckpointFormatError(f"{what}: expected a torch.Tensor, got {type(scale).__name__}")
    if scale.dtype == torch.uint8 or (_E8M0_DTYPE is not None and scale.dtype == _E8M0_DTYPE):
        return ue8m0_to_float(scale)
    if scale.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return scale.to(torch.float32)
    raise CheckpointFormatError(
        f"{what}: block scale must be float32 (or bf16/fp16) or UE8M0 "
        f"(uint8 / float8_e8m0fnu), got {scale.dtype}"
    )


# --------------------------------------------------------------------------------------------
# NVFP4
# --------------------------------------------------------------------------------------------

def _check_nvfp4(packed: Tensor, scale: Tensor, scale_2: ScaleLike) -> Tuple[Tensor, Tensor]:
    p = _as_packed_u8(packed, "NVFP4 weight")
    if p.dim() < 1:
        raise CheckpointFormatError("NVFP4 weight: packed tensor must have at least 1 dim")
    k = p.shape[-1] * 2
    _check_block_divides(k, NVFP4_BLOCK, "NVFP4 weight")
    if not isinstance(scale, Tensor) or scale.dtype != _FP8_E4M3:
        raise CheckpointFormatError(
            "NVFP4 weight_scale must be a torch.float8_e4m3fn tensor, got "
            f"{scale.dtype if isinstance(scale, Tensor) else type(scale).__name__}"
        )
    want = _shape(p)[:-1] + (k // NVFP4_BLOCK,)
    if _shape(scale) != want:
        raise CheckpointFormatError(
            f"NVFP4 weight_scale shape {_shape(scale)} does not match packed weight "
            f"{_shape(p)} (expected {want}: one scale per {NVFP4_BLOCK} K elements)"
        )
    if isinstance(scale_2, (int, float)):
        s2 = torch.tensor(float(scale_2), dtype=torch.float32)
    elif isinstance(scale_2, Tensor):
        if scale_2.dtype != torch.float32:
            raise CheckpointFormatError(
                f"NVFP4 weight_scale_2 must be float32, got {scale_2.dtype}"
            )
        if scale_2.numel() != 1:
            raise CheckpointFormatError(
                f"NVFP4 weight_scale_2 must be a per-tensor scalar (shape [] or [1]), "
                f"got shape {_shape(scale_2)}"
            )
        s2 = scale_2.reshape(())
    else:
        raise CheckpointFormatError(
            f"NVFP4 weight_scale_2 must be a float32 tensor, got {type(scale_2).__name__}"
        )
    return p, s2


def dequantize_nvfp4(
    packed: Tensor, scale: Tensor, scale_2: ScaleLike, dtype: torch.dtype = torch.float32
) -> Tensor:
    """NVFP4 -> dense ``[..., K]``: ``e2m1 * float(scale[..., k // 16]) * scale_2``."""
    p, s2 = _check_nvfp4(packed, scale, scale_2)
    vals = _decode_packed(p)
    k = vals.shape[-1]
    blocks = vals.view(*vals.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    blocks.mul_(scale.to(torch.float32).unsqueeze(-1))  # exact: e2m1 * e4m3 fits in fp32
    blocks.mul_(s2.to(vals.device))
    return vals.to(dtype)


@dataclass(frozen=True)
class NVFP4Tensor:
    """NVFP4 weight: ``packed`` uint8 [..., K//2], ``scale`` e4m3 [..., K//16], ``scale_2`` fp32 []."""

    packed: Tensor
    scale: Tensor
    scale_2: Tensor

    def __post_init__(self) -> None:
        _check_nvfp4(self.packed, self.scale, self.scale_2)

    @property
    def shape(self) -> Tuple[int, ...]:
        """Logical (unpacked) shape ``[..., K]``."""
        return _shape(self.packed)[:-1] + (self.packed.shape[-1] * 2,)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_nvfp4(self.packed, self.scale, self.scale_2, dtype)


def quantize_nvfp4(w: Tensor) -> NVFP4Tensor:
    """Dense ``[..., K]`` (K % 16 == 0) -> NVFP4 with ModelOpt's two-level scaling.

    ``scale_2 = amax / (6 * 448)``; block scale = ``e4m3(block_amax / 6 / scale_2)``;
    codes = RNE(w / (block_scale * scale_2)) on the e2m1 grid. Zero blocks (or blocks whose e4m3
    scale underflows) get scale 0 and all-zero codes.
    """
    w32 = _check_float_input(w, 1, "quantize_nvfp4")
    k = w32.shape[-1]
    _check_block_divides(k, NVFP4_BLOCK, "quantize_nvfp4")
    amax = w32.abs().amax() if w32.numel() else torch.zeros((), dtype=torch.float32)
    scale_2 = (amax / (E2M1_MAX * FP8_E4M3_MAX)).to(torch.float32).reshape(())
    blocks = w32.view(*w32.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    bscale = _safe_div(block_amax / E2M1_MAX, scale_2.expand_as(block_amax))
    scale = bscale.clamp(max=FP8_E4M3_MAX).to(_FP8_E4M3)
    eff = scale.to(torch.float32) * scale_2
    codes = e2m1_encode(_safe_div(blocks, eff.unsqueeze(-1))).view(w32.shape)
    return NVFP4Tensor(packed=pack_e2m1(codes), scale=scale, scale_2=scale_2)


# --------------------------------------------------------------------------------------------
# MXFP4
# --------------------------------------------------------------------------------------------

def _check_mxfp4(packed: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    p = _as_packed_u8(packed, "MXFP4 weight")
    if p.dim() < 1:
        raise CheckpointFormatError("MXFP4 weight: packed tensor must have at least 1 dim")
    k = p.shape[-1] * 2
    _check_block_divides(k, MXFP4_BLOCK, "MXFP4 weight")
    sb = _ue8m0_bytes(scale, "MXFP4 scale")
    want = _shape(p)[:-1] + (k // MXFP4_BLOCK,)
    if _shape(sb) != want:
        raise CheckpointFormatError(
            f"MXFP4 scale shape {_shape(sb)} does not match packed weight {_shape(p)} "
            f"(expected {want}: one scale per {MXFP4_BLOCK} K elements)"
        )
    return p, sb


def dequantize_mxfp4(packed: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """MXFP4 -> dense ``[..., K]``: ``e2m1 * 2**(scale[..., k // 32] - 127)``."""
    p, sb = _check_mxfp4(packed, scale)
    vals = _decode_packed(p)
    k = vals.shape[-1]
    blocks = vals.view(*vals.shape[:-1], k // MXFP4_BLOCK, MXFP4_BLOCK)
    blocks.mul_(ue8m0_to_float(sb).unsqueeze(-1))  # power-of-two multiply: exact
    return vals.to(dtype)


@dataclass(frozen=True)
class MXFP4Tensor:
    """MXFP4 weight: ``packed`` uint8 [..., K//2], ``scale`` UE8M0 [..., K//32] (uint8 or e8m0)."""

    packed: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        _check_mxfp4(self.packed, self.scale)

    @property
    def shape(self) -> Tuple[int, ...]:
        return _shape(self.packed)[:-1] + (self.packed.shape[-1] * 2,)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_mxfp4(self.packed, self.scale, dtype)


def quantize_mxfp4(w: Tensor, *, scale_dtype: torch.dtype = torch.uint8) -> MXFP4Tensor:
    """Dense ``[..., K]`` (K % 32 == 0) -> MXFP4 (OCP MX rule).

    Shared exponent = ``floor(log2(block_amax)) - 2`` (2 = largest e2m1 exponent), clamped to
    [-127, 127]; elements are RNE-rounded to e2m1 and clamped to +-6. All-zero blocks get scale
    byte 127 (1.0) and zero codes. ``scale_dtype`` is uint8 (default) or torch.float8_e8m0fnu.
    """
    if scale_dtype != torch.uint8 and (_E8M0_DTYPE is None or scale_dtype != _E8M0_DTYPE):
        raise CheckpointFormatError(
            f"quantize_mxfp4: scale_dtype must be uint8 or float8_e8m0fnu, got {scale_dtype}"
        )
    w32 = _check_float_input(w, 1, "quantize_mxfp4")
    k = w32.shape[-1]
    _check_block_divides(k, MXFP4_BLOCK, "quantize_mxfp4")
    blocks = w32.view(*w32.shape[:-1], k // MXFP4_BLOCK, MXFP4_BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    _, e = torch.frexp(block_amax)  # amax = m * 2**e, m in [0.5, 1) => floor(log2) = e - 1
    shared = torch.where(block_amax > 0, e - 1 - 2, torch.zeros_like(e)).clamp(-127, 127)
    sbytes = (shared + 127).to(torch.uint8)
    codes = e2m1_encode(blocks / ue8m0_to_float(sbytes).unsqueeze(-1)).view(w32.shape)
    if scale_dtype != torch.uint8:
        sbytes = sbytes.view(scale_dtype)
    return MXFP4Tensor(packed=pack_e2m1(codes), scale=sbytes)


# --------------------------------------------------------------------------------------------
# FP8 e4m3 with 2-D block scales
# --------------------------------------------------------------------------------------------

def _block_hw(block: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(block, int):
        bn = bk = block
    else:
        try:
            bn, bk = (int(b) for b in block)
        except (TypeError, ValueError):
            raise CheckpointFormatError(f"block must be an int or a pair of ints, got {block!r}")
    if bn <= 0 or bk <= 0:
        raise CheckpointFormatError(f"block sizes must be positive, got {(bn, bk)}")
    return bn, bk


def _check_fp8_block(weight: Tensor, scale: Tensor, block) -> Tuple[Tensor, int, int]:
    bn, bk = _block_hw(block)
    if not isinstance(weight, Tensor) or weight.dtype != _FP8_E4M3:
        raise CheckpointFormatError(
            "FP8 block weight must be torch.float8_e4m3fn, got "
            f"{weight.dtype if isinstance(weight, Tensor) else type(weight).__name__}"
        )
    if weight.dim() < 2:
        raise CheckpointFormatError(
            f"FP8 block weight must have at least 2 dims [..., N, K], got {_shape(weight)}"
        )
    sf = _scale_to_float(scale, "FP8 block scale")
    n, k = weight.shape[-2:]
    want = _shape(weight)[:-2] + (math.ceil(n / bn), math.ceil(k / bk))
    if _shape(sf) != want:
        raise CheckpointFormatError(
            f"FP8 block scale shape {_shape(sf)} does not match weight {_shape(weight)} "
            f"with {bn}x{bk} blocks (expected {want})"
        )
    return sf, bn, bk


def dequantize_fp8_block(
    weight: Tensor,
    scale: Tensor,
    block: Union[int, Sequence[int]] = FP8_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """FP8 e4m3 ``[..., N, K]`` * per-block scale ``[..., ceil(N/bn), ceil(K/bk)]``.

    ``scale`` is DeepSeek's ``scale`` or HF's ``weight_scale_inv`` (a multiplier), float32 or
    UE8M0 (uint8 / float8_e8m0fnu).
    """
    sf, bn, bk = _check_fp8_block(weight, scale, block)
    n, k = weight.shape[-2:]
    out = weight.to(torch.float32)
    nb, kb = sf.shape[-2:]
    if n == nb * bn and k == kb * bk:
        out.view(*out.shape[:-2], nb, bn, kb, bk).mul_(sf[..., :, None, :, None])
    else:  # ragged edge: expand the scale grid and crop
        full = sf.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
        out.mul_(full)
    return out.to(dtype)


@dataclass(frozen=True)
class FP8BlockTensor:
    """FP8 block weight: ``weight`` e4m3 [..., N, K]; ``scale`` [..., ceil(N/bn), ceil(K/bk)]."""

    weight: Tensor
    scale: Tensor
    block: Tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)

    def __post_init__(self) -> None:
        _check_fp8_block(self.weight, self.scale, self.block)

    @property
    def shape(self) -> Tuple[int, ...]:
        return _shape(self.weight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_fp8_block(self.weight, self.scale, self.block, dtype)


def quantize_fp8_block(
    w: Tensor, block: Union[int, Sequence[int]] = FP8_BLOCK, *, ue8m0_scale: bool = False
) -> FP8BlockTensor:
    """Dense ``[..., N, K]`` -> e4m3 with one float32 multiplier per block (ragged edges ok).

    scale = block_amax / 448 (all-zero block -> 0). With ``ue8m0_scale=True`` the scale is
    rounded UP to a power of two (DeepSeek's UE8M0 recipe; all-zero block -> 1.0); it is still
    returned as float32 -- use ``float_to_ue8m0`` to store it as UE8M0.
    """
    bn, bk = _block_hw(block)
    w32 = _check_float_input(w, 2, "quantize_fp8_block")
    n, k = w32.shape[-2:]
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.nn.functional.pad(w32, (0, kb * bk - k, 0, nb * bn - n))
    blocks = padded.view(*w32.shape[:-2], nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = amax / FP8_E4M3_MAX
    if ue8m0_scale:
        mant, e = torch.frexp(scale)
        up = torch.where(mant == 0.5, e - 1, e).clamp(-127, 127)  # ceil(log2(scale))
        pow2 = ue8m0_to_float((up + 127).to(torch.uint8))  # exact 2**up
        scale = torch.where(scale > 0, pow2, torch.ones_like(scale))
    q = _safe_div(blocks, scale[..., :, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = q.view(padded.shape)[..., :n, :k].to(_FP8_E4M3).contiguous()
    return FP8BlockTensor(weight=q, scale=scale.contiguous(), block=(bn, bk))
