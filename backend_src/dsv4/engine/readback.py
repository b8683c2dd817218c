"""Reading a launched step's sampled tokens on the host without waiting for the step launched after it.

The engine launches decode step N+1 before it reads step N's tokens (async scheduling). `tensor.tolist()` on the
device tensor would copy on the stream *behind* step N+1 and so wait for N+1 as well: the host then turns N's tokens
into text while the GPU sits idle, and the two never overlap (H100, `small`, batch 32: 3.84 ms per step against a
1.72 ms graph replay, docs/PERF.md session 20). Here the copy into pinned host memory is enqueued right behind step
N's sampling, with an event; reading waits for that event only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PendingReadback:
    tokens: torch.Tensor                   # host (pinned) or, off CUDA, the sampler's own tensors
    logprobs: torch.Tensor
    event: torch.cuda.Event | None

    def read(self) -> tuple[list[int], list[float]]:
        """The tokens and logprobs as lists; on CUDA this waits for the step that sampled them, not for later work."""
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist(), self.logprobs.tolist()


class TokenReadback:
    """Two pinned buffers used in turn: a step's buffer is read (drained) before the step two later reuses it."""

    def __init__(self, device: torch.device, capacity: int):
        self.cuda = device.type == "cuda"
        self.capacity = capacity
        self._bufs = []
        if self.cuda:
            self._bufs = [(torch.empty(capacity, dtype=torch.long, pin_memory=True),
                           torch.empty(capacity, dtype=torch.float32, pin_memory=True)) for _ in range(2)]
        self._next = 0

    def start(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> PendingReadback:
        """Enqueue the copy of a step's sampled tokens [n] (long) and logprobs [n] (float32) on the current stream."""
        if not self.cuda or not tokens.is_cuda:
            return PendingReadback(tokens, logprobs, None)
        n = tokens.shape[0]
        if n > self.capacity:      # more rows than any step should sample: an unpooled pinned copy
            t = torch.empty(n, dtype=torch.long, pin_memory=True)
            lp = torch.empty(n, dtype=torch.float32, pin_memory=True)
        else:
            t, lp = self._bufs[self._next]
            self._next ^= 1
            t, lp = t[:n], lp[:n]
        t.copy_(tokens, non_blocking=True)
        lp.copy_(logprobs, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingReadback(t, lp, event)
