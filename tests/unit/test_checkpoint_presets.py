"""Specification of the model presets (dsv4.checkpoint.presets) and of their config.json round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.checkpoint.names import model_specs
from dsv4.checkpoint.presets import PRESETS, REAL_VOCAB_SIZE, TOKENIZER_VOCAB_SIZE, preset
from dsv4.checkpoint.tokenizer import train_tokenizer
from dsv4.config import ModelConfig
from dsv4.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("layers", [None, 1, 3, 9])
def test_config_round_trips_through_to_dict_and_json(name, layers):
    cfg = PRESETS[name](layers)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.n_layers == (layers or cfg.n_layers)
    assert len(cfg.compress_ratios) == cfg.n_layers + cfg.n_mtp_layers


def test_written_config_json_parses_back_to_the_preset(tiny_checkpoint):
    assert ModelConfig.from_file(Path(tiny_checkpoint) / "config.json") == PRESETS["tiny"](None)


def test_tiny_has_every_layer_kind():
    cfg = PRESETS["tiny"](None)
    assert cfg.compress_ratios == (0, 4, 128, 4, 0, 4)      # window, CSA, HCA, CSA, window | MTP CSA
    assert cfg.n_hash_layers == 2 and cfg.n_mtp_layers == 1
    assert (cfg.vocab_size, cfg.dim, cfg.n_heads, cfg.head_dim, cfg.rope_head_dim) == (512, 128, 4, 64, 16)
    assert (cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim) == (8, 2, 64)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.window_size) == (4, 32, 16, 64)
    assert cfg.score_func == "sqrtsoftplus" and cfg.route_scale == 1.5 and cfg.swiglu_limit == 10.0


def test_tiny_yarn_measurably_changes_compressed_rope_frequencies():
    from dsv4.config import RopeConfig
    from dsv4.reference import rope_frequencies

    cfg = PRESETS["tiny"](None)
    yarn = rope_frequencies(cfg.compress_rope, cfg.rope_head_dim)
    plain = rope_frequencies(RopeConfig(theta=cfg.compress_rope.theta), cfg.rope_head_dim)
    ratio = yarn / plain
    assert ratio[0] == 1.0                          # the fastest pair is kept
    assert (ratio[1:] < 0.9).all()                  # the others are interpolated ...
    assert ratio[-1] == pytest.approx(1 / 16)       # ... down to 1/factor
    assert cfg.compress_rope.original_seq_len * cfg.compress_rope.factor == cfg.max_position_embeddings


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_vocab_equals_the_tokenizer_size(name):
    cfg = PRESETS[name](None)
    assert cfg.vocab_size == TOKENIZER_VOCAB_SIZE == train_tokenizer(TOKENIZER_VOCAB_SIZE).get_vocab_size()
    assert (cfg.bos_token_id, cfg.eos_token_id) == (0, 1)


def test_small_uses_the_real_per_head_dims_and_v4_layer_mix():
    cfg = PRESETS["small"](None)
    assert (cfg.head_dim, cfg.rope_head_dim, cfg.index_head_dim, cfg.window_size) == (512, 64, 128, 128)
    assert cfg.compress_ratios == (0, 4, 128, 4, 128, 4, 0, 4) and cfg.n_hash_layers == 2
    assert (cfg.dim, cfg.n_heads, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank) == (1024, 16, 512, 4, 256)
    assert (cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim) == (32, 6, 512)
    assert (cfg.index_n_heads, cfg.index_topk) == (16, 64)


def test_flash_layers_has_the_release_shapes():
    cfg = preset("flash-layers", 5)
    assert cfg.vocab_size == REAL_VOCAB_SIZE == 129280
    assert cfg.compress_ratios == (0, 0, 4, 128, 4, 0) and cfg.n_hash_layers == 3
    assert preset("flash-layers").n_layers == 2 and preset("flash-layers").compress_ratios == (0, 0, 0)
    shapes = {s.name: s.shape for s in model_specs(cfg)}
    # docs/MODEL_SOURCES.md section 3 (Flash)
    assert shapes["embed.weight"] == (129280, 4096)
    assert shapes["hc_head_fn"] == (4, 16384)
    assert shapes["layers.0.hc_attn_fn"] == (24, 16384)
    assert shapes["layers.0.attn.wq_a"] == (1024, 4096)
    assert shapes["layers.0.attn.wq_b"] == (32768, 1024)
    assert shapes["layers.0.attn.wkv"] == (512, 4096)
    assert shapes["layers.0.attn.wo_a"] == (8192, 4096)
    assert shapes["layers.0.attn.wo_b"] == (4096, 8192)
    assert shapes["layers.2.attn.compressor.ape"] == (4, 1024)
    assert shapes["layers.3.attn.compressor.ape"] == (128, 512)
    assert shapes["layers.2.attn.indexer.wq_b"] == (8192, 1024)
    assert shapes["layers.2.attn.indexer.compressor.wkv.weight"] == (256, 4096)
    assert shapes["layers.0.ffn.gate.tid2eid"] == (129280, 6)
    assert shapes["layers.3.ffn.gate.bias"] == (256,)
    assert shapes["layers.0.ffn.experts.255.w1"] == (2048, 4096)
    assert shapes["layers.0.ffn.experts.0.w2"] == (4096, 2048)
    assert "layers.0.attn.compressor.ape" not in shapes and "mtp.0.attn.compressor.ape" not in shapes


def test_pro_layers_has_the_release_shapes():
    cfg = preset("pro-layers", 4)
    assert cfg.compress_ratios == (128, 128, 4, 128, 0) and cfg.route_scale == 2.5
    shapes = {s.name: s.shape for s in model_specs(cfg)}
    assert shapes["embed.weight"] == (129280, 7168)
    assert shapes["layers.0.attn.compressor.ape"] == (128, 512)
    assert shapes["layers.2.attn.compressor.ape"] == (4, 1024)
    assert shapes["layers.0.attn.wo_a"] == (16384, 4096)
    assert shapes["layers.0.ffn.experts.383.w1"] == (3072, 7168)
    assert shapes["layers.0.ffn.experts.0.w2"] == (7168, 3072)


def test_layer_override_is_validated():
    with pytest.raises(ConfigError):
        preset("tiny", 0)
    with pytest.raises(ConfigError, match="at most 43"):
        preset("flash-layers", 44)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
