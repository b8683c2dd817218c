"""CUDA graphs of the decode step, one per batch-size bucket (vLLM's scheme).

A decode step launches a few hundred small kernels per layer; launched one by one from Python the GPU waits on the
host. Captured once per bucket size and replayed, a step costs two small host-to-device copies and one launch.

The graph ends with the greedy head (argmax and raw logprob of every row, `sampler.greedy_head`), so a step whose
rows are all greedy samples inside the replay; others sample from the logits.

What makes a decode step capturable: its inputs live in static device buffers (`DecodeInputs` copied in), the ops
read only device tables (`ForwardBatch.decode`), no op synchronises with the host (RoPE tables are reserved up to
max_model_len, the compressor runs branch-free), and every launch plan is sized for the bound max_model_len rather
than the step's real lengths (attention splits past a sequence's rows exit at once). Batches between two bucket
sizes are padded by repeating row 0; larger batches and steps with prefill tokens run eagerly.

Scratch buffers the kernels share are never freed once a graph may hold their address (dsv4_kernels.workspace).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from dsv4.engine.decode_inputs import TOKEN, DecodeInputs, PendingTokens, decode_batch, upload
from dsv4.engine.sampler import SamplerOutput, greedy_head
from dsv4.errors import ConfigError
from dsv4.model.deepseek_v4 import DeepseekV4Model
from dsv4.ops.base import LayerCache

log = logging.getLogger("dsv4.engine")


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (and max_batch itself)."""
    if max_batch < 1:
        raise ConfigError(f"engine setting 'cuda_graph_max_batch' must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def smallest_prepared(sizes: list[int], prepared, n: int) -> int | None:
    """The smallest of the sorted `sizes` that is >= n, if it was prepared (else None: the step runs eagerly)."""
    for s in sizes:
        if s >= n:
            return s if s in prepared else None
    return None


@dataclass
class _Graph:
    size: int
    graph: torch.cuda.CUDAGraph
    i64: torch.Tensor          # static inputs, [4, size]
    i32: torch.Tensor          # [2, size, W]
    logits: torch.Tensor       # static output, [size, vocab] fp32
    greedy: SamplerOutput      # static output: greedy_head(logits)


class DecodeGraphs:
    def __init__(self, model: DeepseekV4Model, layers: list[LayerCache], device: torch.device, sizes: list[int],
                 max_model_len: int, block_size: int):
        if device.type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA device")
        self.model, self.layers, self.device = model, layers, device
        self.sizes = sorted(sizes)
        self.width = -(-max_model_len // block_size)
        self.max_position = max_model_len - 1
        self._graphs: dict[int, _Graph] = {}
        self.capture_seconds = 0.0

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, n: int) -> int | None:
        """The smallest captured size that holds n sequences (None: run eagerly)."""
        return smallest_prepared(self.sizes, self._graphs, n)

    def _forward(self, i64: torch.Tensor, i32: torch.Tensor) -> torch.Tensor:
        size = i64.shape[1]
        idx = torch.arange(size, device=self.device)
        return self.model.forward(decode_batch(i64, i32, self.max_position, idx), self.layers)

    def capture(self) -> None:
        """Warm up every size eagerly (compiles kernels, sizes the shared scratch buffers), then capture from the
        largest down into one memory pool, then check each graph's replay against its eager warm-up."""
        t0 = time.monotonic()
        eager: dict[int, torch.Tensor] = {}
        statics: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for size in reversed(self.sizes):
            dummy = DecodeInputs.dummy(size, self.width)
            i64 = torch.from_numpy(dummy.i64).to(self.device)
            i32 = torch.from_numpy(dummy.i32).to(self.device)
            statics[size] = (i64, i32)
            eager[size] = self._forward(i64, i32).clone()
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            i64, i32 = statics[size]
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                logits = self._forward(i64, i32)
                greedy = greedy_head(logits)
            self._graphs[size] = _Graph(size, g, i64, i32, logits, greedy)
        for size, g in self._graphs.items():
            g.graph.replay()
            torch.cuda.synchronize(self.device)
            ref = eager[size]
            if not torch.isfinite(g.logits).all() or not torch.allclose(g.logits, ref, rtol=1e-3, atol=1e-3):
                err = (g.logits - ref).abs().max().item()
                self._graphs.clear()
                raise RuntimeError(f"CUDA graph of decode batch {size} replays differently from the eager step "
                                   f"(max |diff| {err:.3g}): graphs disabled")
        self.capture_seconds = time.monotonic() - t0
        log.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s", len(self._graphs), self.sizes,
                 self.capture_seconds)

    def run(self, inputs: DecodeInputs, pending: PendingTokens | None = None) -> tuple[torch.Tensor, SamplerOutput]:
        """Replay the graph of inputs' padded size -> (fp32 logits [inputs.num_seqs, vocab], their greedy_head),
        views into the graph's static outputs: consume them before the next replay. No host sync: the inputs go up
        from pinned memory, and `pending` tokens are copied on the device."""
        g = self._graphs[inputs.i64.shape[1]]
        upload(g.i64, torch.from_numpy(inputs.i64))
        upload(g.i32, torch.from_numpy(inputs.i32))
        if pending is not None:
            pending.apply(g.i64[TOKEN], inputs.num_seqs)
        g.graph.replay()
        n = inputs.num_seqs
        return g.logits[:n], SamplerOutput(g.greedy.token_ids[:n], g.greedy.logprobs[:n])
