"""`dsv4 bench decode` and the decode scripts (scripts/decode_ab.py, scripts/decode_timeline.py) time the model on
sequences that already sit at position `context` with their cache blocks allocated; on CPU the same setup builds
with torch ops, and the step it feeds runs."""

from __future__ import annotations

import torch

from dsv4.bench_decode_cmd import build_decode_setup
from dsv4.checkpoint.loader import load_checkpoint
from dsv4.engine.decode_inputs import DecodeInputs, decode_batch


def test_sequences_sit_at_the_context_with_blocks_for_the_graph_length(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint, progress=False)
    s = build_decode_setup(ckpt.config, ckpt.tensors, context=200, max_batch=3, block_size=128, backend="torch",
                           device="cpu")
    assert s.max_len == 264 and s.width == 3
    assert [q.num_computed for q in s.seqs] == [200, 200, 200]
    assert s.cache.blocks_in_use > 0
    inputs = DecodeInputs.build(s.seqs[:2], s.cache, 2, s.width)
    logits = s.model.forward(decode_batch(torch.from_numpy(inputs.i64), torch.from_numpy(inputs.i32), s.max_len - 1,
                                          torch.arange(2)), s.cache.layers)
    assert logits.shape == (2, ckpt.config.vocab_size) and torch.isfinite(logits).all()
