"""Acceptance: every kind of bad request gets a per-request error that names the problem; afterwards the model is
still READY, a normal request succeeds and no KV block is left in use.

All cases are sent once (module fixture ``bad_replies``, over gRPC streaming, each on its own stream); one test per
case checks its reply, so a regression names the case. The cases are checked against the message text: each needle
(the offending input / parameter, and what is wrong with it) must appear in the error message.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("tritonclient.grpc")

from _triton import (MODEL, greedy, http_get_status, http_post, infer, kv_blocks_in_use, metric,  # noqa: E402
                     request, requests_total, tensor, wait_for)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

OK = greedy(4)


def _sp(**kw):
    """A valid greedy request whose sampling_parameters are changed by ``kw``."""
    return request("Hello", sampling={**OK, **kw})


def _over_context():
    # the tiny tokenizer's byte-level BPE: 5000 distinct-ish words give well over max_model_len (4096) tokens
    return request(" ".join(f"w{i}q" for i in range(5000)), sampling=OK)


# name -> (inputs factory, needles that must all appear in the error message)
CASES = {
    "missing_text_input": (lambda: request(None, sampling=OK), ["'text_input'", "'input_ids'"]),
    "empty_prompt": (lambda: request("", sampling=OK), ["prompt", "empty"]),
    "non_utf8_text_input": (lambda: request(b"\xff\xfeabc", sampling=OK), ["'text_input'", "UTF-8"]),
    "malformed_json": (lambda: request("Hello", sampling='{"max_tokens": 4,'), ["'sampling_parameters'", "JSON"]),
    "sampling_not_object": (lambda: request("Hello", sampling="[1, 2]"), ["'sampling_parameters'", "object"]),
    "sampling_non_utf8": (lambda: request("Hello", sampling=b'{"max_tokens": "\xff"}'),
                          ["'sampling_parameters'", "UTF-8"]),
    "temperature_string": (lambda: _sp(temperature="hot"), ["'temperature'", "number", "hot"]),
    "temperature_nan": (lambda: request("Hello", sampling='{"max_tokens": 4, "temperature": NaN}'),
                        ["'temperature'", "finite"]),
    "max_tokens_float": (lambda: _sp(max_tokens=1.5), ["'max_tokens'", "integer", "1.5"]),
    "stream_wrong_dtype": (lambda: [tensor("text_input", [b"Hello"], "BYTES"), tensor("stream", [1], "INT32")],
                           ["'stream'", "INT32", "BOOL"]),
    "temperature_negative": (lambda: _sp(temperature=-1), ["'temperature'", ">= 0"]),
    "top_p_zero": (lambda: _sp(top_p=0), ["'top_p'", "(0, 1]"]),
    "top_p_above_one": (lambda: _sp(top_p=1.5), ["'top_p'", "(0, 1]", "1.5"]),
    "top_k_negative": (lambda: _sp(top_k=-5), ["'top_k'", "-5"]),
    "min_tokens_above_max": (lambda: _sp(min_tokens=10), ["'min_tokens'", "max_tokens"]),
    "prompt_over_context": (_over_context, ["prompt length", "max_model_len"]),
    "absurd_max_tokens": (lambda: _sp(max_tokens=10**9), ["'max_tokens'", "1000000000", "max_model_len"]),
    "max_tokens_zero": (lambda: _sp(max_tokens=0), ["'max_tokens'", ">= 1"]),
    "unknown_sampling_key": (lambda: _sp(temprature=0.5), ["'temprature'", "unknown"]),
    "text_input_two_elements": (lambda: [tensor("text_input", [b"a", b"b"], "BYTES")], ["'text_input'", "shape"]),
    "unknown_input_tensor": (lambda: request("Hello", sampling=OK) + [tensor("prompt", [b"x"], "BYTES")],
                             ["'prompt'", "unexpected"]),
    "both_text_and_ids": (lambda: request("Hello", sampling=OK) + [tensor("input_ids", [1, 2], "INT32")],
                          ["'text_input'", "'input_ids'", "not both"]),
    "input_ids_out_of_vocab": (lambda: [tensor("input_ids", [0, 5, 600], "INT32"),
                                        tensor("sampling_parameters", [json.dumps(OK).encode()], "BYTES")],
                               ["'input_ids'", "600"]),
    "input_ids_empty": (lambda: [tensor("input_ids", [], "INT32"),
                                 tensor("sampling_parameters", [json.dumps(OK).encode()], "BYTES")],
                        ["prompt", "at least 1 token"]),
    "input_ids_wrong_dtype": (lambda: [tensor("input_ids", [0, 5], "INT64")], ["'input_ids'", "INT64"]),
    "stop_wrong_type": (lambda: _sp(stop=5), ["'stop'", "string"]),
    "stop_empty_string": (lambda: _sp(stop=[""]), ["'stop'", "non-empty"]),
    "seed_not_int": (lambda: _sp(seed="abc"), ["'seed'", "integer", "abc"]),
    "seed_float": (lambda: _sp(seed=1.5), ["'seed'", "integer", "1.5"]),
    "seed_out_of_range": (lambda: _sp(seed=2**70), ["'seed'", "must be in"]),
    "ignore_eos_not_bool": (lambda: _sp(ignore_eos="yes"), ["'ignore_eos'", "boolean"]),
    "n_2": (lambda: _sp(n=2), ["'n'", "n=1"]),
    "logprobs_5": (lambda: _sp(logprobs=5), ["'logprobs'", "5"]),
    "presence_penalty": (lambda: _sp(presence_penalty=0.5), ["'presence_penalty'", "not supported"]),
}

# rejected by Triton core (config.pbtxt dtypes/shapes/names) before model.py sees them
CORE_REJECTED = {"stream_wrong_dtype", "text_input_two_elements", "unknown_input_tensor", "input_ids_wrong_dtype"}


@pytest.fixture(scope="module")
def bad_replies(dsv4_server):
    before = requests_total(dsv4_server.metrics(), "rejected")
    replies = {}
    for name, (make, _) in CASES.items():
        replies[name] = infer(dsv4_server.grpc_url, make(), timeout=30)
        assert dsv4_server.alive(), f"server died on bad request {name!r}:\n{dsv4_server.log_tail()}"
    return replies, before


def test_at_least_15_kinds():
    assert len(CASES) >= 15


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_error_names_the_problem(bad_replies, name):
    rep = bad_replies[0][name]
    assert rep.error is not None, f"{name}: no error; responses {rep.responses}"
    assert not rep.responses, f"{name}: error plus outputs {rep.responses}"
    msg = str(rep.error)
    missing = [n for n in CASES[name][1] if n not in msg]
    assert not missing, f"{name}: message lacks {missing}: {msg!r}"


def test_http_bad_request_is_400_with_message(dsv4_server):
    body = {"text_input": "Hello", "stream": False, "sampling_parameters": json.dumps({**OK, "top_p": 1.5})}
    status, text = http_post(dsv4_server.http_url, f"/v2/models/{MODEL}/generate", body)
    assert status == 400, (status, text)
    assert "top_p" in json.loads(text)["error"], text


def test_still_ready_and_serving_after_bad_requests(dsv4_server, bad_replies, direct):
    replies, rejected_before = bad_replies
    assert dsv4_server.alive(), dsv4_server.log_tail()
    assert http_get_status(dsv4_server.http_url, f"/v2/models/{MODEL}/ready") == 200
    assert http_get_status(dsv4_server.http_url, "/v2/health/ready") == 200
    rep = infer(dsv4_server.grpc_url, request("Hello world", sampling=greedy(8)))
    assert rep.error is None, rep.error
    assert rep.text == direct("Hello world", **greedy(8)).text
    assert sum(rep.ints("num_output_tokens")) == 8
    # nothing left behind in the engine, and the adapter counted each of its rejections
    m = wait_for(dsv4_server, lambda t: kv_blocks_in_use(t) == 0 and metric(t, "dsv4_num_requests_waiting") == 0
                 and metric(t, "dsv4_num_requests_running") == 0)
    assert requests_total(m, "rejected") - rejected_before >= len(set(CASES) - CORE_REJECTED)
