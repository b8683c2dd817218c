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

TOKEN, POSITION, SLOT, STATE, LOGITS_ROW = range(5)


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
        i32 = np.full((2, padded, width), -1, dtype=np.int32)
        swa_lens, swa = _fill_block_tables(i32[:, :n], cache, ids)
        starts = accumulate(swa_lens, initial=0)           # of each sequence's window table in `swa`
        slots = [swa[s + c // bs] * bs + c % bs for s, c in zip(starts, pos)]
        i64 = np.empty((4, padded), dtype=np.int64)
        i64[:, :n] = [[seq.token_at(c) for seq, c in zip(seqs, pos)], pos, slots, cache.slots(ids)]
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


def _fill_block_tables(out: np.ndarray, cache: KVCache, ids: list) -> tuple[list[int], list[int]]:
    """Write the window and compressed block tables of sequences `ids` into the rows of `out` [2, len(ids), W]
    (prefilled with -1) in one numpy write; -> (window table lengths, window tables end to end)."""
    swa_lens, swa = cache.window.flat_block_tables(ids)
    comp_lens, comp = cache.compressed.flat_block_tables(ids)
    out[np.arange(out.shape[-1]) < np.array([swa_lens, comp_lens])[..., None]] = swa + comp
    return swa_lens, swa


@dataclass
class MixedInputs:
    """A step with prompt tokens in DecodeInputs' layout, one row per token instead of per sequence: each token
    carries its own copy of its sequence's block tables, so the decode path of every op (a token reads its
    sequence's cache up to its own position) serves prefill chunks too, and one CUDA graph per token bucket replays
    the whole step (engine.mixed_graphs). `i64` has a fifth row: the token rows whose logits are needed, first
    `len(sampling)` entries, the rest 0. Padding token rows repeat row 0 (as in DecodeInputs). `plan_batch` is the
    host description the compressor index plan is built from (ops.compress_plan reads its lists only)."""

    i64: np.ndarray             # [5, S]
    i32: np.ndarray             # [2, S, W]
    num_tokens: int             # real token rows
    sampling: list[int]         # indices into the step's sequences whose last token is computed now
    plan_batch: ForwardBatch    # host lists only: tensors None, comp_block_tables the [B, W] array

    @classmethod
    def build(cls, seqs: list[Sequence], num_tokens: list[int], cache: KVCache, padded: int,
              width: int) -> "MixedInputs":
        B, bs = len(seqs), cache.block_size
        ids = [seq.request_id for seq in seqs]
        n = np.asarray(num_tokens, dtype=np.int64)
        c = np.asarray([seq.num_computed for seq in seqs], dtype=np.int64)
        T = int(n.sum())
        if T > padded:
            raise ValueError(f"a step of {T} tokens does not fit {padded} rows")
        tables = np.full((2, B, width), -1, dtype=np.int32)
        _fill_block_tables(tables, cache, ids)
        owner = np.repeat(np.arange(B), n)
        starts = np.cumsum(n) - n
        pos = np.arange(T) + np.repeat(c - starts, n)
        tokens: list[int] = []
        for seq, k, m in zip(seqs, c.tolist(), num_tokens):
            tokens += seq.all_ids[k:k + m]
        done = (c + n) == np.asarray([seq.num_tokens for seq in seqs])
        sampling = np.flatnonzero(done)
        i64 = np.zeros((5, padded), dtype=np.int64)
        i64[TOKEN, :T] = tokens
        i64[POSITION, :T] = pos
        i64[SLOT, :T] = tables[0, owner, pos // bs].astype(np.int64) * bs + pos % bs
        state = cache.slots(ids)
        i64[STATE, :T] = np.asarray(state, dtype=np.int64)[owner]
        i64[LOGITS_ROW, :sampling.shape[0]] = (starts + n - 1)[sampling]
        i32 = np.empty((2, padded, width), dtype=np.int32)
        i32[:, :T] = tables[:, owner]
        if padded > T:
            i64[:LOGITS_ROW, T:] = i64[:LOGITS_ROW, :1]
            i32[:, T:] = i32[:, :1]
        plan_batch = ForwardBatch(token_ids=None, positions=None, query_start=[0, *np.cumsum(n).tolist()],
                                  context_lens=c.tolist(), state_slots=state,
                                  swa_block_tables=[], comp_block_tables=tables[1], swa_slot_mapping=None,
                                  logits_indices=None)
        return cls(i64, i32, T, sampling.tolist(), plan_batch)


@dataclass
class PendingTokens:
    """Input tokens of a decode step that are still on the device: row `rows[i]` of the step takes `tokens[src[i]]`
    (sampled by the previous step, whose results the host has not read yet)."""

    rows: list[int]
    src: list[int]
    tokens: torch.Tensor

    def apply(self, token_row: torch.Tensor, num_rows: int | None = None) -> None:
        """Write them into the step's device token ids (stream-ordered after the sampling that produced them).
        `num_rows`: the real rows of a padded graph input, whose padding rows repeat row 0, its token included
        (they write what row 0 writes)."""
        idx = to_device(torch.tensor([self.rows, self.src], dtype=torch.long), token_row.device)
        token_row.index_copy_(0, idx[0], self.tokens.index_select(0, idx[1]))
        if num_rows is not None and token_row.shape[0] > num_rows:
            token_row[num_rows:].copy_(token_row[:1].expand(token_row.shape[0] - num_rows))


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
