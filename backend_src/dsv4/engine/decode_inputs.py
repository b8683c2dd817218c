"""The host-side inputs of a decode-only step, packed into two arrays so that one copy each puts them on the GPU.

`i64` rows: token id, position, window-cache slot, state slot. `i32`: window and compressed block tables, [2, B, W]
with W = max_model_len / block_size columns, -1 past a sequence's blocks (and where window blocks were released).
A batch padded to a CUDA-graph size repeats row 0 in the extra rows: they recompute row 0's token and write exactly
what row 0 writes, so the caches see the same values and no request's state changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch

from dsv4.engine.kv_cache import KVCache
from dsv4.engine.request import Sequence
from dsv4.ops.base import DecodeTables, ForwardBatch

TOKEN, POSITION, SLOT, STATE = range(4)


@dataclass
class DecodeInputs:
    i64: np.ndarray      # [4, B_padded]
    i32: np.ndarray      # [2, B_padded, W]
    num_seqs: int        # real rows (the rest repeat row 0)

    @classmethod
    def build(cls, seqs: list[Sequence], cache: KVCache, padded: int, width: int) -> "DecodeInputs":
        # Python lists first, then one numpy write per array: six numpy writes per sequence were most of the cost
        n, bs = len(seqs), cache.block_size
        ids = [seq.request_id for seq in seqs]
        pos = [seq.num_computed for seq in seqs]
        swa_lens, swa = cache.window.flat_block_tables(ids)
        comp_lens, comp = cache.compressed.flat_block_tables(ids)
        starts = accumulate(swa_lens, initial=0)           # of each sequence's window table in `swa`
        slots = [swa[s + c // bs] * bs + c % bs for s, c in zip(starts, pos)]
        i64 = np.empty((4, padded), dtype=np.int64)
        i64[:, :n] = [[seq.token_at(c) for seq, c in zip(seqs, pos)], pos, slots, cache.slots(ids)]
        i32 = np.full((2, padded, width), -1, dtype=np.int32)
        i32[:, :n][np.arange(width) < np.array([swa_lens, comp_lens])[..., None]] = swa + comp
        if padded > n:
            i64[:, n:] = i64[:, :1]
            i32[:, n:] = i32[:, :1]
        return cls(i64, i32, n)

    @classmethod
    def dummy(cls, padded: int, width: int) -> "DecodeInputs":
        """Position 0 of a sequence owning block 0 and state slot 0: what warm-up and capture run at start-up,
        while no request holds any block (the writes land in free blocks that their next owner overwrites before
        reading, and `KVCache.add` clears the state slot)."""
        return cls(np.zeros((4, padded), dtype=np.int64), np.zeros((2, padded, width), dtype=np.int32), padded)


@dataclass
class PendingTokens:
    """Input tokens of a decode step that are still on the device: row `rows[i]` of the step takes `tokens[src[i]]`
    (sampled by the previous step, whose results the host has not read yet)."""

    rows: list[int]
    src: list[int]
    tokens: torch.Tensor

    def apply(self, token_row: torch.Tensor) -> None:
        """Write them into the step's device token ids (stream-ordered after the sampling that produced them)."""
        idx = to_device(torch.tensor([self.rows, self.src], dtype=torch.long), token_row.device)
        token_row.index_copy_(0, idx[0], self.tokens.index_select(0, idx[1]))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting for the GPU: a copy from pageable memory would block the host until the
    stream's earlier work (the step still running) is done, which is what running a step ahead must avoid."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def upload(dst: torch.Tensor, host: torch.Tensor) -> None:
    """to_device into an existing buffer (a CUDA graph's static input), without an intermediate device copy."""
    if dst.device.type != "cuda":
        dst.copy_(host)
    else:
        dst.copy_(host.pin_memory(), non_blocking=True)


def decode_batch(i64: torch.Tensor, i32: torch.Tensor, max_position: int, logits_indices: torch.Tensor,
                 host: DecodeInputs | None = None) -> ForwardBatch:
    """A ForwardBatch over device copies of DecodeInputs. `host` (the eager path) also fills the host lists the
    torch ops read; a CUDA graph's batch leaves them at placeholders, which the graph-capable ops never read."""
    B = i64.shape[1]
    tables = DecodeTables(state_slots=i64[STATE], swa_block_tables=i32[0], comp_block_tables=i32[1],
                          seq_index=torch.arange(B, dtype=torch.int32, device=i64.device), max_position=max_position)
    if host is not None:
        ctx = host.i64[POSITION].tolist()
        states = host.i64[STATE].tolist()
        swa, comp = _used_rows(host.i32)
    else:
        ctx, states, swa, comp = [0] * B, [0] * B, [[0]] * B, [[0]] * B
    return ForwardBatch(token_ids=i64[TOKEN], positions=i64[POSITION], query_start=list(range(B + 1)),
                        context_lens=ctx, state_slots=states, swa_block_tables=swa, comp_block_tables=comp,
                        swa_slot_mapping=i64[SLOT], logits_indices=logits_indices, decode=tables)


def _used_rows(tables: np.ndarray) -> list[list[list[int]]]:
    """The rows of [..., B, W] block tables as lists, each up to its last allocated column (released window blocks
    inside stay -1)."""
    allocated = tables != -1
    used = np.where(allocated.any(axis=-1), tables.shape[-1] - allocated[..., ::-1].argmax(axis=-1), 0)
    return [[row[:u] for row, u in zip(rows, us)] for rows, us in zip(tables.tolist(), used.tolist())]
