"""Specification of dsv4.checkpoint.loader.

`load_checkpoint(path)` validates every tensor against `model_specs(config)` before reading data, detects each
projection's format from dtype + companions, and returns a `Checkpoint` of parameters keyed by the model's names.
Every problem is a CheckpointFormatError naming the tensor and the shard file.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.checkpoint.formats import FP8BlockTensor, MXFP4Tensor, NVFP4Tensor
from dsv4.checkpoint.loader import Checkpoint, load_checkpoint
from dsv4.checkpoint.names import model_specs
from dsv4.checkpoint.presets import PRESETS
from dsv4.errors import CheckpointFormatError, ConfigError

TINY = PRESETS["tiny"](None)
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:
    return Path(tiny_checkpoint)


@pytest.fixture(scope="module")
def ckpt(tiny) -> Checkpoint:
    return load_checkpoint(tiny, progress=False)


@pytest.fixture
def copy(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


def edit(path: Path, fn: Callable[[dict[str, torch.Tensor]], None], *, update_index: bool = True) -> None:
    """Apply `fn` to the tensors of every shard (in place), rewrite the shards and, optionally, the index."""
    wm = weight_map(path)
    new_map: dict[str, str] = {}
    for f in sorted(set(wm.values())):
        with safe_open(str(path / f), framework="pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        before = dict(tensors)
        fn(tensors)
        if tensors.keys() != before.keys() or any(tensors[k] is not before[k] for k in tensors):
            save_file(tensors, str(path / f), metadata={"format": "pt"})
        new_map.update({k: f for k in tensors})
        fn = _only_once(fn)
    if update_index:
        index = json.loads((path / INDEX).read_text())
        index["weight_map"] = new_map
        (path / INDEX).write_text(json.dumps(index))


def _only_once(fn):
    """Edits that add tensors must add them to one shard only: after the first shard, only removals/changes."""
    def wrapped(t: dict[str, torch.Tensor]) -> None:
        keys = set(t)
        fn(t)
        for k in set(t) - keys:
            del t[k]
    return wrapped


def load_error(path: Path) -> str:
    with pytest.raises(CheckpointFormatError) as e:
        load_checkpoint(path, progress=False)
    return str(e.value)


# --- the happy path -------------------------------------------------------------------------------------------------
def test_loads_every_parameter_of_the_model_with_its_format(ckpt, tiny):
    assert ckpt.config == TINY
    assert list(ckpt.tensors) == [s.param_name for s in model_specs(TINY)]
    assert ckpt.tokenizer_path == tiny / "tokenizer.json"
    t = ckpt.tensors
    assert isinstance(t["layers.0.attn.wq_a.weight"], FP8BlockTensor)
    assert isinstance(t["layers.0.ffn.shared_experts.w1.weight"], FP8BlockTensor)
    assert isinstance(t["layers.0.ffn.experts.0.w1.weight"], NVFP4Tensor)
    assert isinstance(t["mtp.0.ffn.experts.0.w1.weight"], MXFP4Tensor)       # NVIDIA's MTP fallback: per tensor
    assert t["mtp.0.ffn.experts.0.w1.weight"].packed.dtype == torch.uint8
    assert t["layers.0.attn_norm.weight"].dtype == torch.bfloat16
    assert t["layers.0.hc_attn_fn"].dtype == torch.float32
    assert t["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert ckpt.formats["layers.0.ffn.experts.0.w1.weight"] == "nvfp4"
    assert ckpt.formats["mtp.0.ffn.experts.0.w1.weight"] == "mxfp4"


def test_dense_and_dequantized_give_plain_float_tensors(ckpt):
    w = ckpt.dense("layers.2.ffn.experts.1.w2.weight")
    assert w.dtype == torch.float32 and w.shape == (TINY.dim, TINY.moe_inter_dim) and torch.isfinite(w).all()
    assert ckpt.dense("layers.0.attn.wq_a.weight", torch.bfloat16).dtype == torch.bfloat16
    assert ckpt.dense("layers.0.ffn.gate.tid2eid").dtype == torch.int64
    d = ckpt.dequantized()
    assert set(d) == set(ckpt.tensors)
    for s in model_specs(TINY):
        assert tuple(d[s.param_name].shape) == s.shape
    with pytest.raises(KeyError, match="no parameter"):
        ckpt.dense("layers.9.attn.wq_a.weight")


def test_a_single_model_safetensors_without_index_is_accepted(copy, ckpt):
    wm = weight_map(copy)
    tensors = {}
    for f in sorted(set(wm.values())):
        with safe_open(str(copy / f), framework="pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
        (copy / f).unlink()
    (copy / INDEX).unlink()
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    single = load_checkpoint(copy, progress=False)
    assert torch.equal(single.dense("layers.3.ffn.experts.2.w3.weight"), ckpt.dense("layers.3.ffn.experts.2.w3.weight"))


def test_hugging_face_style_names_are_mapped_to_official_ones(copy, ckpt):
    def rename(t):
        for old, new in (("layers.0.attn.wq_a.scale", "model.layers.0.self_attn.q_a_proj.weight_scale_inv"),
                         ("layers.0.attn_norm.weight", "model.layers.0.input_layernorm.weight")):
            if old in t:
                t[new] = t.pop(old)
    edit(copy, rename)
    loaded = load_checkpoint(copy, progress=False)
    assert torch.equal(loaded.dense("layers.0.attn.wq_a.weight"), ckpt.dense("layers.0.attn.wq_a.weight"))
    assert torch.equal(loaded.tensors["layers.0.attn_norm.weight"], ckpt.tensors["layers.0.attn_norm.weight"])


def test_nvfp4_input_scale_is_optional_and_ignored(copy, ckpt):
    def drop_or_poison(t):
        for k in list(t):
            if k.endswith(".input_scale"):
                if "experts.0." in k:
                    del t[k]
                else:
                    t[k] = torch.tensor(1e30)       # would overflow anything that applied it
    edit(copy, drop_or_poison)
    loaded = load_checkpoint(copy, progress=False)
    for name in ("layers.1.ffn.experts.0.w1.weight", "layers.1.ffn.experts.1.w1.weight"):
        assert torch.equal(loaded.dense(name), ckpt.dense(name))


# --- errors: each names the tensor and the shard ---------------------------------------------------------------------
def test_missing_tensor(copy):
    wm = weight_map(copy)
    specs = [s.param_name for s in model_specs(TINY)]
    neighbour = specs[specs.index("layers.1.attn.attn_sink") - 1]
    edit(copy, lambda t: t.pop("layers.1.attn.attn_sink", None))
    msg = load_error(copy)
    assert "missing tensor layers.1.attn.attn_sink" in msg and wm[neighbour] in msg


def test_missing_tensor_that_the_index_still_lists(copy):
    file = weight_map(copy)["layers.1.attn.attn_sink"]
    edit(copy, lambda t: t.pop("layers.1.attn.attn_sink", None), update_index=False)
    msg = load_error(copy)
    assert re.search(rf"missing tensor layers.1.attn.attn_sink: expected in {file} \(per {INDEX}\)", msg)


def test_missing_scale_companion(copy):
    file = weight_map(copy)["layers.2.ffn.experts.4.w2.weight"]
    edit(copy, lambda t: t.pop("layers.2.ffn.experts.4.w2.weight_scale_2", None))
    msg = load_error(copy)
    assert "missing tensor layers.2.ffn.experts.4.w2.weight_scale_2" in msg and file in msg


def test_unexpected_tensor(copy):
    edit(copy, lambda t: t.__setitem__("layers.0.attn.bogus.weight", torch.zeros(2)))
    file = weight_map(copy)["layers.0.attn.bogus.weight"]
    assert f"unexpected tensor layers.0.attn.bogus.weight in {file}" in load_error(copy)


def test_a_tensor_of_a_layer_the_config_does_not_have_is_unexpected(copy):
    edit(copy, lambda t: t.__setitem__("layers.5.attn.attn_sink", torch.zeros(4)))
    assert "unexpected tensor layers.5.attn.attn_sink" in load_error(copy)


def test_wrong_shape(copy):
    file = weight_map(copy)["layers.0.attn.attn_sink"]
    edit(copy, lambda t: t.__setitem__("layers.0.attn.attn_sink", torch.zeros(5))
         if "layers.0.attn.attn_sink" in t else None)
    assert f"wrong shape for layers.0.attn.attn_sink in {file}: expected [4], got [5]" in load_error(copy)


def test_wrong_shape_of_a_quantised_weight(copy):
    name = "layers.0.attn.wkv.weight"
    file = weight_map(copy)[name]
    edit(copy, lambda t: t.__setitem__(name, t[name][:32].contiguous()) if name in t else None)
    assert f"wrong shape for {name} in {file}: expected [64, 128], got [32, 128]" in load_error(copy)


def test_wrong_dtype(copy):
    name = "layers.0.attn.attn_sink"
    file = weight_map(copy)[name]
    edit(copy, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)) if name in t else None)
    assert f"wrong dtype for {name} in {file}: got BF16, expected F32" in load_error(copy)


def test_wrong_dtype_of_a_quantised_weight(copy):
    name = "layers.0.attn.wq_a.weight"
    file = weight_map(copy)[name]
    edit(copy, lambda t: t.__setitem__(name, t[name].to(torch.float16)) if name in t else None)
    msg = load_error(copy)
    assert f"wrong dtype for {name} in {file}: cannot tell its format from dtype F16" in msg


def test_scale_shape_mismatch(copy):
    a, b = "layers.2.ffn.experts.0.w1.weight_scale", "layers.0.attn.wq_b.scale"
    wm = weight_map(copy)

    def cut(t):
        if a in t:
            t[a] = t[a][:, :-1].contiguous()
        if b in t:
            t[b] = t[b][:1].contiguous()
    edit(copy, cut)
    msg = load_error(copy)
    assert f"scale shape mismatch for {a} in {wm[a]}: expected [64, 8], got [64, 7]" in msg
    assert f"scale shape mismatch for {b} in {wm[b]}: expected [2, 1], got [1, 1]" in msg
    assert "2 problem(s)" in msg                                              # all problems in one report


def test_truncated_shard(copy):
    shard = sorted(set(weight_map(copy).values()))[-1]
    data = (copy / shard).read_bytes()
    (copy / shard).write_bytes(data[: len(data) - 1000])
    assert f"shard {shard} is truncated or corrupt" in load_error(copy)


def test_corrupt_shard_header(copy):
    shard = sorted(set(weight_map(copy).values()))[0]
    (copy / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    assert f"shard {shard} is truncated or corrupt" in load_error(copy)


def test_index_naming_a_missing_shard_file(copy):
    shard = sorted(set(weight_map(copy).values()))[0]
    (copy / shard).unlink()
    msg = load_error(copy)
    assert f"names shard file {shard}" in msg and "does not exist" in msg


def test_no_weights_at_all(copy):
    for p in copy.glob("model*"):
        p.unlink()
    assert "neither model.safetensors.index.json nor model.safetensors" in load_error(copy)


@pytest.mark.parametrize("qc, match", [({"quant_method": "gptq", "bits": 4}, "unknown quantisation format.*'gptq'"),
                                       ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2'"),
                                       ({"quant_method": "fp8", "moe_quant_algo": "W4A8"}, "moe_quant_algo 'W4A8'")])
def test_unsupported_quantisation_config(copy, qc, match):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["quantization_config"] = qc
    (copy / "config.json").write_text(json.dumps(cfg))
    assert re.search(match, load_error(copy))


def test_an_invalid_config_is_a_config_error(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["compress_ratios"] = cfg["compress_ratios"][:-2]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="compress_ratios"):
        load_checkpoint(copy, progress=False)
