"""The FP8 KV-cache row: what one cached vector (window KV, compressed entry or indexer key) becomes in memory.

FlashMLA's DeepSeek-V4 cache entry, generalised to any (dim, rope_dim): the non-RoPE channels as FP8 e4m3, one
power-of-two scale (UE8M0: a biased exponent byte) per 64 of them, the RoPE channels kept in BF16 (rotated values
lose too much as FP8), then padding to a multiple of 8 bytes:

    [ nope = dim - rope_dim bytes of e4m3 | 2 * rope_dim bytes of bf16 | ceil(nope / 64) exponent bytes | pad ]

For dim 512, rope_dim 64: 448 + 128 + 7 + 1 = 584 bytes (FlashMLA's 584-byte entry) instead of 1024 in BF16. The
scale of a group is the smallest power of two that maps its largest magnitude into e4m3's range (448), so a value is
kept to e4m3's 3 mantissa bits relative to its group. A row of zeros stores exponent 0 (scale 2^-127).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

GROUP = 64
E4M3_MAX = 448.0
EXP_BIAS = 127


def scale_exponent(amax: Tensor) -> Tensor:
    """The smallest e with amax <= 448 * 2^e, from amax's fp32 bits (exact, no log2 rounding; the GPU kernel
    computes the same): amax = (1 + f) 2^A, and 448 = 1.75 * 2^8, so e = A - 8, plus one when f > 0.75. A zero or
    subnormal amax gives the bottom exponent -127."""
    bits = amax.float().contiguous().view(torch.int32)
    a = ((bits >> 23) & 0xFF) - EXP_BIAS
    e = a - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    return torch.where(a == -EXP_BIAS, torch.full_like(e, -EXP_BIAS), e).clamp(-EXP_BIAS, EXP_BIAS)


def inverse_scale(exp: Tensor) -> Tensor:
    """2^-exp as fp32, built from its bits (exact; exp <= 120 for any finite fp32 amax, so it stays normal)."""
    return ((EXP_BIAS - exp.clamp(max=EXP_BIAS - 1)) << 23).to(torch.int32).view(torch.float32)


@dataclass(frozen=True)
class Fp8Rows:
    dim: int
    rope_dim: int

    def __post_init__(self) -> None:
        if self.dim % 2 or self.rope_dim % 2 or not 0 <= self.rope_dim < self.dim:
            raise ValueError(f"FP8 cache rows need even dims with rope_dim < dim, got {self.dim}, {self.rope_dim}")

    @property
    def nope(self) -> int:
        return self.dim - self.rope_dim

    @property
    def groups(self) -> int:
        return -(-self.nope // GROUP)

    @property
    def row_bytes(self) -> int:
        return -(-(self.nope + 2 * self.rope_dim + self.groups) // 8) * 8

    def quantize(self, x: Tensor) -> Tensor:
        """[..., dim] float -> [..., row_bytes] uint8."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.dim).float()
        n, g = x.shape[0], self.groups
        nope = torch.zeros((n, g * GROUP), dtype=torch.float32, device=x.device)
        nope[:, :self.nope] = x[:, :self.nope]
        nope = nope.view(n, g, GROUP)
        exp = scale_exponent(nope.abs().amax(-1))
        q = (nope * inverse_scale(exp)[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        out = torch.zeros((n, self.row_bytes), dtype=torch.uint8, device=x.device)
        out[:, :self.nope] = q.view(n, g * GROUP)[:, :self.nope].view(torch.uint8)
        r0 = self.nope + 2 * self.rope_dim
        out[:, self.nope:r0] = x[:, self.nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
        out[:, r0:r0 + g] = (exp + EXP_BIAS).to(torch.uint8)
        return out.view(*lead, self.row_bytes)

    def dequantize(self, rows: Tensor) -> Tensor:
        """[..., row_bytes] uint8 -> [..., dim] fp32."""
        lead = rows.shape[:-1]
        rows = rows.reshape(-1, self.row_bytes)
        n, g = rows.shape[0], self.groups
        r0 = self.nope + 2 * self.rope_dim
        exp = rows[:, r0:r0 + g].float() - EXP_BIAS
        scale = torch.exp2(exp).repeat_interleave(GROUP, dim=1)[:, :self.nope]
        out = torch.empty((n, self.dim), dtype=torch.float32, device=rows.device)
        out[:, :self.nope] = rows[:, :self.nope].contiguous().view(torch.float8_e4m3fn).float() * scale
        out[:, self.nope:] = rows[:, self.nope:r0].contiguous().view(torch.bfloat16).float()
        return out.view(*lead, self.dim)

    def round_trip(self, x: Tensor) -> Tensor:
        """What reading back a stored `x` gives (the reference model uses it to see what the cache holds)."""
        return self.dequantize(self.quantize(x)).to(x.dtype)
