"""Scratch buffers the kernels share across calls (split-K partials, attention split partials, indexer keys).

A buffer only grows. A replaced buffer is kept alive, never freed: a CUDA graph captured earlier holds its address
and keeps writing there on replay, so handing that memory back to the allocator would let the graph scribble over
whatever tensor got it next. Each CUDA stream has its own buffers: kernels on one stream run in order, so they may
share scratch space, while kernels on two streams (the side stream of `CuteOps.concurrently`) may run at the same
time and must not. A graph's kernels use the buffers of the stream they were captured on, whichever stream replays it.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device, min_numel: int = 1,
              growth: float = 2.0) -> torch.Tensor:
    """A [numel] view of the scratch buffer `name`: contents undefined, valid until the next call that grows it.
    Growing multiplies the size by at least `growth`, which bounds the retired bytes by the live ones."""
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (name, dtype, device, stream)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        size = max(numel, min_numel)
        if buf is not None:
            _RETIRED.append(buf)
            size = max(size, int(buf.numel() * growth))
        buf = torch.empty(size, dtype=dtype, device=device)
        _BUFFERS[key] = buf
    return buf[:numel]
