"""Specification of random checkpoints: generator (dsv4.checkpoint.generator) + writer (dsv4.checkpoint.writer).

A checkpoint directory has the release layout: config.json (+ quantization_config), [hf_quant_config.json],
model-0000i-of-0000N.safetensors, model.safetensors.index.json, tokenizer.json, tokenizer_config.json. Storage by role
and format is documented in writer.py. Same config + seed + format => byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv4.checkpoint.formats import float_to_ue8m0, quantize_fp8_block, quantize_mxfp4, quantize_nvfp4
from dsv4.checkpoint.generator import generate_tensor, generate_tensors, tensor_seed
from dsv4.checkpoint.loader import load_checkpoint
from dsv4.checkpoint.names import model_specs
from dsv4.checkpoint.presets import PRESETS
from dsv4.checkpoint.writer import (
    checkpoint_bytes,
    encode_tensor,
    make_checkpoint,
    nvfp4_global_scale,
    quantize_nvfp4_with_scale_2,
    save_shard,
    write_checkpoint,
)
from dsv4.errors import CheckpointFormatError, ConfigError

TINY = PRESETS["tiny"](None)
SPECS = {s.name: s for s in model_specs(TINY)}
E8M0 = torch.float8_e8m0fnu


def raw_tensors(path: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """Every stored tensor of a checkpoint directory: name -> (tensor, shard file)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(index.values())):
        with safe_open(str(path / f), framework="pt") as h:
            for k in h.keys():
                out[k] = (h.get_tensor(k), f)
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:
    return Path(tiny_checkpoint)


@pytest.fixture(scope="module")
def raw(tiny) -> dict[str, tuple[torch.Tensor, str]]:
    return raw_tensors(tiny)


# --- generator ------------------------------------------------------------------------------------------------
def test_generator_is_deterministic_per_tensor_and_order_independent():
    stream = dict(generate_tensors(TINY, seed=0))
    spec = SPECS["layers.3.ffn.experts.1.w2"]
    alone = generate_tensor(TINY, spec, seed=0)
    assert torch.equal(stream[spec.param_name], alone)
    assert not torch.equal(generate_tensor(TINY, spec, seed=1), alone)
    assert tensor_seed(0, "a") != tensor_seed(0, "b") and tensor_seed(0, "a") == tensor_seed(0, "a")


def test_generator_initialisations():
    n = TINY.hc_mult
    norm = generate_tensor(TINY, SPECS["layers.0.attn_norm.weight"])
    assert norm.dtype == torch.bfloat16 and abs(float(norm.float().mean()) - 1) < 0.01
    assert 0.01 < float(norm.float().std()) < 0.03
    base = generate_tensor(TINY, SPECS["layers.0.hc_attn_base"])
    comb = base[2 * n:].view(n, n)
    assert (comb.diagonal() > 1.8).all() and (comb - torch.diag(comb.diagonal())).abs().max() < 0.15
    assert base[:2 * n].abs().max() < 0.15                                # pre/post start near sigmoid(0)
    assert torch.equal(generate_tensor(TINY, SPECS["hc_head_base"]), torch.zeros(n))
    sink = generate_tensor(TINY, SPECS["layers.0.attn.attn_sink"])
    assert sink.dtype == torch.float32 and sink.abs().max() < 3
    w = generate_tensor(TINY, SPECS["layers.0.attn.wq_a"])
    assert w.dtype == torch.float32 and float(w.std()) == pytest.approx(SPECS["layers.0.attn.wq_a"].std, rel=0.1)


def test_tid2eid_gives_every_token_k_distinct_experts():
    t = generate_tensor(TINY, SPECS["layers.0.ffn.gate.tid2eid"])
    assert t.dtype == torch.int64 and t.shape == (TINY.vocab_size, TINY.n_activated_experts)
    assert t.min() >= 0 and t.max() < TINY.n_routed_experts
    assert all(len(set(row)) == len(row) for row in t.tolist())
    assert len(set(t[:, 0].tolist())) == TINY.n_routed_experts                    # all experts get used
    assert not torch.equal(t, generate_tensor(TINY, SPECS["layers.1.ffn.gate.tid2eid"]))


# --- layout ---------------------------------------------------------------------------------------------------
def test_directory_has_the_release_layout(tiny, raw):
    files = sorted(p.name for p in tiny.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for f in ("config.json", "hf_quant_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "generation_config.json"):
        assert f in files
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: f for k, (_, f) in raw.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t, _ in raw.values())
    tc = json.loads((tiny / "tokenizer_config.json").read_text())
    assert tc["bos_token"] == "<｜begin▁of▁sentence｜>" and tc["eos_token"] == "<｜end▁of▁sentence｜>"


def test_nvfp4_storage_by_role(tiny, raw):
    def dt(name):
        t, _ = raw[name]
        return str(t.dtype).replace("torch.", ""), tuple(t.shape)

    D, E = TINY.dim, TINY.n_routed_experts
    assert dt("layers.0.attn.wq_a.weight") == ("float8_e4m3fn", (64, 128))          # linear: FP8 + E8M0 128x128
    assert dt("layers.0.attn.wq_a.scale") == ("float8_e8m0fnu", (1, 1))
    assert dt("layers.0.attn.wq_b.scale") == ("float8_e8m0fnu", (2, 1))
    p = "layers.2.ffn.experts.7.w1"                                                # main expert: NVFP4
    assert dt(f"{p}.weight") == ("uint8", (64, D // 2))
    assert dt(f"{p}.weight_scale") == ("float8_e4m3fn", (64, D // 16))
    assert dt(f"{p}.weight_scale_2") == ("float32", ())
    assert dt(f"{p}.input_scale") == ("float32", ())
    assert f"{p}.scale" not in raw
    p = "mtp.0.ffn.experts.7.w2"                                                   # MTP expert: MXFP4
    assert dt(f"{p}.weight") == ("int8", (D, 32))
    assert dt(f"{p}.scale") == ("float8_e8m0fnu", (D, 2))
    assert f"{p}.weight_scale" not in raw
    assert dt("layers.0.ffn.shared_experts.w2.weight")[0] == "float8_e4m3fn"
    assert dt("layers.0.attn_norm.weight") == ("bfloat16", (D,))
    assert dt("layers.0.ffn.gate.weight") == ("bfloat16", (E, D))
    assert dt("layers.2.ffn.gate.bias") == ("float32", (E,))
    assert dt("layers.0.ffn.gate.tid2eid") == ("int64", (512, 2))
    assert "layers.2.ffn.gate.tid2eid" not in raw and "layers.0.ffn.gate.bias" not in raw
    assert dt("layers.1.attn.compressor.ape") == ("float32", (4, 128))
    assert dt("layers.2.attn.compressor.ape") == ("float32", (128, 64))
    assert dt("mtp.0.e_proj.weight")[0] == "float8_e4m3fn"


def test_nvfp4_w1_and_w3_share_their_per_tensor_scales(raw):
    for e in range(TINY.n_routed_experts):
        p = f"layers.1.ffn.experts.{e}"
        assert torch.equal(raw[f"{p}.w1.weight_scale_2"][0], raw[f"{p}.w3.weight_scale_2"][0])
        assert torch.equal(raw[f"{p}.w1.input_scale"][0], raw[f"{p}.w3.input_scale"][0])


def test_nvfp4_metadata_files(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["fmt"], qc["scale_fmt"], qc["weight_block_size"]) == ("fp8", "e4m3", "ue8m0",
                                                                                         [128, 128])
    assert qc["activation_scheme"] == "dynamic"
    assert (qc["quant_algo"], qc["moe_quant_algo"], qc["group_size"]) == ("MIXED_PRECISION", "NVFP4", 16)
    hq = json.loads((tiny / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "modelopt"
    q = hq["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION" and q["group_size"] == 16 and q["kv_cache_quant_algo"] is None
    expected = {f"layers.{i}.ffn.experts.{e}.w{k}" for i in range(TINY.n_layers)
                for e in range(TINY.n_routed_experts) for k in (1, 2, 3)}
    assert set(q["quantized_layers"]) == expected
    assert all(v == {"quant_algo": "NVFP4", "group_size": 16} for v in q["quantized_layers"].values())
    assert "*.attn.*" in q["exclude_modules"] and "embed.weight" in q["exclude_modules"]


@pytest.mark.parametrize("fmt", ["fp8-mxfp4", "bf16"])
def test_other_formats_storage(tmp_path, fmt):
    out = make_checkpoint(PRESETS["tiny"](2), tmp_path, fmt=fmt)
    raw = raw_tensors(out)
    cfg = json.loads((out / "config.json").read_text())
    assert not (out / "hf_quant_config.json").exists()
    if fmt == "bf16":
        assert "quantization_config" not in cfg
        assert raw["layers.0.attn.wq_a.weight"][0].dtype == torch.bfloat16
        assert raw["layers.0.ffn.experts.0.w1.weight"][0].dtype == torch.bfloat16
        assert not any(k.endswith((".scale", ".weight_scale", ".weight_scale_2", ".input_scale")) for k in raw)
    else:
        assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                              "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
        assert raw["layers.0.ffn.experts.0.w1.weight"][0].dtype == torch.int8       # as DeepSeek stores it
        assert raw["layers.0.ffn.experts.0.w1.scale"][0].dtype == E8M0
        assert raw["layers.0.ffn.experts.0.w1.scale"][0].shape == (64, 4)
        assert not any(k.endswith("weight_scale") for k in raw)


# --- bit-exact round trip ---------------------------------------------------------------------------------------
def test_generated_tensors_read_back_bit_identical(tiny, raw):
    ck = load_checkpoint(tiny, progress=False)

    # linear: FP8 e4m3 + UE8M0 block scales, exactly formats.quantize_fp8_block(ue8m0_scale=True)
    s = SPECS["layers.1.attn.wq_b"]
    q = quantize_fp8_block(generate_tensor(TINY, s), ue8m0_scale=True)
    assert same_bytes(raw[f"{s.name}.weight"][0], q.weight)
    assert same_bytes(raw[f"{s.name}.scale"][0], float_to_ue8m0(q.scale, as_e8m0=True))
    assert same_bytes(ck.tensors[s.param_name].weight, q.weight)
    assert same_bytes(ck.tensors[s.param_name].scale, raw[f"{s.name}.scale"][0])

    # MTP expert: MXFP4, exactly formats.quantize_mxfp4, packed bytes stored as int8
    s = SPECS["mtp.0.ffn.experts.3.w1"]
    q = quantize_mxfp4(generate_tensor(TINY, s), scale_dtype=E8M0)
    assert same_bytes(raw[f"{s.name}.weight"][0], q.packed.view(torch.int8))
    assert same_bytes(raw[f"{s.name}.scale"][0], q.scale)
    assert same_bytes(ck.tensors[s.param_name].packed, q.packed)          # loader exposes uint8, same bytes
    assert same_bytes(ck.tensors[s.param_name].scale, q.scale)

    # main expert: NVFP4 with scale_2 = max(amax(w1), amax(w3)) / (6 * 448)
    w1, w3 = SPECS["layers.4.ffn.experts.6.w1"], SPECS["layers.4.ffn.experts.6.w3"]
    d1, d3 = generate_tensor(TINY, w1), generate_tensor(TINY, w3)
    s2 = nvfp4_global_scale(max(float(d1.abs().max()), float(d3.abs().max())))
    for spec, dense in ((w1, d1), (w3, d3)):
        q = quantize_nvfp4_with_scale_2(dense, s2)
        assert same_bytes(raw[f"{spec.name}.weight"][0], q.packed)
        assert same_bytes(raw[f"{spec.name}.weight_scale"][0], q.scale)
        assert same_bytes(raw[f"{spec.name}.weight_scale_2"][0], s2)
        loaded = ck.tensors[spec.param_name]
        assert same_bytes(loaded.packed, q.packed) and same_bytes(loaded.scale, q.scale)
        assert same_bytes(loaded.scale_2, s2)
        if float(dense.abs().max()) == max(float(d1.abs().max()), float(d3.abs().max())):
            own = quantize_nvfp4(dense)           # the pair's larger tensor is exactly ModelOpt's own recipe
            assert same_bytes(own.packed, q.packed) and same_bytes(own.scale, q.scale)

    # unquantised roles are stored as generated
    for name in ("layers.0.attn_norm.weight", "layers.3.hc_ffn_fn", "layers.1.ffn.gate.tid2eid", "embed.weight"):
        assert same_bytes(raw[name][0], generate_tensor(TINY, SPECS[name]))
        assert same_bytes(ck.tensors[name], raw[name][0])


def test_encode_tensor_rejects_a_wrong_shape():
    s = SPECS["layers.0.attn.wq_a"]
    with pytest.raises(CheckpointFormatError, match=r"layers.0.attn.wq_a.weight: got shape \[64, 127\]"):
        encode_tensor(s, torch.zeros(64, 127), "nvfp4")


# --- determinism, size, streaming --------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files(tmp_path):
    a = make_checkpoint(TINY, tmp_path / "a", fmt="nvfp4", seed=7, max_shard_bytes=1 << 20)
    b = make_checkpoint(TINY, tmp_path / "b", fmt="nvfp4", seed=7, max_shard_bytes=1 << 20)
    c = make_checkpoint(TINY, tmp_path / "c", fmt="nvfp4", seed=8, max_shard_bytes=1 << 20)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) >= 8
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    shard = next(n for n in names if n.startswith("model-"))
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


def test_streaming_shard_serialiser_matches_safetensors_byte_for_byte(raw, tmp_path):
    from safetensors.torch import save_file

    tensors = {k: t for k, (t, _) in raw.items()}
    tensors["a_bool"], tensors["an_empty_f16"] = torch.tensor([True, False]), torch.zeros(0, 3, dtype=torch.float16)
    save_shard(tensors, tmp_path / "ours.safetensors")
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_tiny_checkpoint_is_under_30_MB(tiny, tmp_path):
    assert checkpoint_bytes(tiny) < 30e6
    assert checkpoint_bytes(make_checkpoint(TINY, tmp_path, fmt="bf16")) < 30e6


def test_shards_are_flushed_while_tensors_are_still_being_generated(tmp_path):
    limit = 256 * 1024
    flushed_at: list[int] = []

    def stream():
        for i, item in enumerate(generate_tensors(TINY, seed=0)):
            if not flushed_at and any(tmp_path.glob("*.partial")):
                flushed_at.append(i)
            yield item

    write_checkpoint(TINY, stream(), tmp_path, "nvfp4", max_shard_bytes=limit)
    assert flushed_at and flushed_at[0] < len(SPECS) // 4
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 8 and not list(tmp_path.glob("*.partial"))
    for f in shards:
        with safe_open(str(f), framework="pt") as h:
            sizes = [h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys()]
        assert sum(sizes) <= limit or len(sizes) <= 4        # only a single over-sized tensor group may exceed it
    load_checkpoint(tmp_path, progress=False)


def test_rewriting_a_directory_replaces_the_old_shards(tmp_path):
    make_checkpoint(TINY, tmp_path, fmt="nvfp4", max_shard_bytes=256 * 1024)
    make_checkpoint(TINY, tmp_path, fmt="bf16")
    assert sorted(p.name for p in tmp_path.glob("model-*")) == ["model-00001-of-00001.safetensors"]
    assert not (tmp_path / "hf_quant_config.json").exists()
    load_checkpoint(tmp_path, progress=False)


# --- writer input validation ----------------------------------------------------------------------------------------
def test_writer_rejects_incomplete_or_foreign_input(tmp_path):
    tensors = dict(generate_tensors(TINY, seed=0))
    missing = {k: v for k, v in tensors.items() if k != "layers.0.attn.attn_sink"}
    with pytest.raises(CheckpointFormatError, match="were not given.*layers.0.attn.attn_sink"):
        write_checkpoint(TINY, missing, tmp_path / "a", "bf16")
    with pytest.raises(CheckpointFormatError, match="not part of this model"):
        write_checkpoint(TINY, {**tensors, "layers.0.bogus": torch.zeros(1)}, tmp_path / "b", "bf16")
    with pytest.raises(CheckpointFormatError, match="given twice"):
        write_checkpoint(TINY, [("embed.weight", tensors["embed.weight"])] * 2, tmp_path / "c", "bf16")
    with pytest.raises(ConfigError, match="unknown checkpoint format"):
        write_checkpoint(TINY, tensors, tmp_path / "d", "int4")
    with pytest.raises(ConfigError, match="bos/eos"):
        write_checkpoint(TINY.replace(bos_token_id=5), tensors, tmp_path / "e", "bf16")
