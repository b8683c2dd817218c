"""Off CUDA the token readback hands the sampler's tensors through unchanged (dsv4.engine.readback)."""

from __future__ import annotations

import torch

from dsv4.engine.readback import TokenReadback


def test_cpu_tokens_are_read_as_they_are():
    rb = TokenReadback(torch.device("cpu"), capacity=4)
    pending = rb.start(torch.tensor([5, 7, 9]), torch.tensor([-0.5, -1.0, -2.0]))
    assert pending.event is None
    assert pending.read() == ([5, 7, 9], [-0.5, -1.0, -2.0])
