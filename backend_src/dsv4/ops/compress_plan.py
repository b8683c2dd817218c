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

from dataclasses import dataclass, fields

import numpy as np
import torch

from dsv4.ops.base import ForwardBatch


@dataclass(frozen=True)
class CompressPlan:
    """Row numbers into the source [this step's T rows; the carry rows in carry_gather] (see module doc); E
    entries close. Arrays are int64 numpy arrays on the host, tensors after `on(device)`."""

    cur_rows: np.ndarray       # [E, ratio] rows of each closing window
    prev_rows: np.ndarray      # [E, ratio] rows of the window before it (ratio 4's overlap; empty otherwise)
    entry_pos: np.ndarray      # [E] first position of each closing window (RoPE position of the entry)
    entry_block: np.ndarray    # [E] compressed-cache block of the entry
    entry_index: np.ndarray    # [E] entry's index inside that block
    carry_dst: np.ndarray      # [R] rows of the flattened carry pool written after the step ...
    carry_src: np.ndarray      # [R] ... from these source rows (gathered before any write)
    new_rows: np.ndarray       # [T] ratio-position of each new token (for the learned position bias `ape`)
    carry_gather: np.ndarray   # [U] rows of the flattened carry pool that are source rows T, T+1, ...
    entry_valid: np.ndarray    # [E] 0 for a padding entry that must write back what its slot holds (padded plans)
    padded: bool = False       # a fixed-size plan (`padded_plan`): apply entry_valid

    @property
    def num_entries(self) -> int:
        return int(self.entry_pos.shape[0])

    def arrays(self) -> list[tuple[str, np.ndarray]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "padded"]

    def on(self, device: torch.device) -> "CompressPlan":
        """The same plan with every array a long tensor on `device`, moved in one host-to-device copy (the layers
        of a step that share a ratio share it)."""
        named = self.arrays()
        flat = torch.from_numpy(np.concatenate([a.ravel() for _, a in named])).to(device)
        return self.views(flat)

    def views(self, flat: torch.Tensor) -> "CompressPlan":
        """This plan's shapes as views into `flat` (the concatenation of its arrays, in field order)."""
        moved, at = {}, 0
        for name, a in self.arrays():
            moved[name] = flat[at:at + a.size].view(a.shape)
            at += a.size
        return CompressPlan(**moved, padded=self.padded)

    def flat(self) -> np.ndarray:
        return np.concatenate([a.ravel() for _, a in self.arrays()])


@dataclass(frozen=True)
class PlanBounds:
    """Fixed sizes of a padded plan for steps of at most `tokens` token rows and `seqs` sequences: the shapes a
    CUDA graph captures (engine.mixed_graphs). E <= tokens // ratio + seqs (a sequence closes at most n // ratio + 1
    windows); carry writes <= tokens (each of the step's rows of an open window once) + ratio per closing
    sequence for the overlap; gathered carry rows <= the whole carry pool."""

    tokens: int
    seqs: int
    ratio: int
    carry_pool_rows: int        # rows of the flattened carry pool (state slots x carry rows)

    @property
    def entries(self) -> int:
        return self.tokens // self.ratio + self.seqs

    @property
    def carry_writes(self) -> int:
        return self.tokens + (self.ratio * min(self.seqs, self.entries) if self.ratio == 4 else 0)

    def empty(self) -> CompressPlan:
        """The padded plan of a step that closes no window and writes no carry row (all padding)."""
        z = np.zeros(0, np.int64)
        none = CompressPlan(cur_rows=z.reshape(0, self.ratio), prev_rows=z.reshape(0, self.ratio), entry_pos=z,
                            entry_block=z, entry_index=z, carry_dst=z, carry_src=z, new_rows=z, carry_gather=z,
                            entry_valid=z)
        return padded_plan(none, 0, self)


def padded_plan(plan: CompressPlan, num_tokens: int, bounds: PlanBounds) -> CompressPlan:
    """`plan` (of a step of `num_tokens` rows) at the fixed sizes of `bounds`, for a step whose token rows are
    padded to bounds.tokens. Padding is harmless by construction: padding entries repeat the last real entry (same
    rows, same slot, same value), or, when none closes, rewrite slot (0, 0) with what it holds (entry_valid 0);
    padding carry writes repeat the last real one, or rewrite carry row 0 with its own value."""
    S, T, r = bounds.tokens, num_tokens, bounds.ratio
    E, R, U = plan.num_entries, plan.carry_dst.shape[0], plan.carry_gather.shape[0]
    e_max, r_max, u_max = bounds.entries, bounds.carry_writes, bounds.carry_pool_rows
    if T > S or E > e_max or R > r_max or U > u_max:
        raise ValueError(f"compressor plan of {T} tokens ({E} entries, {R} carry writes, {U} carry rows) exceeds "
                         f"its padded bounds {bounds}")

    def shift(rows: np.ndarray) -> np.ndarray:      # carry source rows follow the padded token rows
        return np.where(rows >= T, rows + (S - T), rows)

    gather = np.zeros(u_max, np.int64)
    gather[:U] = plan.carry_gather
    hits = np.flatnonzero(plan.carry_gather == 0)
    row0 = S + (int(hits[0]) if hits.size else U)   # source row holding carry row 0 (U < u_max when it is absent)

    def pad(a: np.ndarray, n: int, fill: np.ndarray | int) -> np.ndarray:
        out = np.empty((n, *a.shape[1:]), np.int64)
        out[:a.shape[0]] = a
        out[a.shape[0]:] = fill
        return out

    cur, prev = shift(plan.cur_rows), shift(plan.prev_rows)
    if E:
        last = lambda a: a[E - 1]                                   # noqa: E731
        entries = dict(cur_rows=pad(cur, e_max, last(cur)),
                       prev_rows=pad(prev, e_max, last(prev)) if prev.shape[0] else np.zeros((0, r), np.int64),
                       entry_pos=pad(plan.entry_pos, e_max, last(plan.entry_pos)),
                       entry_block=pad(plan.entry_block, e_max, last(plan.entry_block)),
                       entry_index=pad(plan.entry_index, e_max, last(plan.entry_index)),
                       entry_valid=np.ones(e_max, np.int64))
    else:
        entries = dict(cur_rows=np.zeros((e_max, r), np.int64),
                       prev_rows=np.zeros((e_max if r == 4 else 0, r), np.int64),
                       entry_pos=np.zeros(e_max, np.int64), entry_block=np.zeros(e_max, np.int64),
                       entry_index=np.zeros(e_max, np.int64), entry_valid=np.zeros(e_max, np.int64))
    if R:
        dst = pad(plan.carry_dst, r_max, plan.carry_dst[-1])
        src = pad(shift(plan.carry_src), r_max, shift(plan.carry_src)[-1])
    else:
        dst, src = np.zeros(r_max, np.int64), np.full(r_max, row0, np.int64)
    return CompressPlan(**entries, carry_dst=dst, carry_src=src, new_rows=pad(plan.new_rows, S, 0),
                        carry_gather=gather, padded=True)


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of `counts` items: each item's group and its rank inside the group."""
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    rank = np.arange(owner.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, rank


def compress_plan(batch: ForwardBatch, ratio: int, block_size: int, carry_rows: int) -> CompressPlan:
    # vectorised over sequences (a mixed step holds dozens of one-token decode rows; a Python loop over them cost
    # ~1.8 ms per layer on the H100 host)
    overlap = ratio == 4
    cur0 = ratio if overlap else 0             # carry rows of the still-open window start here
    qs = np.asarray(batch.query_start, dtype=np.int64)
    T = int(qs[-1])
    n_all = np.diff(qs)
    live = np.flatnonzero(n_all)               # sequences with tokens in this step
    s0, n = qs[:-1][live], n_all[live]
    c = np.asarray(batch.context_lens, dtype=np.int64)[live]
    carry0 = T + np.asarray(batch.state_slots, dtype=np.int64)[live] * carry_rows
    first_w = c // ratio                       # window the chunk starts in (maybe partly in the carry)
    end_w = (c + n) // ratio

    def source(q: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Source row of positions q >= (first_w - 1) * ratio of live sequence k (broadcast)."""
        fw = first_w[k]
        return np.where(q >= c[k], s0[k] + q - c[k],
                        np.where(q >= fw * ratio, carry0[k] + cur0 + q - fw * ratio,
                                 carry0[k] + q - (fw - 1) * ratio))

    tok, rank = _expand(n)                     # this step's tokens, in order
    new_rows = (c[tok] + rank) % ratio

    win, wrank = _expand(end_w - first_w)      # closing windows
    starts = (first_w[win] + wrank) * ratio
    rows = starts[:, None] + np.arange(ratio)[None, :]
    cur_rows = source(rows, win[:, None]).reshape(-1, ratio)
    prev_rows = source(rows - ratio, win[:, None]).reshape(-1, ratio) if overlap else np.zeros((0, ratio), np.int64)
    tables = batch.comp_block_tables
    if isinstance(tables, np.ndarray):         # [B, W] (engine.decode_inputs.MixedInputs)
        entry_block = tables[live[win], starts // block_size].astype(np.int64)
    else:
        entry_block = np.asarray([tables[live[k]][s // block_size] for k, s in zip(win.tolist(), starts.tolist())],
                                 dtype=np.int64)
    entry_index = (starts % block_size) // ratio

    dst, src = [], []
    if overlap:                                # the last closed window becomes the previous one
        closed = np.flatnonzero(end_w > first_w)
        last = (end_w[closed] - 1)[:, None] * ratio + np.arange(ratio)[None, :]
        dst.append((carry0[closed] - T)[:, None] + np.arange(ratio)[None, :])
        src.append(source(last, closed[:, None]))
    # this step's rows of the still-open window (rows the carry already holds in place are not rewritten)
    first_new = np.maximum(end_w * ratio, c)
    lk, lrank = _expand(c + n - first_new)
    q = first_new[lk] + lrank
    dst.append(carry0[lk] - T + cur0 + q - end_w[lk] * ratio)
    src.append(source(q, lk))
    carry_dst = np.concatenate([d.ravel() for d in dst]).astype(np.int64)
    carry_src = np.concatenate([x.ravel() for x in src]).astype(np.int64)

    # only the carry rows some window reads join the source (not the whole carry pool): renumber them T, T+1, ...
    refs = np.concatenate([cur_rows.ravel(), prev_rows.ravel(), carry_src])
    carry_gather = np.unique(refs[refs >= T])

    def renumber(r: np.ndarray) -> np.ndarray:
        return np.where(r >= T, T + np.searchsorted(carry_gather, r), r).astype(np.int64)

    return CompressPlan(cur_rows=renumber(cur_rows), prev_rows=renumber(prev_rows), entry_pos=starts.astype(np.int64),
                        entry_block=entry_block, entry_index=entry_index.astype(np.int64), carry_dst=carry_dst,
                        carry_src=renumber(carry_src), new_rows=new_rows.astype(np.int64),
                        carry_gather=(carry_gather - T).astype(np.int64),
                        entry_valid=np.ones(starts.shape[0], np.int64))


__all__ = ["CompressPlan", "PlanBounds", "compress_plan", "padded_plan"]
