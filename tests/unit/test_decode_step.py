"""The decode step CUDA graphs replay (device tables, branch-free compressor, batch padded by repeating row 0)
computes exactly what the general chunked path computes, step after step, across compressed-window closings.

On CPU this runs the same code eagerly; tests/gpu/test_cuda_graphs.py replays it from captured graphs.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.engine.decode_inputs import DecodeInputs, decode_batch
from dsv4.engine.kv_cache import KVCache
from dsv4.engine.runner import ModelRunner
from dsv4.engine.scheduler import ScheduledStep

from engine_runs import Seq, cpu_model

MAX_LEN = 1024


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return cpu_model(tiny_checkpoint, MAX_LEN)


def new_runner(model, fp8: bool = False) -> ModelRunner:
    cache = KVCache(model.cfg, num_blocks=24, block_size=128, max_seqs=4, device=torch.device("cpu"),
                    dtype=torch.float32, fp8=fp8)
    for t in [cache.window_kv] + [t for lc in cache.layers for t in (lc.comp_kv, lc.index_k) if t is not None]:
        t.fill_(255 if fp8 else float("nan"))   # anything read before it is written poisons the logits (0xff: NaN)
    return ModelRunner(model, cache, torch.device("cpu"), MAX_LEN)


def prefill(runner: ModelRunner, seqs: list[Seq]) -> list[int]:
    """-> each sequence's greedy next token."""
    for s in seqs:
        runner.cache.add(s.request_id)
        runner.cache.grow(s.request_id, s.num_tokens)
    logits = runner.execute(ScheduledStep(seqs=seqs, num_tokens=[s.num_tokens for s in seqs])).logits
    return logits.argmax(-1).tolist()


@pytest.mark.parametrize("padded_extra,fp8", [(0, False), (3, False), (3, True)])
def test_decode_path_equals_general_path_across_window_closings(model, padded_extra, fp8):
    # prompts end just before a ratio-128 window closes (position 127 / 255) and mid ratio-4 window
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (125, 250, 3)]
    general, decode = new_runner(model, fp8), new_runner(model, fp8)
    seqs_g = [Seq(f"s{i}", p) for i, p in enumerate(prompts)]
    seqs_d = [Seq(f"s{i}", list(p)) for i, p in enumerate(prompts)]
    first = prefill(general, seqs_g)
    prefill(decode, seqs_d)
    for sg, sd, tok in zip(seqs_g, seqs_d, first):
        sg.output_ids.append(tok)
        sd.output_ids.append(tok)
    for _ in range(10):
        for r, seqs in ((general, seqs_g), (decode, seqs_d)):
            for s in seqs:
                r.cache.grow(s.request_id, s.num_tokens)
        step = ScheduledStep(seqs=seqs_g, num_tokens=[1] * len(seqs_g))
        batch, _ = general.build_batch(step)
        want = model.forward(batch, general.cache.layers)
        for s in seqs_g:
            s.num_computed += 1
            general.cache.release_window(s.request_id, s.num_computed)

        inputs = DecodeInputs.build(seqs_d, decode.cache, len(seqs_d) + padded_extra, decode.table_width)
        i64, i32 = torch.from_numpy(inputs.i64), torch.from_numpy(inputs.i32)
        got = model.forward(decode_batch(i64, i32, MAX_LEN - 1, torch.arange(i64.shape[1]), host=inputs),
                            decode.cache.layers)
        for s in seqs_d:
            s.num_computed += 1
            decode.cache.release_window(s.request_id, s.num_computed)

        assert torch.isfinite(got).all()
        n = len(seqs_d)
        assert float((got[:n] - want).abs().max() / want.abs().max()) < 1e-5
        for k in range(n, got.shape[0]):       # padding rows compute row 0's token again
            assert torch.allclose(got[k], got[0], rtol=1e-5, atol=1e-5)
        for sg, sd, tok in zip(seqs_g, seqs_d, want.argmax(-1).tolist()):
            sg.output_ids.append(tok)
            sd.output_ids.append(tok)


def test_runner_routes_decode_only_steps_through_the_decode_path(model):
    runner = new_runner(model)
    seqs = [Seq("a", [5, 6, 7]), Seq("b", [9])]
    prefill(runner, seqs)
    eager_before = runner.eager_steps
    for s in seqs:
        s.output_ids.append(3)
        runner.cache.grow(s.request_id, s.num_tokens)
    logits, sampling, _ = runner.execute(ScheduledStep(seqs=seqs, num_tokens=[1, 1]))
    assert sampling == [0, 1] and logits.shape == (2, model.cfg.vocab_size)
    assert runner.eager_steps == eager_before + 1 and runner.graph_steps == 0   # no graphs on CPU
