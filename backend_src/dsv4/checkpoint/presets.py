"""Model shapes we generate random checkpoints for.

`PRESETS[name](n_layers)` returns a `ModelConfig`; `n_layers=None` keeps the preset's default depth.

tiny         CPU test model (2.5 MB in NVFP4, 4.7 MB in BF16): every layer kind of DeepSeek-V4 in 5 layers + 1 MTP.
small        GPU test model: the real per-head dims (head_dim 512, rope 64, index_head_dim 128, window 128)
             at width 1024 with the V4 layer-kind mix; 0.33 GB in NVFP4.
flash-layers the real DeepSeek-V4-Flash dims and vocab with only the first few layers (default 2) + its MTP
             layer; ~3.6 GB of routed experts per layer in NVFP4 (MTP: MXFP4), + 2 GB embed/head.
pro-layers   the same for DeepSeek-V4-Pro (~14 GB of routed experts per layer in NVFP4).

Vocabulary: tiny and small use our own byte-level BPE tokenizer (`dsv4.checkpoint.tokenizer`) of
`TOKENIZER_VOCAB_SIZE` ids, so `vocab_size` equals the tokenizer's size. flash-layers and pro-layers keep the real
vocab_size 129280 (the embedding/head/tid2eid shapes then match the release) while still shipping that small
tokenizer: ids >= TOKENIZER_VOCAB_SIZE exist as embedding and head rows but no text ever encodes to them (the
model may still sample them; the detokenizer must then treat them as unknown ids).
"""

from __future__ import annotations

from typing import Callable

from dsv4.config import ModelConfig, RopeConfig
from dsv4.errors import ConfigError

TOKENIZER_VOCAB_SIZE = 512
BOS_TOKEN_ID = 0   # "<｜begin▁of▁sentence｜>", as in DeepSeek's tokenizer
EOS_TOKEN_ID = 1   # "<｜end▁of▁sentence｜>"

# The release's compressed-attention RoPE (docs/MODEL_SOURCES.md section 1).
REAL_COMPRESS_ROPE = RopeConfig(theta=160000.0, original_seq_len=65536, factor=16.0, beta_fast=32.0, beta_slow=1.0)
REAL_VOCAB_SIZE = 129280


def _cycle(base: list[int], n: int) -> list[int]:
    """The first n entries of `base` repeated cyclically (a layer-count override keeps the preset's mix)."""
    return [base[i % len(base)] for i in range(n)]


def _layers(n_layers: int | None, default: int, limit: int | None = None) -> int:
    n = default if n_layers is None else n_layers
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"number of layers must be a positive integer, got {n_layers!r}")
    if limit is not None and n > limit:
        raise ConfigError(f"this preset has at most {limit} layers (the real model's depth), got {n}")
    return n


def tiny(n_layers: int | None = None) -> ModelConfig:
    """5 layers: window-only (hash), CSA (hash), HCA, CSA, window-only; MTP layer with CSA.

    The compressed-layer RoPE is YaRN with original_seq_len 256 and factor 16 (4096 = 16 * 256, as 1M = 16 * 64K in
    the release): with rope_head_dim 16 the correction range is pairs [0, 3], so pairs 1..7 are measurably
    interpolated already on a few-hundred-token prompt.
    """
    base = [0, 4, 128, 4, 0]
    n = _layers(n_layers, len(base))
    return ModelConfig(
        vocab_size=TOKENIZER_VOCAB_SIZE, dim=128, n_layers=n, n_heads=4, n_routed_experts=8, n_activated_experts=2,
        moe_inter_dim=64, q_lora_rank=64, head_dim=64, rope_head_dim=16, o_groups=2, o_lora_rank=32,
        window_size=64, compress_ratios=tuple(_cycle(base, n) + [4]), index_n_heads=4, index_head_dim=32,
        index_topk=16, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, n_shared_experts=1,
        score_func="sqrtsoftplus", route_scale=1.5, swiglu_limit=10.0, norm_eps=1e-6, rope_theta=10000.0,
        compress_rope=RopeConfig(theta=160000.0, original_seq_len=256, factor=16.0, beta_fast=32.0, beta_slow=1.0),
        n_hash_layers=min(2, n), n_mtp_layers=1, max_position_embeddings=4096,
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
    )


def small(n_layers: int | None = None) -> ModelConfig:
    """7 layers [0, 4, 128, 4, 128, 4, 0] (first two hash-routed) + MTP with CSA; real per-head dims.

    YaRN: original_seq_len 4096, factor 16 (max 65536); with rope_head_dim 64 pairs >= 8 are interpolated.
    """
    base = [0, 4, 128, 4, 128, 4, 0]
    n = _layers(n_layers, len(base))
    return ModelConfig(
        vocab_size=TOKENIZER_VOCAB_SIZE, dim=1024, n_layers=n, n_heads=16, n_routed_experts=32,
        n_activated_experts=6, moe_inter_dim=512, q_lora_rank=512, head_dim=512, rope_head_dim=64, o_groups=4,
        o_lora_rank=256, window_size=128, compress_ratios=tuple(_cycle(base, n) + [4]), index_n_heads=16,
        index_head_dim=128, index_topk=64, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, n_shared_experts=1,
        score_func="sqrtsoftplus", route_scale=1.5, swiglu_limit=10.0, norm_eps=1e-6, rope_theta=10000.0,
        compress_rope=RopeConfig(theta=160000.0, original_seq_len=4096, factor=16.0, beta_fast=32.0, beta_slow=1.0),
        n_hash_layers=min(2, n), n_mtp_layers=1, max_position_embeddings=65536,
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
    )


# What V4-Flash and V4-Pro share (docs/MODEL_SOURCES.md); head_dim etc. stay explicit in each preset.
_REAL_V4_COMMON = dict(
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, n_shared_experts=1, score_func="sqrtsoftplus", swiglu_limit=10.0,
    norm_eps=1e-6, rope_theta=10000.0, compress_rope=REAL_COMPRESS_ROPE, n_mtp_layers=1,
    max_position_embeddings=1048576, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
)


def flash_layers(n_layers: int | None = None) -> ModelConfig:
    """DeepSeek-V4-Flash dims; the first n layers of its ratio pattern [0, 0, 4, 128, 4, ...] + MTP (ratio 0)."""
    n = _layers(n_layers, 2, limit=43)
    ratios = [0 if i < 2 else (4 if i % 2 == 0 else 128) for i in range(n)] + [0]
    return ModelConfig(
        vocab_size=REAL_VOCAB_SIZE, dim=4096, n_layers=n, n_heads=64, n_routed_experts=256, n_activated_experts=6,
        moe_inter_dim=2048, q_lora_rank=1024, head_dim=512, rope_head_dim=64, o_groups=8, o_lora_rank=1024,
        window_size=128, compress_ratios=tuple(ratios), index_n_heads=64, index_head_dim=128, index_topk=512,
        route_scale=1.5, n_hash_layers=min(3, n), **_REAL_V4_COMMON,
    )


def pro_layers(n_layers: int | None = None) -> ModelConfig:
    """DeepSeek-V4-Pro dims; the first n layers of its ratio pattern [128, 128, 4, 128, 4, ...] + MTP (ratio 0)."""
    n = _layers(n_layers, 2, limit=61)
    ratios = [128 if i < 2 else (4 if i % 2 == 0 else 128) for i in range(n)] + [0]
    return ModelConfig(
        vocab_size=REAL_VOCAB_SIZE, dim=7168, n_layers=n, n_heads=128, n_routed_experts=384, n_activated_experts=6,
        moe_inter_dim=3072, q_lora_rank=1536, head_dim=512, rope_head_dim=64, o_groups=16, o_lora_rank=1024,
        window_size=128, compress_ratios=tuple(ratios), index_n_heads=64, index_head_dim=128, index_topk=1024,
        route_scale=2.5, n_hash_layers=min(3, n), **_REAL_V4_COMMON,
    )


PRESETS: dict[str, Callable[[int | None], ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "flash-layers": flash_layers,
    "pro-layers": pro_layers,
}


def preset(name: str, n_layers: int | None = None) -> ModelConfig:
    try:
        make = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return make(n_layers)


__all__ = ["PRESETS", "preset", "TOKENIZER_VOCAB_SIZE", "BOS_TOKEN_ID", "EOS_TOKEN_ID", "REAL_VOCAB_SIZE"]
