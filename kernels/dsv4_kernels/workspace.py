"""Scratch buffers the kernels share across calls (split-K partials, attention split partials, indexer keys).

A buffer only grows. A replaced buffer is kept alive, never freed: a CUDA graph captured earlier holds its address
and keeps writing there on replay, so handing that memory back to the allocator would let the graph scribble over
whatever tensor got it next. Sharing one buffer between graph replays and eager calls is fine: both run in order on
the same stream.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device, min_numel: int = 1,
              growth: float = 2.0) -> torch.Tensor:
    """A [numel] view of the scratch buffer `name`: contents undefined, valid until the next call that grows it.
    Growing multiplies the size by at least `growth`, which bounds the retired bytes by the live ones."""
    key = (name, dtype, torch.device(device))
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        size = max(numel, min_numel)
        if buf is not None:
            _RETIRED.append(buf)
            size = max(size, int(buf.numel() * growth))
        buf = torch.empty(size, dtype=dtype, device=device)
        _BUFFERS[key] = buf
    return buf[:numel]
