"""The three storage formats of one seed hold the same model up to quantisation error.

nvfp4, fp8-mxfp4 and bf16 checkpoints of the same seed are written from the same float32 master weights, so:
unquantised tensors are bit-identical; FP8 (e4m3: 3 mantissa bits, relative rounding error <= 2**-4, RMS ~ 2**-4/sqrt(3)
~ 3.6% for a uniform spread) lands within 4% (relative Frobenius) of the BF16 weights; e2m1 (1 mantissa bit) is much
coarser: NVFP4 (e4m3 scale per 16) within 13%, MXFP4 (power-of-two scale per 32) within 16%.
"""

from __future__ import annotations


import pytest
import torch

from dsv4.checkpoint.loader import load_checkpoint
from dsv4.checkpoint.presets import PRESETS
from dsv4.checkpoint.writer import make_checkpoint

BOUNDS = {"fp8": 0.04, "nvfp4": 0.13, "mxfp4": 0.16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cfg = PRESETS["tiny"](None)
    root = tmp_path_factory.mktemp("formats")
    return {fmt: load_checkpoint(make_checkpoint(cfg, root / fmt, fmt=fmt, seed=3), progress=False)
            for fmt in ("nvfp4", "fp8-mxfp4", "bf16")}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_formats_dequantize_close_to_each_other(checkpoints):
    nv, mx, bf = checkpoints["nvfp4"], checkpoints["fp8-mxfp4"], checkpoints["bf16"]
    seen = set()
    for name in bf.tensors:
        ref = bf.dense(name)
        for ck in (nv, mx):
            kind = ck.formats[name]
            seen.add(kind)
            if kind in ("bf16", "fp32", "table"):
                assert torch.equal(ck.dense(name), ref), name
            else:
                assert rel_err(ck.dense(name), ref) < BOUNDS[kind], (name, kind)
        if nv.formats[name] == "nvfp4":
            assert rel_err(nv.dense(name), mx.dense(name)) < BOUNDS["nvfp4"] + BOUNDS["mxfp4"], name
    assert seen == {"bf16", "fp32", "table", "fp8", "nvfp4", "mxfp4"}
    assert set(bf.formats.values()) == {"bf16", "fp32", "table", "dense"}


def test_formats_agree_elementwise_within_the_fp8_grid(checkpoints):
    """FP8 with power-of-two block scales: each element moves by at most half an e4m3 step (2**-4 relative) from
    the float32 master, and the BF16 copy by at most 2**-9; subnormals get an absolute step of scale * 2**-9."""
    name = "layers.1.attn.wq_b.weight"
    fp8 = checkpoints["nvfp4"].tensors[name]
    bf16 = checkpoints["bf16"].dense(name)
    step = fp8.scale.float().max() * 2.0 ** -9
    assert ((fp8.dequantize() - bf16).abs() <= bf16.abs() * (2 ** -4 + 2 ** -8) + step).all()
