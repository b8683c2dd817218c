"""The engine (paged caches, continuous batching, torch ops) decodes exactly what the oracle decodes.

Level 2 of the three levels of truth: greedy tokens through the engine must equal `reference.py` token for token,
whatever the batching, chunking or preemption, and every KV block must be free again afterwards.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tokenizers import Tokenizer

from dsv4.checkpoint.loader import load_checkpoint
from dsv4.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.params import SamplingParams
from dsv4.errors import InvalidRequestError
from dsv4.reference import ReferenceModel
from engine_runs import run_concurrently

NEW_TOKENS = 64
PROMPT_LENGTHS = (1, 5, 100, 129, 230, 400, 555, 700)  # 100 and 230 cross a 128-block boundary while decoding


def greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint, progress=False)
    return ReferenceModel(ckpt.config, ckpt.dequantized(torch.float32))


@pytest.fixture(scope="module")
def prompts(reference):
    g = torch.Generator().manual_seed(1234)
    vocab = reference.cfg.vocab_size
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def expected(reference, prompts):
    return [reference.generate_greedy(p, NEW_TOKENS) for p in prompts]


def make_engine(path, **kw) -> Engine:
    base = dict(checkpoint=str(path), device="cpu", ops_backend="torch", max_num_seqs=8, max_model_len=1024,
                max_num_batched_tokens=1024, num_kv_blocks=64)
    base.update(kw)
    return Engine(EngineConfig(**base))


def wait_until_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = engine.stats()
        if st.num_running == 0 and st.num_waiting == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


def test_single_request_matches_reference(tiny_checkpoint, prompts, expected):
    engine = make_engine(tiny_checkpoint)
    try:
        out = engine.generate(prompt_token_ids=prompts[4], params=greedy())
        assert out.token_ids == expected[4]
        assert out.finish_reason == "length" and out.num_output_tokens == NEW_TOKENS
    finally:
        engine.shutdown()


def test_eight_concurrent_requests_of_mixed_lengths_match_reference(tiny_checkpoint, prompts, expected):
    engine = make_engine(tiny_checkpoint)
    try:
        assert run_concurrently(engine, prompts, greedy()) == expected
        wait_until_idle(engine)
        assert engine.stats().kv_blocks_in_use == 0
    finally:
        engine.shutdown()


def test_chunked_prefill_with_a_small_chunk_matches_reference(tiny_checkpoint, prompts, expected):
    engine = make_engine(tiny_checkpoint, max_num_batched_tokens=48)
    try:
        assert run_concurrently(engine, prompts[3:6], greedy()) == expected[3:6]
    finally:
        engine.shutdown()


def test_preemption_by_recompute_keeps_outputs_exact(tiny_checkpoint, prompts, expected):
    # 3 blocks of 128 positions per pool. The 100- and 230-token requests are admitted with 1 + 2 blocks and each
    # needs one more while decoding, so the scheduler must preempt one and recompute it later.
    chosen = (0, 1, 2, 4)
    engine = make_engine(tiny_checkpoint, num_kv_blocks=3, max_model_len=384)
    try:
        assert run_concurrently(engine, [prompts[i] for i in chosen], greedy()) == [expected[i] for i in chosen]
        wait_until_idle(engine)
        st = engine.stats()
        assert st.num_preemptions > 0, "the pool was meant to be too small to hold every request at once"
        assert st.kv_blocks_in_use == 0
    finally:
        engine.shutdown()


def test_aborts_mid_prefill_and_mid_decode_free_every_block(tiny_checkpoint, prompts):
    engine = make_engine(tiny_checkpoint, max_num_batched_tokens=32)
    try:
        decoding = engine.add_request("decode", prompt_token_ids=prompts[1], params=greedy(200))
        first = decoding.get(timeout=60)            # it is decoding now
        assert first.token_ids and not first.finished
        long_prefill = engine.add_request("prefill", prompt_token_ids=prompts[-1], params=greedy(200))
        for _ in range(2):                          # two more steps: the prefill got ~31 tokens each
            assert not decoding.get(timeout=60).finished
        engine.abort("prefill")                     # 700 tokens at ~31 per step: still in prefill
        engine.abort("decode")
        finals = {}
        for name, s in (("prefill", long_prefill), ("decode", decoding)):
            last = None
            for out in s:
                last = out
            finals[name] = last
        assert finals["prefill"].finish_reason == "abort" and finals["prefill"].num_output_tokens == 0
        assert finals["decode"].finish_reason == "abort"
        wait_until_idle(engine)
        assert engine.stats().kv_blocks_in_use == 0
        # and it still serves
        assert engine.generate(prompt_token_ids=prompts[0], params=greedy(4)).num_output_tokens == 4
    finally:
        engine.shutdown()


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tiny_checkpoint, prompts, monkeypatch):
    engine = make_engine(tiny_checkpoint)
    try:
        real = engine.runner.execute
        calls = {"n": 0}

        def boom(step, pending=None):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected failure")
            return real(step, pending)

        monkeypatch.setattr(engine.runner, "execute", boom)
        out = engine.generate(prompt_token_ids=prompts[2], params=greedy(4))
        assert out.finish_reason == "error" and "injected failure" in out.error
        wait_until_idle(engine)
        assert engine.stats().kv_blocks_in_use == 0
        assert engine.generate(prompt_token_ids=prompts[2], params=greedy(4)).finish_reason == "length"
    finally:
        engine.shutdown()


def test_requests_from_many_threads(tiny_checkpoint, prompts, expected):
    engine = make_engine(tiny_checkpoint)
    results: dict[int, list[int]] = {}
    try:
        def worker(i: int) -> None:
            results[i] = engine.generate(prompt_token_ids=prompts[i], params=greedy(16),
                                         request_id=f"t{i}").token_ids
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [results[i] for i in range(4)] == [e[:16] for e in expected[:4]]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kwargs, names", [
    (dict(prompt=""), "prompt"),
    (dict(prompt_token_ids=[]), "prompt"),
    (dict(prompt_token_ids=[5] * 1024), "prompt length"),
    (dict(prompt_token_ids=[5] * 10, params=SamplingParams(max_tokens=2000)), "max_tokens"),
    (dict(prompt_token_ids=[10 ** 9]), "input_ids"),
    (dict(prompt="hi", prompt_token_ids=[3]), "prompt"),
])
def test_bad_requests_raise_errors_naming_the_problem(tiny_checkpoint, kwargs, names):
    engine = make_engine(tiny_checkpoint)
    try:
        with pytest.raises(InvalidRequestError, match=names):
            engine.add_request("bad", **kwargs)
        assert engine.generate(prompt="hello", params=greedy(2)).num_output_tokens == 2
    finally:
        engine.shutdown()


def test_text_prompt_streams_utf8_text(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint)
    try:
        out = engine.generate(prompt="Paged attention on Hopper: ünïcödé ✓ 漢字", params=greedy(24))
        assert out.num_output_tokens == 24
        assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    finally:
        engine.shutdown()


def test_on_output_callback_receives_the_same_deltas(tiny_checkpoint, prompts, expected):
    """A server passes on_output to collect every request's deltas on one queue instead of one thread each."""
    engine = make_engine(tiny_checkpoint)
    try:
        got: dict[str, list] = {"a": [], "b": []}
        done = threading.Event()

        def sink(rid):
            def put(out):
                got[rid].append(out)
                if all(o and o[-1].finished for o in got.values()):
                    done.set()
            return put

        for rid, k in (("a", 2), ("b", 4)):
            engine.add_request(rid, prompt_token_ids=prompts[k], params=greedy(), on_output=sink(rid))
        assert done.wait(60)
        assert [i for o in got["a"] for i in o.token_ids] == expected[2]
        assert [i for o in got["b"] for i in o.token_ids] == expected[4]
        wait_until_idle(engine)
        assert engine.stats().kv_blocks_in_use == 0
    finally:
        engine.shutdown()


def test_decode_runs_one_step_ahead_of_the_host(tiny_checkpoint, prompts, expected):
    """Async scheduling: once every request decodes, each step is launched before the host reads the tokens of the
    step before it (they go from the device into the next step's input), and the tokens are still the oracle's."""
    engine = make_engine(tiny_checkpoint)
    try:
        assert run_concurrently(engine, prompts, greedy()) == expected
        st = engine.stats()
        assert st.overlapped_steps > st.steps // 2, st
        wait_until_idle(engine)
        assert engine.stats().kv_blocks_in_use == 0
    finally:
        engine.shutdown()


def _outputs(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple]:
    streams = [engine.add_request(f"q{i}", prompt_token_ids=p, params=sp) for i, (p, sp) in enumerate(requests)]
    result = []
    for s in streams:
        outs = list(s)
        result.append((tuple(i for o in outs for i in o.token_ids), "".join(o.text for o in outs),
                       tuple(x for o in outs for x in (o.logprobs or ())), outs[-1].finish_reason,
                       outs[-1].num_output_tokens, tuple(o.num_output_tokens for o in outs)))
    return result


def test_async_scheduling_changes_no_output(tiny_checkpoint, prompts, expected):
    """Sampling with seeds, min_tokens suppression, stop ids and stop strings decided a step late on the host: the
    streams (ids, text, logprobs, counts, finish reasons) equal those of an engine that reads every step first."""
    stop_id = expected[1][6]
    first_stop = expected[1].index(stop_id) + 1
    assert first_stop > 1
    tok = Tokenizer.from_file(str(load_checkpoint(tiny_checkpoint, progress=False).tokenizer_path))
    text = tok.decode(expected[3])
    stop_text = next(text[i:i + 2] for i in range(len(text) // 3, len(text) - 1) if text[i:i + 2].strip())
    requests = [
        (prompts[0], SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=40, logprobs=1)),
        # min_tokens lets the stop id through exactly at its first greedy occurrence: a suppression decided with a
        # stale token count (one step behind) would block it there
        (prompts[1], SamplingParams(temperature=0.0, max_tokens=40, min_tokens=first_stop - 1,
                                    stop_token_ids=[stop_id])),
        (prompts[1], SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_id])),
        (prompts[2], SamplingParams(temperature=1.0, seed=3, max_tokens=33)),
        (prompts[3], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop=[stop_text])),
    ]
    results = {}
    for mode in (True, False):
        engine = make_engine(tiny_checkpoint, async_scheduling=mode)
        try:
            results[mode] = _outputs(engine, requests)
            wait_until_idle(engine)
            assert engine.stats().kv_blocks_in_use == 0
            assert (engine.stats().overlapped_steps > 0) == mode
        finally:
            engine.shutdown()
    # logprobs to float noise: a sequence that stopped is computed once more in the step already launched, so
    # batch compositions (and so BLAS blockings) differ between the two engines
    for a, b in zip(results[True], results[False]):
        assert a[:2] == b[:2] and a[3:] == b[3:]
        assert torch.allclose(torch.tensor(a[2]), torch.tensor(b[2]), rtol=1e-5, atol=1e-5)
    assert results[False][2][3:5] == ("stop", first_stop)
    assert results[False][1][3:5] == ("stop", first_stop)
    assert results[False][4][3] == "stop" and stop_text not in results[False][4][1]
    assert all(-1 not in r[0] for r in results[True])


@pytest.mark.parametrize("async_prefill", [True, False], ids=["run-ahead", "wait-for-tokens"])
@pytest.mark.parametrize("chunk", [1024, 48], ids=["whole-prompts", "chunked-prefill"])
def test_requests_arriving_while_others_decode_match_reference(tiny_checkpoint, prompts, expected, chunk,
                                                               async_prefill):
    """The server's load shape: each request arrives when the one before it has streamed its third token, so it is
    admitted next to decoding sequences whose last token is still on the device and, with a small token budget,
    prefilled in chunks beside them. With `async_prefill` that step is launched before the host reads those tokens
    (its decode rows take them on the device). Every stream equals the reference, and no block leaks."""
    engine = make_engine(tiny_checkpoint, max_num_batched_tokens=chunk, async_prefill=async_prefill)
    order = [1, 4, 0, 6, 2, 5]
    tokens: dict[int, list[int]] = {}
    errors: list[str] = []
    finished = threading.Semaphore(0)

    def arrive(k: int) -> None:
        tokens[k] = []

        def on_output(out) -> None:          # on the engine's thread: record, assert in the test
            if out.error is not None:
                errors.append(out.error)
            tokens[k] += out.token_ids
            if k + 1 < len(order) and len(tokens[k]) >= 3 and (k + 1) not in tokens:
                arrive(k + 1)
            if out.finished:
                finished.release()
        engine.add_request(f"r{k}", prompt_token_ids=prompts[order[k]], params=greedy(), on_output=on_output)

    try:
        arrive(0)
        for _ in order:
            assert finished.acquire(timeout=120), f"only {len(tokens)} requests started"
        assert not errors
        assert tokens == {k: expected[i] for k, i in enumerate(order)}
        wait_until_idle(engine)
        st = engine.stats()
        assert st.kv_blocks_in_use == 0
        # every admission but the first (nothing in flight) and prompts[0]'s (one token: a decode-shaped step)
        if async_prefill:
            assert st.overlapped_prompt_steps >= len(order) - 2, st
        else:
            assert st.overlapped_prompt_steps == 0, st
    finally:
        engine.shutdown()
