"""Write a checkpoint directory with exactly the layout of DeepSeek-V4's releases (docs/MODEL_SOURCES.md).

Formats (`fmt`):
    fp8-mxfp4  DeepSeek's official release: `linear` -> FP8 e4m3 `.weight` + `.scale` E8M0 per 128x128 block;
               `expert` -> `.weight` I8 (packed e2m1, low nibble = even element) + `.scale` E8M0 [out, in/32].
    nvfp4      NVIDIA's `-NVFP4` re-quantisation: as fp8-mxfp4, but routed experts of the main layers are
               `.weight` U8 + `.weight_scale` F8_E4M3 [out, in/16] + `.weight_scale_2` F32 [] + `.input_scale` F32 [];
               w1 and w3 of one expert share weight_scale_2 and input_scale (fused gate/up GEMM). MTP experts stay
               MXFP4, as in NVIDIA's published "mtp-fallback" checkpoint. Adds `hf_quant_config.json`.
    bf16       nothing quantised: every `linear`/`expert` `.weight` is BF16; no `quantization_config`.
Other roles in every format: `bf16` -> BF16, `fp32` -> F32, `table` -> I64.

Files: config.json, generation_config.json, [hf_quant_config.json], model-0000i-of-0000N.safetensors,
model.safetensors.index.json, tokenizer.json, tokenizer_config.json.

Streaming: tensors are consumed one at a time, quantised, appended to the current shard and the shard is flushed
to disk when the next tensor would overflow `max_shard_bytes` (a tensor larger than that gets a shard of its own).
At most one shard of stored tensors (plus one expert's w1 awaiting its w3) is held in memory; shards are serialised
tensor by tensor (`save_shard`), so peak memory is about max_shard_bytes + one dense float32 tensor. Output bytes are a
function of (cfg, tensors, fmt, max_shard_bytes) only: fixed tensor order, sorted JSON, no timestamps.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from dsv4.checkpoint.formats import (
    E2M1_MAX,
    FP8_E4M3_MAX,
    NVFP4_BLOCK,
    NVFP4Tensor,
    e2m1_encode,
    float_to_ue8m0,
    pack_e2m1,
    quantize_fp8_block,
    quantize_mxfp4,
)
from dsv4.checkpoint.names import TensorSpec, model_specs
from dsv4.checkpoint.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    special_token_ids,
    tokenizer_config,
    train_tokenizer,
)
from dsv4.config import ModelConfig
from dsv4.errors import CheckpointFormatError, ConfigError

FORMATS = ("nvfp4", "fp8-mxfp4", "bf16")
DEFAULT_MAX_SHARD_BYTES = 4 * 1024 ** 3   # the release's shards are ~3.5 GB
E8M0 = torch.float8_e8m0fnu

# Plausible ModelOpt activation calibration (amax / (6 * 448)) for the NVFP4 `input_scale`. Never used for
# compute on Hopper (W4A16 there), only written so the files look like NVIDIA's.
NVFP4_INPUT_AMAX = {"w1": 8.0, "w3": 8.0, "w2": 16.0}
NVFP4_PRODUCER_VERSION = "dsv4-nvfp4-experts-mtp-fallback"

FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}
NVFP4_EXTRA_QUANTIZATION_CONFIG: dict[str, Any] = {
    "group_size": 16,
    "ignore": ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"],
    "moe_quant_algo": "NVFP4",
    "producer": {"name": "modelopt", "version": NVFP4_PRODUCER_VERSION},
    "quant_algo": "MIXED_PRECISION",
}
NVFP4_EXCLUDE_MODULES = [
    "*.attn.*", "*.attn_norm.*", "*.ffn.shared_experts.*", "*.ffn.gate.*", "*.ffn_norm.*", "embed.weight",
    "head.weight", "*.hc_*", "*.h_proj.*", "*.e_proj.*", "*.enorm.*", "*.hnorm.*", "mtp.*.norm.*", "norm.weight",
    "mtp.*",   # our MTP experts stay MXFP4 (NVIDIA's mtp-fallback)
]
# Informational keys the real config.json carries (ModelConfig ignores them on read).
_RELEASE_CONFIG_EXTRAS: dict[str, Any] = {
    "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
    "norm_topk_prob": True, "num_key_value_heads": 1, "topk_method": "noaux_tc", "transformers_version": "4.57.1",
    "use_cache": True,
}

_EXPERT_RE = re.compile(r"^(?P<owner>.+\.experts\.\d+)\.(?P<proj>w[123])$")


def dumps_json(obj: Any) -> str:
    """Deterministic JSON text (sorted keys, fixed indent, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expert_format(module: str, fmt: str) -> str:
    """Storage of a routed expert projection: 'nvfp4' | 'mxfp4' | 'bf16'. MTP experts are never NVFP4."""
    if fmt == "bf16":
        return "bf16"
    if fmt == "nvfp4" and not module.startswith("mtp."):
        return "nvfp4"
    return "mxfp4"


# ----------------------------------------------------------------------------------------------------------------
# Encoding one tensor
# ----------------------------------------------------------------------------------------------------------------
def quantize_nvfp4_with_scale_2(w: torch.Tensor, scale_2: torch.Tensor) -> NVFP4Tensor:
    """NVFP4 with a given per-tensor `scale_2` (ModelOpt shares it between w1 and w3 of an expert).

    Same recipe as `formats.quantize_nvfp4` (which derives scale_2 from this tensor's own amax): block scale =
    e4m3(block_amax / 6 / scale_2) clamped to 448, codes = RNE(w / (block_scale * scale_2)).
    """
    w32 = w.to(torch.float32)
    k = w32.shape[-1]
    if k % NVFP4_BLOCK:
        raise CheckpointFormatError(f"NVFP4: K={k} is not a multiple of {NVFP4_BLOCK}")
    s2 = scale_2.to(torch.float32).reshape(())
    blocks = w32.view(*w32.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    bscale = blocks.abs().amax(dim=-1) / E2M1_MAX
    bscale = (bscale / s2 if float(s2) > 0 else torch.zeros_like(bscale)).clamp(max=FP8_E4M3_MAX)
    scale = bscale.to(torch.float8_e4m3fn)
    eff = (scale.to(torch.float32) * s2).unsqueeze(-1)
    safe = torch.where(eff > 0, eff, torch.ones_like(eff))
    codes = e2m1_encode(torch.where(eff > 0, blocks / safe, torch.zeros_like(blocks))).view(w32.shape)
    return NVFP4Tensor(packed=pack_e2m1(codes), scale=scale, scale_2=s2)


def nvfp4_global_scale(amax: float) -> torch.Tensor:
    """ModelOpt's per-tensor scale: amax / (6 * 448), float32 scalar."""
    return torch.tensor(amax / (E2M1_MAX * FP8_E4M3_MAX), dtype=torch.float32)


def encode_fp8_block(dense: torch.Tensor) -> dict[str, torch.Tensor]:
    q = quantize_fp8_block(dense, ue8m0_scale=True)
    return {"weight": q.weight, "scale": float_to_ue8m0(q.scale, as_e8m0=True)}


def encode_mxfp4(dense: torch.Tensor) -> dict[str, torch.Tensor]:
    q = quantize_mxfp4(dense, scale_dtype=E8M0)
    return {"weight": q.packed.view(torch.int8), "scale": q.scale}


def encode_nvfp4(dense: torch.Tensor, scale_2: torch.Tensor, input_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    q = quantize_nvfp4_with_scale_2(dense, scale_2)
    return {"weight": q.packed, "weight_scale": q.scale, "weight_scale_2": q.scale_2.reshape(()).clone(),
            "input_scale": input_scale.reshape(()).clone()}


def encode_tensor(spec: TensorSpec, dense: torch.Tensor, fmt: str,
                  nvfp4_scale_2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Stored tensors (full checkpoint name -> tensor) of one spec in format `fmt`.

    For NVFP4 experts `nvfp4_scale_2` is the per-tensor scale shared by w1/w3 (default: this tensor's own).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
    if tuple(dense.shape) != spec.shape:
        raise CheckpointFormatError(f"{spec.param_name}: got shape {list(dense.shape)}, expected {list(spec.shape)}")
    if spec.role == "bf16":
        return {spec.name: dense.to(torch.bfloat16).contiguous()}
    if spec.role == "fp32":
        return {spec.name: dense.to(torch.float32).contiguous()}
    if spec.role == "table":
        return {spec.name: dense.to(torch.int64).contiguous()}
    if fmt == "bf16":
        parts = {"weight": dense.to(torch.bfloat16).contiguous()}
    elif spec.role == "linear":
        parts = encode_fp8_block(dense)
    else:
        kind = expert_format(spec.name, fmt)
        if kind == "mxfp4":
            parts = encode_mxfp4(dense)
        else:
            proj = spec.name.rsplit(".", 1)[-1]
            if nvfp4_scale_2 is None:
                nvfp4_scale_2 = nvfp4_global_scale(float(dense.abs().max()))
            parts = encode_nvfp4(dense, nvfp4_scale_2, nvfp4_global_scale(NVFP4_INPUT_AMAX.get(proj, 8.0)))
    return {f"{spec.name}.{k}": v for k, v in parts.items()}


def _encode_stream(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], fmt: str,
                   specs: list[TensorSpec]) -> Iterator[tuple[TensorSpec, dict[str, torch.Tensor]]]:
    """Encode tensors in arrival order; NVFP4 w1 waits for its w3 so the pair shares weight_scale_2."""
    by_param = {s.param_name: s for s in specs}
    seen: set[str] = set()
    pending: dict[str, tuple[TensorSpec, torch.Tensor]] = {}  # expert owner -> (w1 or w3 spec, dense)
    for name, dense in tensors:
        spec = by_param.get(name)
        if spec is None:
            raise CheckpointFormatError(f"write_checkpoint: tensor {name!r} is not part of this model's config")
        if name in seen:
            raise CheckpointFormatError(f"write_checkpoint: tensor {name!r} was given twice")
        seen.add(name)
        m = _EXPERT_RE.match(spec.name)
        if spec.role == "expert" and m and m["proj"] in ("w1", "w3") and expert_format(spec.name, fmt) == "nvfp4":
            partner = pending.pop(m["owner"], None)
            if partner is None:
                pending[m["owner"]] = (spec, dense)
                continue
            pair = sorted([partner, (spec, dense)], key=lambda sd: sd[0].name)   # w1 before w3
            amax = max(float(d.abs().max()) for _, d in pair)
            s2 = nvfp4_global_scale(amax)
            for s, d in pair:
                yield s, encode_tensor(s, d, fmt, nvfp4_scale_2=s2)
            continue
        yield spec, encode_tensor(spec, dense, fmt)
    for spec, dense in pending.values():   # an unpaired w1/w3 (partial input): its own scale
        yield spec, encode_tensor(spec, dense, fmt)
    missing = [s.param_name for s in specs if s.param_name not in seen]
    if missing:
        raise CheckpointFormatError(f"write_checkpoint: {len(missing)} tensor(s) of the model were not given, "
                                    f"e.g. {missing[:5]}")


# ----------------------------------------------------------------------------------------------------------------
# Metadata files
# ----------------------------------------------------------------------------------------------------------------
def config_json(cfg: ModelConfig, fmt: str) -> dict[str, Any]:
    out = dict(cfg.to_dict())
    for k, v in _RELEASE_CONFIG_EXTRAS.items():
        out.setdefault(k, v)
    out.setdefault("num_hash_layers", cfg.n_hash_layers)   # the release's key (to_dict writes mlp_layer_types)
    if fmt == "fp8-mxfp4":
        out["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    elif fmt == "nvfp4":
        out["quantization_config"] = {**FP8_QUANTIZATION_CONFIG, **NVFP4_EXTRA_QUANTIZATION_CONFIG}
    return out


def hf_quant_config_json(specs: list[TensorSpec]) -> dict[str, Any]:
    layers = {s.name: {"group_size": 16, "quant_algo": "NVFP4"}
              for s in specs if s.role == "expert" and expert_format(s.name, "nvfp4") == "nvfp4"}
    return {
        "producer": {"name": "modelopt", "version": NVFP4_PRODUCER_VERSION},
        "quantization": {"exclude_modules": list(NVFP4_EXCLUDE_MODULES), "group_size": 16,
                         "kv_cache_quant_algo": None, "quant_algo": "MIXED_PRECISION",
                         "quantized_layers": layers},
    }


def generation_config_json(cfg: ModelConfig) -> dict[str, Any]:
    return {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "do_sample": True,
            "eos_token_id": cfg.eos_token_id, "temperature": 1.0, "top_p": 1.0, "transformers_version": "4.57.1"}


# ----------------------------------------------------------------------------------------------------------------
# The writer
# ----------------------------------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# safetensors dtype names, in the order safetensors' own serializer lays tensors out (dtype rank descending, then
# name), so that `save_shard` writes the same bytes as `safetensors.torch.save_file` (a test checks it).
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.int16: "I16", E8M0: "F8_E8M0", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_ST_RANK = {dt: i for i, dt in enumerate(_ST_DTYPES)}


def save_shard(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a safetensors file streaming one tensor at a time (`save_file` first copies every tensor into a bytes
    object, doubling peak memory on multi-GB shards). Output is byte-identical to
    `save_file(tensors, path, metadata={"format": "pt"})`, which is used for dtypes outside `_ST_DTYPES`."""
    if any(t.dtype not in _ST_DTYPES for t in tensors.values()):
        save_file(tensors, str(path), metadata={"format": "pt"})
        return
    items = sorted(tensors.items(), key=lambda kv: (_ST_RANK[kv[1].dtype], kv[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, t in items:
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _clean(out: Path) -> None:
    """Remove files of an earlier checkpoint in `out` that a new one could be confused with."""
    for p in sorted(out.iterdir()):
        if p.is_file() and (re.fullmatch(r"model(-\d{5}(-of-\d{5})?)?\.safetensors(\.partial)?", p.name)
                            or p.name in ("model.safetensors.index.json", "hf_quant_config.json")):
            p.unlink()


def write_checkpoint(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     out_dir: str | Path, fmt: str = "nvfp4", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *,
                     tokenizer: Tokenizer | None = None, progress: bool = False) -> Path:
    """Write a checkpoint of `cfg` from dense tensors keyed by param name (`layers.0.attn.wq_a.weight`, ...).

    `tensors` is a mapping (written in `model_specs` order) or an iterable of (name, tensor) pairs (written in
    arrival order; use `generate_tensors` to stream). Every tensor of `model_specs(cfg)` must be given exactly once.
    `tokenizer` defaults to our corpus tokenizer of `TOKENIZER_VOCAB_SIZE` ids; its size must not exceed
    cfg.vocab_size and its BOS/EOS ids must match the config's. Returns the output directory.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    specs = model_specs(cfg)
    if tokenizer is None:
        from dsv4.checkpoint.presets import TOKENIZER_VOCAB_SIZE
        tokenizer = train_tokenizer(min(TOKENIZER_VOCAB_SIZE, cfg.vocab_size))
    n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tok > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {n_tok} ids but the model's vocab_size is {cfg.vocab_size}")
    bos, eos = special_token_ids(tokenizer)
    if (cfg.bos_token_id, cfg.eos_token_id) != (bos, eos):
        raise ConfigError(f"config bos/eos ids ({cfg.bos_token_id}, {cfg.eos_token_id}) differ from the tokenizer's "
                          f"{BOS_TOKEN!r}={bos} / {EOS_TOKEN!r}={eos}")
    if isinstance(tensors, Mapping):
        src = tensors
        items: Iterable[tuple[str, torch.Tensor]] = ((s.param_name, src[s.param_name]) for s in specs
                                                     if s.param_name in src)
        unknown = sorted(set(src) - {s.param_name for s in specs})
        if unknown:
            raise CheckpointFormatError(f"write_checkpoint: tensor(s) {unknown[:5]} are not part of this model's config")
    else:
        items = tensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(specs), desc=f"writing {fmt}", unit="tensor")

    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    shard_members: list[list[str]] = []
    total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        i = len(shard_members) + 1
        save_shard(shard, out / f"model-{i:05d}.safetensors.partial")
        shard_members.append(list(shard))
        shard, shard_bytes = {}, 0

    for _spec, stored in _encode_stream(cfg, items, fmt, specs):
        size = sum(_nbytes(t) for t in stored.values())
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard.update(stored)
        shard_bytes += size
        total += size
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()

    n = len(shard_members)
    weight_map: dict[str, str] = {}
    for i, members in enumerate(shard_members, start=1):
        name = _shard_name(i, n)
        os.replace(out / f"model-{i:05d}.safetensors.partial", out / name)
        os.chmod(out / name, 0o644)
        weight_map.update({k: name for k in members})

    (out / "model.safetensors.index.json").write_text(
        dumps_json({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(dumps_json(config_json(cfg, fmt)))
    (out / "generation_config.json").write_text(dumps_json(generation_config_json(cfg)))
    if fmt == "nvfp4":
        (out / "hf_quant_config.json").write_text(dumps_json(hf_quant_config_json(specs)))
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))
    (out / "tokenizer_config.json").write_text(dumps_json(tokenizer_config(tokenizer, cfg.max_position_embeddings)))
    return out


def make_checkpoint(cfg: ModelConfig, out_dir: str | Path, fmt: str = "nvfp4", seed: int = 0,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, progress: bool = False) -> Path:
    """Random weights (`generator.generate_tensors`) streamed into `write_checkpoint`."""
    from dsv4.checkpoint.generator import generate_tensors
    return write_checkpoint(cfg, generate_tensors(cfg, seed), out_dir, fmt, max_shard_bytes, progress=progress)


def checkpoint_bytes(path: str | Path) -> int:
    """Total size on disk of the files in a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


__all__ = ["FORMATS", "DEFAULT_MAX_SHARD_BYTES", "write_checkpoint", "make_checkpoint", "encode_tensor",
           "expert_format", "quantize_nvfp4_with_scale_2", "nvfp4_global_scale", "checkpoint_bytes", "config_json"]
