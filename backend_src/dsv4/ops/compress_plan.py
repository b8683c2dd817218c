"""Index plan of a batched prefill compressor step: which rows each closed window pools, where its entry goes, and
what the per-sequence carry holds afterwards, for every sequence of a ForwardBatch at once.

The compressor pools each closed window of `ratio` raw rows into one cache entry (ratio 4 also pools the first half
of the previous window's rows: the overlap). Rows of a window can come from this step's tokens or from the carry
(the rows of the still-open window, and for ratio 4 the last closed window). Everything is expressed as row numbers
of one source: this step's T rows followed by the carry rows the step reads, so that one
gather per tensor serves the whole batch, whatever the number of sequences (TorchOps looped over sequences with
~25 launches each: 0.4 s of a 64-prompt prefill on an H100).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsv4.ops.base import ForwardBatch


@dataclass(frozen=True)
class CompressPlan:
    """Row numbers into the source [this step's T rows; the carry rows in carry_gather] (see module doc); E
    entries close."""

    cur_rows: np.ndarray       # [E, ratio] rows of each closing window
    prev_rows: np.ndarray      # [E, ratio] rows of the window before it (ratio 4's overlap; empty otherwise)
    entry_pos: np.ndarray      # [E] first position of each closing window (RoPE position of the entry)
    entry_block: np.ndarray    # [E] compressed-cache block of the entry
    entry_index: np.ndarray    # [E] entry's index inside that block
    carry_dst: np.ndarray      # [R] rows of the flattened carry pool written after the step ...
    carry_src: np.ndarray      # [R] ... from these source rows (gathered before any write)
    new_rows: np.ndarray       # [T] ratio-position of each new token (for the learned position bias `ape`)
    carry_gather: np.ndarray   # [U] rows of the flattened carry pool that are source rows T, T+1, ...

    @property
    def num_entries(self) -> int:
        return int(self.entry_pos.shape[0])


def compress_plan(batch: ForwardBatch, ratio: int, block_size: int, carry_rows: int) -> CompressPlan:
    overlap = ratio == 4
    cur0 = ratio if overlap else 0             # carry rows of the still-open window start here
    T = batch.query_start[-1]
    cur, prev, pos, blk, idx, dst, src, new_rows = [], [], [], [], [], [], [], []
    for b in range(batch.num_seqs):
        s0, s1 = batch.query_start[b], batch.query_start[b + 1]
        c, n = batch.context_lens[b], s1 - s0
        if n == 0:
            continue
        carry0 = T + batch.state_slots[b] * carry_rows
        first_w = c // ratio                    # window the chunk starts in (maybe partly in the carry)
        p = np.arange(c, c + n)
        new_rows.append(p % ratio)

        def source(q: np.ndarray) -> np.ndarray:
            """Source row of positions q >= (first_w - 1) * ratio of sequence b."""
            return np.where(q >= c, s0 + q - c,
                            np.where(q >= first_w * ratio, carry0 + cur0 + q - first_w * ratio,
                                     carry0 + q - (first_w - 1) * ratio))

        end_w = (c + n) // ratio
        if end_w > first_w:
            w = np.arange(first_w, end_w)
            starts = w * ratio
            rows = starts[:, None] + np.arange(ratio)[None, :]
            cur.append(source(rows))
            if overlap:
                prev.append(source(rows - ratio))
                dst.append(carry0 - T + np.arange(ratio))                # the last closed window becomes the previous
                src.append(source(rows[-1]))
            table = batch.comp_block_tables[b]
            pos.append(starts)
            blk.append(np.asarray([table[s // block_size] for s in starts], dtype=np.int64))
            idx.append((starts % block_size) // ratio)
        left = (c + n) % ratio
        if left:
            q = np.arange(end_w * ratio, c + n)
            dst.append(carry0 - T + cur0 + np.arange(left))
            src.append(source(q))

    def cat(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(shape, dtype=np.int64)

    cur_rows, prev_rows, carry_src = cat(cur, (0, ratio)), cat(prev, (0, ratio)), cat(src, (0,))
    # only the carry rows some window reads join the source (not the whole carry pool): renumber them T, T+1, ...
    refs = np.concatenate([cur_rows.ravel(), prev_rows.ravel(), carry_src])
    carry_gather = np.unique(refs[refs >= T])

    def renumber(rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= T, T + np.searchsorted(carry_gather, rows), rows)

    return CompressPlan(cur_rows=renumber(cur_rows), prev_rows=renumber(prev_rows), entry_pos=cat(pos, (0,)),
                        entry_block=cat(blk, (0,)), entry_index=cat(idx, (0,)), carry_dst=cat(dst, (0,)),
                        carry_src=renumber(carry_src), new_rows=cat(new_rows, (0,)), carry_gather=carry_gather - T)


__all__ = ["CompressPlan", "compress_plan"]
