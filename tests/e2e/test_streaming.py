"""Acceptance: streaming and non-streaming generation through the real tritonserver equal the engine's direct output.

- 4 concurrent gRPC streams (stream=true): the concatenated deltas equal Engine.generate (in-process, same
  checkpoint, greedy, same max_tokens, ignore_eos); the final response carries finish_reason and the token counts
  when the return_* flags ask for them, and they are right.
- stream=false: exactly one response, equal to the streamed text.
- HTTP /v2/models/deepseek_v4/generate and /generate_stream (SSE) both work and agree with gRPC.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

from _triton import (MODEL, greedy, http_post, infer, kv_blocks_in_use, metric, request, sse_events,  # noqa: E402
                     tensor, wait_for)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

PROMPTS = ["Hello world", "The quick brown fox", "DeepSeek-V4 serves tokens:", "Grüße, 世界! ✓"]
N = 12  # max_tokens of the comparisons


def _check_stream(rep, ref, n_tokens):
    """A streamed reply with every return_* flag set against the engine's direct RequestOutput."""
    assert rep.error is None, rep.error
    assert ref.finish_reason == "length" and ref.num_output_tokens == n_tokens, ref
    assert len(rep.responses) >= 2, "stream=true must stream (one response per engine delta)"
    assert rep.text == ref.text
    assert rep.finals[-1] and not any(rep.finals[:-1]), rep.finals
    reasons = rep.strs("finish_reason")
    assert reasons[-1] == ref.finish_reason, reasons
    assert all(r == "None" for r in reasons[:-1]), reasons  # vLLM backend: "None" until the last response
    counts = rep.ints("num_output_tokens")  # per response while streaming (vLLM backend)
    assert sum(counts) == ref.num_output_tokens == n_tokens, counts
    assert all(c >= 0 for c in counts)
    assert set(rep.ints("num_input_tokens")) == {ref.num_prompt_tokens}


def test_four_concurrent_grpc_streams_equal_direct_engine_output(dsv4_server, direct):
    n = 24  # long enough that the 4 requests are decoded together
    barrier = threading.Barrier(len(PROMPTS))
    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        reps = list(ex.map(lambda p: infer(dsv4_server.grpc_url, request(p, sampling=greedy(n)), barrier=barrier),
                           PROMPTS))
    for prompt, rep in zip(PROMPTS, reps):
        ref = direct(prompt, **greedy(n))
        _check_stream(rep, ref, n)
    # concurrency was real: every stream had its first token before any stream got its last one
    assert max(r.times[0] for r in reps) < min(r.times[-1] for r in reps), [(r.times[0], r.times[-1]) for r in reps]


def test_eight_concurrent_streams_and_metrics(dsv4_server, direct):
    """8 concurrent streams all complete and equal the direct output (the 2.51 backend crashed the server when
    several Python threads sent responses concurrently; model.py funnels all stub IPC through one thread); the
    custom metrics are exported."""
    prompts = [f"prompt {i}" for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        reps = list(ex.map(lambda p: infer(dsv4_server.grpc_url, request(p, sampling=greedy(N))), prompts))
    for prompt, rep in zip(prompts, reps):
        assert rep.error is None, rep.error
        assert rep.text == direct(prompt, **greedy(N)).text
        assert sum(rep.ints("num_output_tokens")) == N
    assert dsv4_server.alive(), dsv4_server.log_tail()
    m = wait_for(dsv4_server, lambda t: kv_blocks_in_use(t) == 0)
    for name in ("dsv4_time_to_first_token_seconds_bucket", "dsv4_inter_token_latency_seconds_bucket",
                 "dsv4_generation_tokens_total", "dsv4_kv_blocks_in_use", "dsv4_kv_blocks_total",
                 "dsv4_num_requests_waiting", "dsv4_num_requests_running", "dsv4_requests_total"):
        assert name + "{" in m, name


def test_latency_metrics_count_responses_and_tokens(dsv4_server):
    """One TTFT and one inter-token-latency observation (its mean token gap) per request (metric calls are IPC
    round trips, so they are per request, not per token or response), and every generated token counted."""
    names = ("dsv4_time_to_first_token_seconds_count", "dsv4_inter_token_latency_seconds_count",
             "dsv4_generation_tokens_total")

    def read(text):
        return [metric(text, name, model=MODEL) or 0.0 for name in names]

    before = read(dsv4_server.metrics())
    rep = infer(dsv4_server.grpc_url, request(PROMPTS[2], sampling=greedy(N)))
    assert rep.error is None, rep.error
    tokens = rep.ints("num_output_tokens")
    assert sum(tokens) == N
    after = read(wait_for(dsv4_server, lambda t: read(t)[2] >= before[2] + N))
    assert [a - b for a, b in zip(after, before)] == [1, 1, N]


def test_stop_string_finish_reason_and_counts(dsv4_server, direct):
    """finish_reason "stop" (not just "length") is reported, with the counts of the shortened output."""
    prompt = PROMPTS[1]
    full = direct(prompt, **greedy(N)).text
    stop = next((full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].strip()), None)
    assert stop is not None, f"no usable stop string in {full!r}"
    sampling = greedy(N, stop=[stop])
    ref = direct(prompt, **sampling)
    assert ref.finish_reason == "stop" and ref.num_output_tokens < N, ref
    rep = infer(dsv4_server.grpc_url, request(prompt, sampling=sampling))
    assert rep.error is None, rep.error
    assert rep.text == ref.text and stop not in rep.text
    assert rep.strs("finish_reason")[-1] == "stop"
    assert sum(rep.ints("num_output_tokens")) == ref.num_output_tokens


def test_extras_only_when_asked(dsv4_server, direct):
    rep = infer(dsv4_server.grpc_url, request(PROMPTS[0], sampling=greedy(N), returns=False))
    assert rep.error is None, rep.error
    assert rep.text == direct(PROMPTS[0], **greedy(N)).text
    assert all(set(r) == {"text_output"} for r in rep.responses), [sorted(r) for r in rep.responses]
    # each flag alone adds exactly its own output
    for flag, out in (("return_finish_reason", "finish_reason"), ("return_num_input_tokens", "num_input_tokens"),
                      ("return_num_output_tokens", "num_output_tokens")):
        inputs = request(PROMPTS[0], sampling=greedy(4), returns=False) + [tensor(flag, [True], "BOOL")]
        rep = infer(dsv4_server.grpc_url, inputs)
        assert rep.error is None, rep.error
        assert all(set(r) == {"text_output", out} for r in rep.responses), (flag, [sorted(r) for r in rep.responses])


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_non_streaming_one_response_equal_to_streamed(dsv4_server, direct, prompt):
    streamed = infer(dsv4_server.grpc_url, request(prompt, sampling=greedy(N)))
    whole = infer(dsv4_server.grpc_url, request(prompt, stream=False, sampling=greedy(N), exclude=True))
    assert streamed.error is None and whole.error is None, (streamed.error, whole.error)
    assert len(whole.responses) == 1 and whole.finals == [True], whole.finals  # exactly one response, final
    ref = direct(prompt, **greedy(N))
    assert whole.text == streamed.text == ref.text
    assert whole.strs("finish_reason") == ["length"]
    assert whole.ints("num_output_tokens") == [N]
    assert whole.ints("num_input_tokens") == [ref.num_prompt_tokens]
    # without exclude_input_in_output, stream=false puts the prompt in front (the vLLM backend's default)
    prepended = infer(dsv4_server.grpc_url, request(prompt, stream=False, sampling=greedy(N)))
    assert prepended.error is None and len(prepended.responses) == 1, prepended.error
    assert prepended.text == prompt + ref.text


def test_input_ids_request_returns_output_ids(dsv4_server, engine):
    from dsv4.engine.params import SamplingParams

    ids = [0, 5, 9, 12, 100]
    ref = engine.generate(prompt_token_ids=ids, params=SamplingParams.from_dict(greedy(6)))
    sp = tensor("sampling_parameters", [json.dumps(greedy(6)).encode()], "BYTES")
    rep = infer(dsv4_server.grpc_url, [tensor("input_ids", ids, "INT32"), sp, tensor("stream", [False], "BOOL")])
    assert rep.error is None, rep.error
    assert len(rep.responses) == 1
    out = rep.responses[0]["output_ids"]
    assert out.dtype == np.int32 and out.shape == (6,)
    assert out.tolist() == ref.token_ids
    assert rep.text == ref.text


def _http_body(prompt, stream, n):
    return {"text_input": prompt, "stream": stream, "sampling_parameters": json.dumps(greedy(n)),
            "exclude_input_in_output": True,
            "return_finish_reason": True, "return_num_output_tokens": True, "return_num_input_tokens": True}


def test_http_generate_and_generate_stream_agree(dsv4_server, direct):
    prompt = PROMPTS[2]
    ref = direct(prompt, **greedy(N))
    status, body = http_post(dsv4_server.http_url, f"/v2/models/{MODEL}/generate", _http_body(prompt, False, N))
    assert status == 200, body
    doc = json.loads(body)
    assert doc["model_name"] == MODEL
    assert doc["text_output"] == ref.text
    assert doc["finish_reason"] == "length"
    assert doc["num_output_tokens"] == N and doc["num_input_tokens"] == ref.num_prompt_tokens

    status, body = http_post(dsv4_server.http_url, f"/v2/models/{MODEL}/generate_stream", _http_body(prompt, True, N))
    assert status == 200, body
    events = sse_events(body)
    assert len(events) >= 2, body  # one SSE event per streamed response
    assert not any("error" in e for e in events), events
    assert "".join(e["text_output"] for e in events) == ref.text
    assert events[-1]["finish_reason"] == "length"
    assert sum(e["num_output_tokens"] for e in events) == N


def test_http_generate_sampling_from_request_parameters(dsv4_server, direct):
    """No sampling_parameters input: the sampling keys come as Triton request parameters (vLLM-backend fallback),
    which is how plain HTTP generate clients send them."""
    prompt = PROMPTS[0]
    body = {"text_input": prompt, "stream": False, "parameters": greedy(N), "return_num_output_tokens": True}
    status, text = http_post(dsv4_server.http_url, f"/v2/models/{MODEL}/generate", body)
    assert status == 200, text
    doc = json.loads(text)
    assert doc["text_output"] == prompt + direct(prompt, **greedy(N)).text  # stream=false: prompt prepended
    assert doc["num_output_tokens"] == N
