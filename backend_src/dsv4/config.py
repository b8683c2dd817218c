"""Model and engine configuration.

`ModelConfig` is parsed from a DeepSeek-V4 `config.json`. Two key sets exist in the wild: the Hugging Face one
(`hidden_size`, `num_hidden_layers`, ...) and the one of DeepSeek's own inference code (`dim`, `n_layers`, ...).
Both are accepted; each field lists its aliases, and two aliases with different values are an error.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dsv4.errors import ConfigError

# Keys we read, with every alias seen in released configs. The first alias is the HF name (what we write).
_ALIASES: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "dim": ("hidden_size", "dim"),
    "n_layers": ("num_hidden_layers", "n_layers"),
    "n_heads": ("num_attention_heads", "n_heads"),
    "n_routed_experts": ("n_routed_experts", "num_experts"),
    "n_shared_experts": ("n_shared_experts", "num_shared_experts"),
    "n_activated_experts": ("num_experts_per_tok", "n_activated_experts"),
    "moe_inter_dim": ("moe_intermediate_size", "moe_inter_dim"),
    "score_func": ("scoring_func", "score_func"),
    "route_scale": ("routed_scaling_factor", "route_scale"),
    "swiglu_limit": ("swiglu_limit",),
    "q_lora_rank": ("q_lora_rank",),
    "head_dim": ("head_dim",),
    "rope_head_dim": ("qk_rope_head_dim", "rope_head_dim"),
    "norm_eps": ("rms_norm_eps", "norm_eps"),
    "o_groups": ("o_groups",),
    "o_lora_rank": ("o_lora_rank",),
    "window_size": ("sliding_window", "window_size"),
    "compress_ratios": ("compress_ratios",),
    "rope_theta": ("rope_theta",),
    "compress_rope_theta": ("compress_rope_theta",),
    "index_n_heads": ("index_n_heads",),
    "index_head_dim": ("index_head_dim",),
    "index_topk": ("index_topk",),
    "hc_mult": ("hc_mult",),
    "hc_sinkhorn_iters": ("hc_sinkhorn_iters",),
    "hc_eps": ("hc_eps",),
    "n_hash_layers": ("num_hash_layers", "n_hash_layers"),
    "n_mtp_layers": ("num_nextn_predict_layers", "n_mtp_layers"),
    "max_position_embeddings": ("max_position_embeddings", "max_seq_len"),
    "bos_token_id": ("bos_token_id",),
    "eos_token_id": ("eos_token_id",),
    "tie_word_embeddings": ("tie_word_embeddings",),
}

# Keys that are known and deliberately not needed by this implementation (informational, or training-only).
_IGNORED = {
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_bias", "attention_dropout", "hidden_act", "pad_token_id", "topk_method",
    "n_group", "topk_group", "first_k_dense_replace", "moe_layer_freq", "ep_size", "aux_loss_alpha",
    "seq_aux", "num_key_value_heads", "intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
    "max_batch_size", "scale_fmt", "scale_dtype", "expert_dtype", "quantization_config", "rope_scaling",
    "mlp_layer_types", "layer_types", "rope_factor", "original_seq_len", "beta_fast", "beta_slow",
    "index_rope_head_dim", "name_or_path", "_name_or_path", "output_router_logits", "router_aux_loss_coef",
    "num_local_experts", "rope_parameters", "compress_rope_parameters", "norm_topk_prob",
}

SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


@dataclass(frozen=True)
class RopeConfig:
    """One RoPE table: plain (`original_seq_len == 0`) or YaRN-scaled."""

    theta: float
    original_seq_len: int = 0
    factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one DeepSeek-V4 checkpoint (field names follow DeepSeek's inference code)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    q_lora_rank: int
    head_dim: int
    rope_head_dim: int
    o_groups: int
    o_lora_rank: int
    window_size: int
    compress_ratios: tuple[int, ...]          # one per layer, then one per MTP layer
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    n_shared_experts: int = 1
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.0
    swiglu_limit: float = 0.0
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=160000.0))
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_hash_layers: int = 0
    n_mtp_layers: int = 0
    max_position_embeddings: int = 65536
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        self._validate()

    # --- derived facts -----------------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def compress_ratio(self, layer: int) -> int:
        """0 = window only, 4 = CSA (overlapping, with indexer), otherwise HCA."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    @property
    def main_rope(self) -> RopeConfig:
        # Window-only layers use plain RoPE at rope_theta (DeepSeek disables YaRN there).
        return RopeConfig(theta=self.rope_theta)

    def rope_for_layer(self, layer: int) -> RopeConfig:
        return self.compress_rope if self.compress_ratio(layer) else self.main_rope

    # --- validation --------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{name}': {msg}")

        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_routed_experts", "n_activated_experts",
                  "moe_inter_dim", "q_lora_rank", "head_dim", "o_groups", "o_lora_rank", "window_size",
                  "hc_mult", "hc_sinkhorn_iters"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, f"must be a positive integer, got {v!r}")
        need(0 < self.rope_head_dim <= self.head_dim and self.rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even and in (0, head_dim={self.head_dim}], got {self.rope_head_dim}")
        need(self.n_activated_experts <= self.n_routed_experts, "num_experts_per_tok",
             f"{self.n_activated_experts} exceeds n_routed_experts={self.n_routed_experts}")
        need(self.n_heads % self.o_groups == 0, "o_groups",
             f"num_attention_heads={self.n_heads} is not divisible by o_groups={self.o_groups}")
        need(self.score_func in SCORE_FUNCS, "scoring_func", f"must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        need(self.n_shared_experts == 1, "n_shared_experts", f"only 1 is supported, got {self.n_shared_experts}")
        n_total = self.n_layers + self.n_mtp_layers
        need(len(self.compress_ratios) == n_total, "compress_ratios",
             f"has {len(self.compress_ratios)} entries; expected num_hidden_layers + num_nextn_predict_layers "
             f"= {self.n_layers} + {self.n_mtp_layers} = {n_total}")
        for i, r in enumerate(self.compress_ratios):
            need(isinstance(r, int) and r >= 0, "compress_ratios", f"entry {i} must be a non-negative integer, got {r!r}")
            need(r in (0, 4) or r >= 8, "compress_ratios",
                 f"entry {i} is {r}: 4 selects CSA (overlapping), 0 window-only, >= 8 HCA; other values are not defined")
        need(0 <= self.n_hash_layers <= self.n_layers, "num_hash_layers",
             f"must be in [0, num_hidden_layers={self.n_layers}], got {self.n_hash_layers}")
        if any(r == 4 for r in self.compress_ratios):
            for f in ("index_n_heads", "index_head_dim", "index_topk"):
                v = getattr(self, f)
                need(isinstance(v, int) and v > 0, f, f"must be a positive integer when a layer uses CSA, got {v!r}")
            need(self.rope_head_dim <= self.index_head_dim, "index_head_dim",
                 f"{self.index_head_dim} is smaller than qk_rope_head_dim={self.rope_head_dim}")
        need(self.swiglu_limit >= 0, "swiglu_limit", f"must be >= 0, got {self.swiglu_limit}")
        need(self.norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.norm_eps}")

    # --- parsing -----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        known = {a for aliases in _ALIASES.values() for a in aliases} | _IGNORED
        unknown = sorted(k for k in raw if k not in known)
        if unknown:
            raise ConfigError(
                f"config.json has unknown field(s) {unknown}; this build understands DeepSeek-V4 configs only. "
                f"If the checkpoint is a newer revision, these fields need support before it can be served.")
        values: dict[str, Any] = {}
        for name, aliases in _ALIASES.items():
            present = [(a, raw[a]) for a in aliases if a in raw]
            if len({json.dumps(v, sort_keys=True) for _, v in present}) > 1:
                raise ConfigError(f"config fields {[a for a, _ in present]} contradict each other: "
                                  f"{dict(present)}")
            if present:
                values[name] = present[0][1]
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        values["n_hash_layers"] = _hash_layers(raw, values)
        values["compress_rope"] = _compress_rope(raw, values)
        values.pop("compress_rope_theta", None)
        if "compress_ratios" in values:
            values["compress_ratios"] = tuple(values["compress_ratios"])
        values.setdefault("n_mtp_layers", 0)
        if "compress_ratios" in values and len(values["compress_ratios"]) == values.get("n_layers", -1) \
                and values["n_mtp_layers"]:
            # Some configs list ratios for the main layers only; MTP layers then use window attention... unless
            # stated otherwise, which we cannot guess: refuse rather than invent.
            raise ConfigError("config field 'compress_ratios' lists only the main layers but the model has "
                              f"{values['n_mtp_layers']} MTP layer(s); add their ratios")
        missing = [(_ALIASES[f.name][0]) for f in fields(cls)
                   if f.name not in values and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ConfigError(f"config.json lacks required field(s) {missing}")
        for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_routed_experts", "n_activated_experts",
                  "moe_inter_dim", "q_lora_rank", "head_dim", "rope_head_dim", "o_groups", "o_lora_rank",
                  "window_size", "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters"):
            if k in values and not (isinstance(values[k], int) and not isinstance(values[k], bool)):
                raise ConfigError(f"config field '{_ALIASES[k][0]}' must be an integer, got {values[k]!r}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face style config.json our checkpoint writer emits."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        for name, aliases in _ALIASES.items():
            if hasattr(self, name):
                out[aliases[0]] = getattr(self, name)
        out["compress_ratios"] = list(self.compress_ratios)
        out["compress_rope_theta"] = self.compress_rope.theta
        cr = self.compress_rope
        if cr.original_seq_len:
            out["rope_scaling"] = {"type": "yarn", "factor": cr.factor,
                                   "original_max_position_embeddings": cr.original_seq_len,
                                   "beta_fast": cr.beta_fast, "beta_slow": cr.beta_slow}
        out["num_hash_layers"] = self.n_hash_layers
        out["torch_dtype"] = "bfloat16"
        return out

    def replace(self, **kw: Any) -> "ModelConfig":
        return replace(self, **kw)


def _hash_layers(raw: dict[str, Any], values: dict[str, Any]) -> int:
    """Hash-routed layers come either as a count or as `mlp_layer_types` entries equal to "hash_moe"."""
    types = raw.get("mlp_layer_types")
    count = values.get("n_hash_layers")
    if types is None:
        return int(count or 0)
    if not isinstance(types, list) or any(t not in ("hash_moe", "moe") for t in types):
        raise ConfigError(f"config field 'mlp_layer_types' must be a list of 'hash_moe'/'moe', got {types!r}")
    n = 0
    while n < len(types) and types[n] == "hash_moe":
        n += 1
    if "hash_moe" in types[n:]:
        raise ConfigError("config field 'mlp_layer_types': hash-routed layers must come first (DeepSeek-V4 routes "
                          f"the first layers by token id), got {types}")
    if count is not None and count != n:
        raise ConfigError(f"config fields 'num_hash_layers'={count} and 'mlp_layer_types' ({n} hash layers) "
                          "contradict each other")
    return n


def _compress_rope(raw: dict[str, Any], values: dict[str, Any]) -> RopeConfig:
    theta = float(values.get("compress_rope_theta", 160000.0))
    rs = raw.get("rope_scaling")
    if rs is None and "original_seq_len" in raw:  # DeepSeek inference key set
        if raw["original_seq_len"] <= 0:
            return RopeConfig(theta=theta)
        return RopeConfig(theta=theta, original_seq_len=int(raw["original_seq_len"]),
                          factor=float(raw.get("rope_factor", 1.0)), beta_fast=float(raw.get("beta_fast", 32)),
                          beta_slow=float(raw.get("beta_slow", 1)))
    if rs is None:
        return RopeConfig(theta=theta)
    if not isinstance(rs, dict):
        raise ConfigError(f"config field 'rope_scaling' must be an object, got {rs!r}")
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"config field 'rope_scaling.type' must be 'yarn' for DeepSeek-V4, got {kind!r}")
    try:
        return RopeConfig(theta=theta, original_seq_len=int(rs["original_max_position_embeddings"]),
                          factor=float(rs["factor"]), beta_fast=float(rs.get("beta_fast", 32)),
                          beta_slow=float(rs.get("beta_slow", 1)))
    except KeyError as e:
        raise ConfigError(f"config field 'rope_scaling' lacks {e.args[0]!r}") from None


@dataclass(frozen=True)
class EngineConfig:
    """How the engine serves a checkpoint."""

    checkpoint: str
    device: str = "auto"                     # auto | cpu | cuda
    ops_backend: str = "auto"                # auto | torch | cute
    dtype: str = "auto"                      # auto: float32 on CPU, bfloat16 on GPU
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    block_size: int = 128
    num_kv_blocks: int | None = None         # if None, derived from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    seed: int = 0
    enforce_eager: bool = False              # True: no CUDA graphs (every step launched op by op)
    cuda_graph_max_batch: int | None = None  # largest decode batch captured; None: max_num_seqs
    cuda_graph_max_tokens: int | None = None  # largest step with prompt tokens captured (piecewise, see
                                             # engine.mixed_graphs); None: min(1024, max_num_batched_tokens); 0: off
    cuda_graph_full_max_tokens: int = 256    # steps with prompt tokens up to this many tokens replay one graph of
                                             # the whole step instead of pieces around eager attention; 0: pieces only
    async_scheduling: bool = True            # decode steps launch before the host reads the previous step's tokens
    async_prefill: bool = True               # ... and so do steps with prompt tokens (admissions, prefill chunks):
                                             # their decode rows take the pending tokens on the device
    max_waiting_steps: int | None = None     # decode steps a new request may wait so that prefills run together;
                                             # None: 8 when decode steps replay CUDA graphs, else 0 (admit at once)
    waiting_served_ratio: float = 0.25       # ... unless this many waiting per running request
    kv_cache_dtype: str = "auto"             # auto: the model dtype | fp8_e4m3 (alias fp8): FP8 rows, see
                                             # dsv4.ops.fp8_rows (read and written by torch ops so far)

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype in ("fp8", "fp8_e4m3")

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"engine setting '{name}': {msg}")

        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             f"must be auto, cpu or cuda[:N], got {self.device!r}")
        need(self.ops_backend in ("auto", "torch", "cute"), "ops_backend",
             f"must be auto, torch or cute, got {self.ops_backend!r}")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype", f"must be auto, float32 or bfloat16, got {self.dtype!r}")
        for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            v = getattr(self, k)
            need(isinstance(v, int) and v > 0, k, f"must be a positive integer, got {v!r}")
        need(self.block_size % 128 == 0, "block_size",
             f"must be a multiple of 128 so that compressed entries of every ratio align to blocks, got {self.block_size}")
        need(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks", "must be positive")
        need(self.cuda_graph_max_batch is None or (isinstance(self.cuda_graph_max_batch, int)
                                                   and self.cuda_graph_max_batch > 0),
             "cuda_graph_max_batch", f"must be a positive integer or None, got {self.cuda_graph_max_batch!r}")
        need(self.cuda_graph_max_tokens is None or (isinstance(self.cuda_graph_max_tokens, int)
                                                    and self.cuda_graph_max_tokens >= 0),
             "cuda_graph_max_tokens", f"must be an integer >= 0 or None, got {self.cuda_graph_max_tokens!r}")
        need(isinstance(self.cuda_graph_full_max_tokens, int) and self.cuda_graph_full_max_tokens >= 0,
             "cuda_graph_full_max_tokens", f"must be an integer >= 0, got {self.cuda_graph_full_max_tokens!r}")
        need(self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes", "must be positive")
        need(self.max_waiting_steps is None or (isinstance(self.max_waiting_steps, int) and self.max_waiting_steps >= 0),
             "max_waiting_steps", f"must be an integer >= 0 or None, got {self.max_waiting_steps!r}")
        need(self.waiting_served_ratio >= 0, "waiting_served_ratio", f"must be >= 0, got {self.waiting_served_ratio!r}")
        need(self.kv_cache_dtype in ("auto", "fp8", "fp8_e4m3"), "kv_cache_dtype",
             f"must be auto, fp8_e4m3 or fp8, got {self.kv_cache_dtype!r}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["ModelConfig", "RopeConfig", "EngineConfig", "ceil_div", "SCORE_FUNCS"]
