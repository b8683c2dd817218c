"""The engine's model definition (torch ops, paged caches) computes the oracle's logits, and the tiny checkpoint
exercises every path of the architecture without NaN or saturation."""

from __future__ import annotations

import pytest
import torch

from dsv4.checkpoint.loader import load_checkpoint
from dsv4.engine.kv_cache import KVCache
from dsv4.model.deepseek_v4 import DeepseekV4Model
from dsv4.ops.base import ForwardBatch
from dsv4.ops.torch_ops import TorchOps
from dsv4.reference import ReferenceModel

PROMPT = 600


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint, progress=False)


@pytest.fixture(scope="module")
def reference(ckpt):
    return ReferenceModel(ckpt.config, ckpt.dequantized(torch.float32))


@pytest.fixture(scope="module")
def token_ids(ckpt):
    return torch.randint(2, ckpt.config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def ref_out(reference, token_ids):
    return reference.forward(token_ids)


def test_tiny_checkpoint_has_every_layer_kind(ckpt):
    cfg = ckpt.config
    ratios = [cfg.compress_ratio(i) for i in range(cfg.n_layers)]
    assert 0 in ratios and 4 in ratios and any(r >= 8 for r in ratios), ratios
    assert cfg.n_hash_layers >= 1 and cfg.n_hash_layers < cfg.n_layers   # hash- and score-routed layers
    assert cfg.n_mtp_layers >= 1


def test_600_token_prompt_uses_every_compressed_path(ckpt):
    cfg = ckpt.config
    assert PROMPT // 4 > cfg.index_topk, "CSA's top-k must actually select"
    assert PROMPT > cfg.window_size, "queries must see beyond the window"
    for i in range(cfg.n_layers):
        if cfg.compress_ratio(i) > 4:
            assert PROMPT // cfg.compress_ratio(i) >= 2, "HCA must have several entries"


def test_reference_logits_are_finite_and_not_saturated(ref_out):
    logits = ref_out.logits
    assert torch.isfinite(logits).all()
    assert 0.1 < float(logits.std()) < 50, float(logits.std())
    rms = ref_out.hidden_streams.square().mean().sqrt()
    assert torch.isfinite(rms) and 0.01 < float(rms) < 1e3, float(rms)
    # not collapsed: different positions predict different tokens
    assert logits.argmax(-1).unique().numel() > 10


def test_mtp_layer_runs(reference, ref_out, token_ids):
    mtp = reference.mtp_logits(ref_out.hidden_streams[:-1], token_ids[1:])
    assert mtp.shape == (PROMPT - 1, reference.cfg.vocab_size) and torch.isfinite(mtp).all()


@pytest.mark.parametrize("chunks", [[PROMPT], [100, 37, 200, 263], [129, 471], [1] * 20 + [580]])
def test_model_over_paged_cache_equals_reference(ckpt, ref_out, token_ids, chunks):
    cfg = ckpt.config
    model = DeepseekV4Model(cfg, ckpt.tensors, TorchOps(), torch.device("cpu"), torch.float32)
    cache = KVCache(cfg, num_blocks=8, block_size=128, max_seqs=2, device=torch.device("cpu"), dtype=torch.float32)
    # poison the cache: every value attention reads must have been written by this sequence
    for t in [cache.window_kv] + [t for lc in cache.layers for t in (lc.comp_kv, lc.index_k) if t is not None]:
        t.fill_(float("nan"))
    seq, ctx, got = "s", 0, []
    slot = cache.add(seq)
    for n in chunks:
        cache.grow(seq, ctx + n)
        batch = ForwardBatch(
            token_ids=token_ids[ctx:ctx + n], positions=torch.arange(ctx, ctx + n), query_start=[0, n],
            context_lens=[ctx], state_slots=[slot], swa_block_tables=[cache.window.block_table(seq)],
            comp_block_tables=[cache.compressed.block_table(seq)],
            swa_slot_mapping=torch.tensor(cache.window_slots(seq, ctx, ctx + n)), logits_indices=torch.arange(n))
        got.append(model.forward(batch, cache.layers))
        ctx += n
        cache.release_window(seq, ctx)
    logits = torch.cat(got)
    ref = ref_out.logits
    assert torch.isfinite(logits).all()
    assert float((logits - ref).abs().max() / ref.abs().max()) < 1e-5
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    cache.free(seq)
    assert cache.blocks_in_use == 0


class _ReversedPieces(TorchOps):
    """Runs the pieces of `concurrently` last to first: what a side stream may do to their order."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def concurrently(self, *pieces):
        self.calls += 1
        return tuple(reversed([p() for p in reversed(pieces)]))


def test_pieces_the_model_runs_concurrently_are_independent(ckpt, token_ids):
    """Every group of pieces the model hands to `ops.concurrently` (queries and keys / mHC coefficients / compressor
    inputs, within the first queries / keys with the window-KV write, within the last the two compressors; routed /
    shared experts) gives the same logits when the pieces run in the opposite order: none reads what another writes."""
    cfg = ckpt.config
    outs = []
    for ops in (TorchOps(), _ReversedPieces()):
        model = DeepseekV4Model(cfg, ckpt.tensors, ops, torch.device("cpu"), torch.float32)
        cache = KVCache(cfg, num_blocks=8, block_size=128, max_seqs=1, device=torch.device("cpu"),
                        dtype=torch.float32)
        slot = cache.add("s")
        n = 300
        cache.grow("s", n)
        batch = ForwardBatch(
            token_ids=token_ids[:n], positions=torch.arange(n), query_start=[0, n], context_lens=[0],
            state_slots=[slot], swa_block_tables=[cache.window.block_table("s")],
            comp_block_tables=[cache.compressed.block_table("s")],
            swa_slot_mapping=torch.tensor(cache.window_slots("s", 0, n)), logits_indices=torch.arange(n))
        outs.append(model.forward(batch, cache.layers))
    # two groups in the attention sub-layer of every layer, one in the MoE; a third in the attention of ratio-4 layers
    # (their two compressors)
    assert ops.calls == 3 * cfg.n_layers + sum(cfg.compress_ratio(i) == 4 for i in range(cfg.n_layers))
    assert torch.equal(outs[0], outs[1])
