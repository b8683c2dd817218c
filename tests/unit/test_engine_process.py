"""The engine in its own process (dsv4.engine.process.EngineProcess) behaves as the in-process Engine: same tokens,
same synchronous refusals, aborts that free the cache, and a death that fails the requests in flight instead of
hanging them."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from dsv4.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.params import SamplingParams
from dsv4.engine.process import EngineProcess
from dsv4.errors import ConfigError, EngineDeadError, InvalidRequestError

from engine_runs import run_concurrently

SETTINGS = dict(device="cpu", dtype="float32", ops_backend="torch", max_num_seqs=4)
PROMPTS = [[1, 5, 9, 13, 17], [1, 42], [1, 7, 7, 7, 7, 7, 7, 7, 7], [1, 100, 3]]


@pytest.fixture(scope="module")
def remote(tiny_checkpoint):
    ep = EngineProcess(EngineConfig(checkpoint=str(tiny_checkpoint), **SETTINGS))
    yield ep
    ep.shutdown()
    assert ep._proc.returncode == 0, f"engine process exit code {ep._proc.returncode}"


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    eng = Engine(EngineConfig(checkpoint=str(tiny_checkpoint), **SETTINGS))
    yield eng
    eng.shutdown()


def _collect(stream) -> tuple[list[int], str, list]:
    ids, text, outs = [], [], []
    for out in stream:
        ids += out.token_ids
        text.append(out.text)
        outs.append(out)
    return ids, "".join(text), outs


def test_concurrent_greedy_requests_give_the_in_process_engines_tokens(remote, local):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert run_concurrently(remote, PROMPTS, params) == run_concurrently(local, PROMPTS, params)


def test_a_text_prompt_is_tokenised_as_the_engine_does(remote, local):
    params = SamplingParams(temperature=0.0, max_tokens=8)
    a = _collect(remote.add_request("text-remote", prompt="k19=847;k19?", params=params))
    b = _collect(local.add_request("text-local", prompt="k19=847;k19?", params=params))
    assert a[:2] == b[:2]
    assert a[2][-1].num_prompt_tokens == b[2][-1].num_prompt_tokens


def test_deltas_reach_the_callback_with_one_final_delta(remote):
    got, done = [], threading.Event()

    def on_output(out):
        got.append(out)
        if out.finished:
            done.set()

    remote.add_request("cb", prompt_token_ids=[1, 2, 3], params=SamplingParams(temperature=0.0, max_tokens=5,
                                                                                ignore_eos=True), on_output=on_output)
    assert done.wait(60)
    assert [o.finished for o in got].count(True) == 1 and got[-1].finished
    assert sum(len(o.token_ids) for o in got) == 5 and got[-1].finish_reason == "length"


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt_token_ids=[1, 10 ** 9]), "outside"),
    (dict(prompt_token_ids=[1, 2], params=SamplingParams(max_tokens=10 ** 6)), "max_tokens"),
    (dict(prompt="a", prompt_token_ids=[1]), "exactly one"),
])
def test_a_bad_request_is_refused_synchronously_and_the_engine_keeps_serving(remote, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        remote.add_request("bad", **kwargs)
    ids, _, _ = _collect(remote.add_request("after-bad", prompt_token_ids=[1, 4],
                                            params=SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)))
    assert len(ids) == 3


def test_a_request_id_in_use_is_refused(remote):
    stream = remote.add_request("dup", prompt_token_ids=[1, 4], params=SamplingParams(max_tokens=200,
                                                                                      ignore_eos=True))
    with pytest.raises(InvalidRequestError, match="already in use"):
        remote.add_request("dup", prompt_token_ids=[1, 4])
    remote.abort("dup")
    assert _collect(stream)[2][-1].finish_reason == "abort"


def test_abort_ends_the_request_and_frees_its_cache_blocks(remote):
    stream = remote.add_request("long", prompt_token_ids=[1, 2, 3],
                                params=SamplingParams(max_tokens=400, ignore_eos=True))
    first = stream.get(timeout=60)
    assert not first.finished
    remote.abort("long")
    _, _, outs = _collect(stream)
    assert outs[-1].finish_reason == "abort"
    deadline = time.monotonic() + 10
    while remote.stats().kv_blocks_in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remote.stats().kv_blocks_in_use == 0


def test_stats_are_the_engines_and_current(remote):
    before = remote.stats().steps
    _collect(remote.add_request("count", prompt_token_ids=[1, 3],
                                params=SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)))
    after = remote.stats()
    assert after.steps >= before + 4
    assert after.num_running == 0 and after.num_waiting == 0 and after.kv_blocks_total > 0


def test_a_config_the_engine_refuses_is_raised_with_its_message(tiny_checkpoint):
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        EngineProcess(EngineConfig(checkpoint=str(tiny_checkpoint), **dict(SETTINGS, max_model_len=10 ** 7)))


def test_a_bad_switch_interval_for_the_engine_process_is_refused_with_its_name(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("DSV4_ENGINE_SWITCH_INTERVAL_MS", "fast")
    with pytest.raises(ConfigError, match="DSV4_ENGINE_SWITCH_INTERVAL_MS"):
        EngineProcess(EngineConfig(checkpoint=str(tiny_checkpoint), **SETTINGS))


def test_when_the_engine_process_dies_requests_in_flight_fail_and_new_ones_are_refused(tiny_checkpoint):
    ep = EngineProcess(EngineConfig(checkpoint=str(tiny_checkpoint), **SETTINGS))
    try:
        stream = ep.add_request("doomed", prompt_token_ids=[1, 2],
                                params=SamplingParams(max_tokens=3000, ignore_eos=True))
        assert not stream.get(timeout=60).finished
        os.kill(ep.pid, signal.SIGKILL)
        _, _, outs = _collect(stream)
        assert outs[-1].finish_reason == "error" and "exited unexpectedly" in outs[-1].error
        assert str(-signal.SIGKILL) in outs[-1].error
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            ep.add_request("late", prompt_token_ids=[1, 2])
    finally:
        ep.shutdown()


def test_shutdown_ends_requests_in_flight_with_abort(tiny_checkpoint):
    ep = EngineProcess(EngineConfig(checkpoint=str(tiny_checkpoint), **SETTINGS))
    stream = ep.add_request("pending", prompt_token_ids=[1, 2], params=SamplingParams(max_tokens=3000,
                                                                                      ignore_eos=True))
    assert not stream.get(timeout=60).finished
    ep.shutdown()
    _, _, outs = _collect(stream)
    assert outs[-1].finish_reason == "abort"
    assert ep._proc.returncode == 0
    with pytest.raises(EngineDeadError, match="shut down"):
        ep.add_request("late", prompt_token_ids=[1, 2])
