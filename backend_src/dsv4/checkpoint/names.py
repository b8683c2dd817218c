"""Every tensor a DeepSeek-V4 checkpoint holds, by its name in DeepSeek's own release.

The model's parameter names are the official checkpoint names (`layers.3.attn.wq_a.weight`, ...). NVIDIA's NVFP4
re-quantisation keeps those names and only changes the routed experts' companions (`weight_scale`,
`weight_scale_2`, `input_scale` instead of `scale`). Hugging Face-transformers style names are mapped by
`canonical_name`. Sources: docs/MODEL_SOURCES.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from dsv4.config import ModelConfig

# How a tensor is stored, decided by its role (see `storage_for`):
#   linear  - dense projection: FP8 e4m3 + 128x128 block scales in the official release
#   expert  - routed-expert projection: MXFP4 (official) or NVFP4 (NVIDIA)
#   bf16    - kept in BF16: norms, embedding, LM head, router, compressor and indexer-weight projections
#   fp32    - FP32 vectors and small matrices: mHC, sinks, position biases, router bias
#   table   - integer table (hash routing)
Role = Literal["linear", "expert", "bf16", "fp32", "table"]


@dataclass(frozen=True)
class TensorSpec:
    """One logical tensor. For `linear`/`expert` roles `name` is the module (`...wq_a`) and the checkpoint holds
    `name.weight` plus format-specific scale tensors; for other roles `name` is the full tensor name."""

    name: str
    shape: tuple[int, ...]
    role: Role
    init: str = "normal"       # how the generator fills it: normal | ones | zeros | hc_base | tid2eid | sink
    std: float = 0.0

    @property
    def param_name(self) -> str:
        """Name of the (dequantised) parameter the model uses."""
        return f"{self.name}.weight" if self.role in ("linear", "expert") else self.name


def _linear(name: str, out_f: int, in_f: int, role: Role = "linear", gain: float = 1.0) -> TensorSpec:
    return TensorSpec(name, (out_f, in_f), role, "normal", gain / math.sqrt(in_f))


def block_specs(cfg: ModelConfig, layer: int, p: str) -> list[TensorSpec]:
    D, H, hd = cfg.dim, cfg.n_heads, cfg.head_dim
    n = cfg.hc_mult
    mix = (2 + n) * n
    depth_gain = 1.0 / math.sqrt(2 * (cfg.n_layers + cfg.n_mtp_layers))  # keep the residual growth moderate
    s: list[TensorSpec] = []
    for sub in ("attn", "ffn"):
        s += [TensorSpec(f"{p}.hc_{sub}_fn", (mix, n * D), "fp32", "normal", 0.1 / math.sqrt(n * D)),
              TensorSpec(f"{p}.hc_{sub}_base", (mix,), "fp32", "hc_base"),
              TensorSpec(f"{p}.hc_{sub}_scale", (3,), "fp32", "normal", 0.1),
              TensorSpec(f"{p}.{sub}_norm.weight", (D,), "bf16", "ones")]
    a = f"{p}.attn"
    s += [TensorSpec(f"{a}.attn_sink", (H,), "fp32", "sink"),
          _linear(f"{a}.wq_a", cfg.q_lora_rank, D),
          TensorSpec(f"{a}.q_norm.weight", (cfg.q_lora_rank,), "bf16", "ones"),
          _linear(f"{a}.wq_b", H * hd, cfg.q_lora_rank),
          _linear(f"{a}.wkv", hd, D),
          TensorSpec(f"{a}.kv_norm.weight", (hd,), "bf16", "ones"),
          _linear(f"{a}.wo_a", cfg.o_groups * cfg.o_lora_rank, H * hd // cfg.o_groups),
          _linear(f"{a}.wo_b", D, cfg.o_groups * cfg.o_lora_rank, gain=2.0)]  # attention output ~ residual scale, so tests see it
    ratio = cfg.compress_ratio(layer)
    if ratio:
        s += compressor_specs(cfg, f"{a}.compressor", ratio, hd)
    if ratio == 4:
        ih = cfg.index_n_heads * cfg.index_head_dim
        s += [_linear(f"{a}.indexer.wq_b", ih, cfg.q_lora_rank),
              TensorSpec(f"{a}.indexer.weights_proj.weight", (cfg.index_n_heads, D), "bf16", "normal", 1 / math.sqrt(D))]
        s += compressor_specs(cfg, f"{a}.indexer.compressor", 4, cfg.index_head_dim)
    f = f"{p}.ffn"
    E, I = cfg.n_routed_experts, cfg.moe_inter_dim
    s.append(TensorSpec(f"{f}.gate.weight", (E, D), "bf16", "normal", 1 / math.sqrt(D)))
    if cfg.is_hash_layer(layer):
        s.append(TensorSpec(f"{f}.gate.tid2eid", (cfg.vocab_size, cfg.n_activated_experts), "table", "tid2eid"))
    else:
        s.append(TensorSpec(f"{f}.gate.bias", (E,), "fp32", "normal", 0.01))
    for e in range(E):
        s += _expert(f"{f}.experts.{e}", D, I, "expert", depth_gain)
    s += _expert(f"{f}.shared_experts", D, I, "linear", depth_gain)
    return s


def _expert(p: str, D: int, I: int, role: Role, down_gain: float) -> list[TensorSpec]:
    return [_linear(f"{p}.w1", I, D, role), _linear(f"{p}.w2", D, I, role, gain=down_gain), _linear(f"{p}.w3", I, D, role)]


def compressor_specs(cfg: ModelConfig, p: str, ratio: int, d: int) -> list[TensorSpec]:
    width = (2 if ratio == 4 else 1) * d
    return [TensorSpec(f"{p}.ape", (ratio, width), "fp32", "normal", 0.5),
            TensorSpec(f"{p}.wkv.weight", (width, cfg.dim), "bf16", "normal", 1 / math.sqrt(cfg.dim)),
            TensorSpec(f"{p}.wgate.weight", (width, cfg.dim), "bf16", "normal", 1 / math.sqrt(cfg.dim)),
            TensorSpec(f"{p}.norm.weight", (d,), "bf16", "ones")]


def model_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in a stable order (the writer's shard order)."""
    D, n = cfg.dim, cfg.hc_mult
    s = [TensorSpec("embed.weight", (cfg.vocab_size, D), "bf16", "normal", 1.0)]
    for i in range(cfg.n_layers):
        s += block_specs(cfg, i, f"layers.{i}")
    s += [TensorSpec("norm.weight", (D,), "bf16", "ones"),
          # logits std ~4 like a trained LM: flat random logits would make greedy argmax a coin toss under BF16 noise
          TensorSpec("head.weight", (cfg.vocab_size, D), "bf16", "normal", 4 / math.sqrt(D)),
          TensorSpec("hc_head_fn", (n, n * D), "fp32", "normal", 0.1 / math.sqrt(n * D)),
          TensorSpec("hc_head_base", (n,), "fp32", "zeros"),
          TensorSpec("hc_head_scale", (1,), "fp32", "normal", 0.1)]
    for j in range(cfg.n_mtp_layers):
        p = f"mtp.{j}"
        s += block_specs(cfg, cfg.n_layers + j, p)
        s += [_linear(f"{p}.e_proj", D, D), _linear(f"{p}.h_proj", D, D),
              TensorSpec(f"{p}.enorm.weight", (D,), "bf16", "ones"),
              TensorSpec(f"{p}.hnorm.weight", (D,), "bf16", "ones"),
              TensorSpec(f"{p}.norm.weight", (D,), "bf16", "ones"),
              TensorSpec(f"{p}.hc_head_fn", (n, n * D), "fp32", "normal", 0.1 / math.sqrt(n * D)),
              TensorSpec(f"{p}.hc_head_base", (n,), "fp32", "zeros"),
              TensorSpec(f"{p}.hc_head_scale", (1,), "fp32", "normal", 0.1)]
    return s


# --- name mapping ------------------------------------------------------------------------------------------------
# Hugging Face transformers-style names (as TensorRT-LLM and HF conversions write them) -> official names.
_HF_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(a), b) for a, b in [
    # compressor projections first: their HF names reuse gate_proj / kv_proj
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.compressor\.position_bias$", ".compressor.ape"),
    (r"\.sinks$", ".attn_sink"),
    (r"^model\.embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^model\.norm\.", "norm."),
    (r"^model\.layers\.(\d+)\.", r"layers.\1."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_a_layernorm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.kv_a_proj_with_mqa\.", ".wkv."),
    (r"\.kv_a_layernorm\.", ".kv_norm."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate_proj\.", ".w1."),
    (r"\.down_proj\.", ".w2."),
    (r"\.up_proj\.", ".w3."),
    (r"\.e_score_correction_bias$", ".bias"),
    (r"^model\.", ""),
]]


def canonical_name(name: str) -> str:
    """Map a checkpoint tensor name from any of the known conventions to the official one."""
    if name.startswith(("layers.", "mtp.", "embed.", "head.", "norm.", "hc_head_")):
        return name
    for pat, rep in _HF_RULES:
        name = pat.sub(rep, name)
    return name
