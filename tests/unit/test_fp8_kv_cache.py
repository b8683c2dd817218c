"""The FP8 KV cache (kv_cache_dtype="fp8_e4m3"): FlashMLA's V4 row format, and an engine that stores every cached
vector that way decodes exactly what the oracle decodes when the oracle sees the cache's values.

The oracle models the cache (ReferenceModel(kv_cache_dtype=...) round-trips window KV, compressed entries and indexer
keys through the same format), so equality here checks the paged FP8 writes and reads, not the format's accuracy;
the last test makes sure the format really changes the numbers, i.e. that the comparison is not vacuous.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.checkpoint.loader import load_checkpoint
from dsv4.checkpoint.presets import PRESETS
from dsv4.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.kv_cache import CacheShape
from dsv4.engine.params import SamplingParams
from dsv4.errors import ConfigError
from dsv4.ops.fp8_rows import Fp8Rows
from dsv4.reference import ReferenceModel
from engine_runs import run_concurrently

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 129, 400, 700)


def test_the_v4_row_is_flashmlas_584_bytes():
    rows = Fp8Rows(512, 64)
    assert (rows.nope, rows.groups, rows.row_bytes) == (448, 7, 584)
    assert Fp8Rows(128, 64).row_bytes == 200            # indexer keys: 64 + 128 + 1 scale, padded to 8


@pytest.mark.parametrize("dim,rope_dim", [(512, 64), (128, 64), (64, 16)])
def test_round_trip_keeps_e4m3_precision_per_group_and_bf16_rope(dim, rope_dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn((300, dim), generator=g) * torch.logspace(-3, 3, 300)[:, None]
    x[7] = 0.0
    rows = Fp8Rows(dim, rope_dim)
    packed = rows.quantize(x)
    assert packed.dtype == torch.uint8 and packed.shape == (300, rows.row_bytes)
    y = rows.dequantize(packed)
    assert torch.equal(y[:, rows.nope:], x[:, rows.nope:].to(torch.bfloat16).float())
    assert torch.equal(y[7], torch.zeros(dim))
    nope = x[:, :rows.nope]
    err = (y[:, :rows.nope] - nope).abs()
    for k in range(rows.groups):
        grp = slice(64 * k, min(64 * (k + 1), rows.nope))
        amax = nope[:, grp].abs().amax(1, keepdim=True)
        # e4m3: 3 mantissa bits for normal values (half an ulp <= 2^-4 relative), and the scale puts the group's
        # largest value near 448, so values down to amax * 2^-15 stay normal; below that, absolute error bounded
        assert (err[:, grp] <= nope[:, grp].abs() * 2.0 ** -4 + amax * 2.0 ** -17).all()
    assert rows.quantize(x.view(30, 10, dim)).shape == (30, 10, rows.row_bytes)


def test_fp8_rows_take_less_cache_memory():
    cfg = PRESETS["small"](None)
    bf16 = CacheShape.of(cfg, 128, torch.bfloat16)
    fp8 = CacheShape.of(cfg, 128, torch.bfloat16, fp8=True)
    assert fp8.window_block_bytes * 1024 == bf16.window_block_bytes * 584
    assert fp8.block_bytes < 0.6 * bf16.block_bytes


@pytest.fixture(scope="module")
def fp8_reference(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint, progress=False)
    return ReferenceModel(ckpt.config, ckpt.dequantized(torch.float32), kv_cache_dtype="fp8_e4m3")


@pytest.fixture(scope="module")
def prompts(fp8_reference):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(2, fp8_reference.cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def test_engine_with_fp8_cache_matches_the_reference_that_models_it(tiny_checkpoint, fp8_reference, prompts):
    expected = [fp8_reference.generate_greedy(p, NEW_TOKENS) for p in prompts]
    engine = Engine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cpu", ops_backend="torch", max_num_seqs=8,
                                 max_model_len=1024, max_num_batched_tokens=256, num_kv_blocks=64,
                                 kv_cache_dtype="fp8_e4m3"))
    try:
        assert engine.cache.window_kv.dtype == torch.uint8
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        assert run_concurrently(engine, prompts, params) == expected
    finally:
        engine.shutdown()


def test_the_fp8_cache_changes_the_numbers(tiny_checkpoint, fp8_reference, prompts):
    """Otherwise the equality above would not show that the engine reads FP8 rows."""
    ckpt = load_checkpoint(tiny_checkpoint, progress=False)
    plain = ReferenceModel(ckpt.config, ckpt.dequantized(torch.float32))
    a, b = fp8_reference.forward(prompts[2]).logits, plain.forward(prompts[2]).logits
    assert (a - b).norm() / b.norm() > 1e-3


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig(checkpoint="x", kv_cache_dtype="int4")
