"""Reading a step's sampled tokens waits for that step only (dsv4.engine.readback), not for GPU work enqueued
after it: what lets the host turn step N's tokens into text while the GPU runs step N+1."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from dsv4.engine.readback import TokenReadback  # noqa: E402


def test_read_returns_the_values_before_later_work_finishes():
    rb = TokenReadback(torch.device("cuda"), capacity=64)
    tokens = torch.randint(0, 1000, (32,), device="cuda")
    logprobs = torch.randn(32, device="cuda")
    pending = rb.start(tokens, logprobs)
    torch.cuda._sleep(2_000_000_000)            # ~1 s of GPU work enqueued behind the step (at ~2 GHz)
    t = time.perf_counter()
    got_t, got_lp = pending.read()
    waited = time.perf_counter() - t
    assert got_t == tokens.tolist() and got_lp == logprobs.tolist()   # (.tolist() here waits for the sleep)
    assert waited < 0.2, f"read waited {waited:.3f} s: it waited for work enqueued after the step"


def test_two_steps_in_flight_keep_their_own_values():
    rb = TokenReadback(torch.device("cuda"), capacity=8)
    a = rb.start(torch.arange(8, device="cuda"), torch.zeros(8, device="cuda"))
    b = rb.start(torch.arange(8, 16, device="cuda"), torch.ones(8, device="cuda"))
    assert b.read() == (list(range(8, 16)), [1.0] * 8)
    assert a.read() == (list(range(8)), [0.0] * 8)
    c = rb.start(torch.arange(100, 120, device="cuda"), torch.ones(20, device="cuda"))   # over capacity
    assert c.read()[0] == list(range(100, 120))
