"""Acceptance: a client cancels mid-stream (gRPC stop_stream(cancel_requests=True)); the server aborts the request,
its KV-blocks-in-use metric (metrics endpoint) returns to zero, and the server keeps serving.

Each test waits until the metric shows the long request's blocks in use before cancelling, so "returns to zero" is
observed, not assumed; and checks that generation really stopped (generated-token counter frozen, far below
max_tokens), so a request that merely ran to completion cannot pass.
"""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("tritonclient.grpc")

from _triton import (MODEL, greedy, infer, kv_blocks_in_use, metric, request, requests_total,  # noqa: E402
                     wait_for)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LONG = 3000  # max_tokens of the requests that get cancelled: tens of seconds of decoding on this CPU


def _gen_tokens(text):
    return metric(text, "dsv4_generation_tokens_total", model=MODEL) or 0.0


def _blocks_in_use_when(server, min_responses):
    """cancel_when predicate: at least ``min_responses`` responses arrived and the metric shows blocks in use."""
    seen = {}

    def pred(rep):
        if len(rep.responses) < min_responses:
            return False
        v = kv_blocks_in_use(server.metrics())
        if v:
            seen["blocks"] = v
        return bool(v)

    return pred, seen


def _assert_aborted_and_freed(server, before, n_cancelled):
    m = wait_for(server, lambda t: kv_blocks_in_use(t) == 0
                 and requests_total(t, "cancelled") >= requests_total(before, "cancelled") + n_cancelled)
    assert metric(m, "dsv4_num_requests_running") == 0 and metric(m, "dsv4_num_requests_waiting") == 0
    g1 = _gen_tokens(m)
    time.sleep(0.6)
    g2 = _gen_tokens(server.metrics())
    assert g2 == g1, f"tokens still being generated after the cancel ({g1} -> {g2})"
    assert g2 - _gen_tokens(before) < n_cancelled * LONG / 2, "the cancelled request(s) ran (nearly) to the end"
    assert server.alive(), server.log_tail()


def _serves_normally(server, direct):
    rep = infer(server.grpc_url, request("Hello world", sampling=greedy(8)))
    assert rep.error is None, rep.error
    assert rep.text == direct("Hello world", **greedy(8)).text
    assert rep.strs("finish_reason")[-1] == "length"


def test_cancel_mid_stream_frees_kv_blocks_and_keeps_serving(dsv4_server, direct):
    before = dsv4_server.metrics()
    pred, seen = _blocks_in_use_when(dsv4_server, 3)
    rep = infer(dsv4_server.grpc_url, request("Tell me a long story", sampling=greedy(LONG)), cancel_when=pred)
    assert rep.error is None, rep.error
    assert len(rep.responses) >= 3 and not any(rep.finals), "the request finished before it was cancelled"
    assert seen["blocks"] > 0
    _assert_aborted_and_freed(dsv4_server, before, 1)
    _serves_normally(dsv4_server, direct)


def test_cancel_non_streaming_request(dsv4_server, direct):
    """stream=false sends nothing until the end: cancel while it decodes (blocks in use), before any response."""
    before = dsv4_server.metrics()
    pred, seen = _blocks_in_use_when(dsv4_server, 0)
    rep = infer(dsv4_server.grpc_url, request("Tell me a long story", stream=False, sampling=greedy(LONG)),
                cancel_when=pred)
    assert rep.error is None and not rep.responses, (rep.error, len(rep.responses))
    assert seen["blocks"] > 0
    _assert_aborted_and_freed(dsv4_server, before, 1)
    _serves_normally(dsv4_server, direct)


def test_cancel_some_streams_while_others_complete(dsv4_server, direct):
    """Two long streams are cancelled while two normal streams run beside them; the normal ones are unaffected."""
    before = dsv4_server.metrics()
    results = {}

    def long_one(i):
        pred, _ = _blocks_in_use_when(dsv4_server, 5)
        results[f"long{i}"] = infer(dsv4_server.grpc_url, request(f"story {i}", sampling=greedy(LONG)),
                                    cancel_when=pred)

    def normal_one(prompt):
        results[prompt] = infer(dsv4_server.grpc_url, request(prompt, sampling=greedy(24)))

    threads = [threading.Thread(target=long_one, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=normal_one, args=(p,)) for p in ("Hello world", "The quick brown fox")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(2):
        rep = results[f"long{i}"]
        assert rep.error is None and rep.responses and not any(rep.finals), (rep.error, rep.finals[-3:])
    for prompt in ("Hello world", "The quick brown fox"):
        rep = results[prompt]
        assert rep.error is None, rep.error
        assert rep.text == direct(prompt, **greedy(24)).text
        assert sum(rep.ints("num_output_tokens")) == 24
    _assert_aborted_and_freed(dsv4_server, before, 2)
    _serves_normally(dsv4_server, direct)
