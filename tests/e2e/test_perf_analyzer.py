"""Acceptance: a `perf_analyzer --streaming -i grpc` run at concurrency 8 completes with zero errors.

Driven through client/loadtest.py (the project's load-test script: input data, perf_analyzer from .triton/, CSVs,
summary, plot), kept short: 32 requests of 8 greedy tokens (`--request-count`, no stability windows).
"""
from __future__ import annotations

import csv
import json
import math

import pytest

pytest.importorskip("tritonclient.grpc")

from _triton import kv_blocks_in_use, requests_total, wait_for  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CONC, REQUESTS, TOKENS = 8, 32, 8
BAD_OUTCOMES = ("error", "rejected", "abort", "cancelled")


def _sweep(url, out, *extra):
    from client import loadtest

    return loadtest.main(["--url", url, "--concurrency", f"{CONC}:{CONC}:1", "--max-tokens", str(TOKENS),
                          "--prompt", "Hello world", "--prompt", "The quick brown fox", "--out", str(out),
                          "--timeout", "120", *extra, "--", "--request-count", str(REQUESTS)])


def test_perf_analyzer_streaming_concurrency_8_zero_errors(dsv4_server, tmp_path):
    before = dsv4_server.metrics()
    assert _sweep(dsv4_server.grpc_url, tmp_path) == 0  # loadtest raises SystemExit when perf_analyzer fails

    log = (tmp_path / f"perf_c{CONC}.log").read_text()
    assert "error" not in log.lower(), log[-3000:]
    assert f"Request concurrency: {CONC}" in log, log[-3000:]

    with open(tmp_path / f"perf_c{CONC}.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    assert int(row["Concurrency"]) == CONC
    rps, resp_rps = float(row["Inferences/Second"]), float(row["Response Throughput"])
    assert rps > 0, row
    assert resp_rps / rps == pytest.approx(TOKENS, rel=0.05), row  # one streamed response per token

    # every request perf_analyzer sent got all its tokens, streamed: one response per token, except that deltas
    # which queue up while the server is busy (this 2-core CI machine runs server, engine and client) go out merged
    exp = json.loads((tmp_path / f"profile_c{CONC}.json").read_text())["experiments"][-1]
    assert exp["experiment"] == {"mode": "concurrency", "value": CONC}
    reqs = exp["requests"]
    assert len(reqs) >= REQUESTS
    responses = [len(r["response_timestamps"]) for r in reqs]
    assert sum(responses) >= 0.95 * TOKENS * len(reqs), responses
    for r in reqs:  # what perf_analyzer received: all the tokens, the last response final with "length"
        outs = r["response_outputs"]
        assert [o["finish_reason"] for o in outs] == ["None"] * (len(outs) - 1) + ["length"], outs
        assert sum(o["num_output_tokens"] for o in outs) == TOKENS, outs

    with open(tmp_path / "summary.csv", newline="") as f:
        (summary,) = list(csv.DictReader(f))
    assert int(summary["concurrency"]) == CONC
    for key in ("requests_per_s", "latency_ms_avg", "latency_ms_p50", "latency_ms_p99", "ttft_ms_avg",
                "itl_ms_avg", "responses_per_s"):
        v = float(summary[key])
        assert math.isfinite(v) and v > 0, (key, summary)
    assert (tmp_path / "loadtest.png").stat().st_size > 1000

    # the server saw the same: all finished by length, none failed, nothing left in the cache
    after = wait_for(dsv4_server, lambda t: kv_blocks_in_use(t) == 0)
    assert requests_total(after, "length") - requests_total(before, "length") >= len(reqs)
    for outcome in BAD_OUTCOMES:
        assert requests_total(after, outcome) == requests_total(before, outcome), outcome
    assert dsv4_server.alive(), dsv4_server.log_tail()


def test_loadtest_fails_loudly_on_request_errors(dsv4_server, tmp_path):
    """The zero-errors check above is not vacuous: requests that fail make perf_analyzer (and loadtest) fail,
    with the server's message."""
    with pytest.raises(SystemExit) as ei:
        _sweep(dsv4_server.grpc_url, tmp_path, "--temperature", "-1")
    assert "temperature" in str(ei.value)
    assert "had error" in (tmp_path / f"perf_c{CONC}.log").read_text()
    assert dsv4_server.alive()
