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

import math
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
        return _plan_views(flat, [(name, a.shape) for name, a in self.arrays()], self.padded)

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

    @property
    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """A padded plan's arrays and their shapes, in CompressPlan's field order."""
        e, r = self.entries, self.ratio
        return [("cur_rows", (e, r)), ("prev_rows", (e if r == 4 else 0, r)), ("entry_pos", (e,)),
                ("entry_block", (e,)), ("entry_index", (e,)), ("carry_dst", (self.carry_writes,)),
                ("carry_src", (self.carry_writes,)), ("new_rows", (self.tokens,)),
                ("carry_gather", (self.carry_pool_rows,)), ("entry_valid", (e,))]

    @property
    def flat_size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    def views(self, flat):
        """The padded plan held in `flat` (numpy array or tensor, field order) as a CompressPlan of views."""
        return _plan_views(flat, self.shapes, padded=True)

    def empty(self) -> CompressPlan:
        """The padded plan of a step that closes no window and writes no carry row (all padding)."""
        z = np.zeros(0, np.int64)
        none = CompressPlan(cur_rows=z.reshape(0, self.ratio), prev_rows=z.reshape(0, self.ratio), entry_pos=z,
                            entry_block=z, entry_index=z, carry_dst=z, carry_src=z, new_rows=z, carry_gather=z,
                            entry_valid=z)
        return padded_plan(none, 0, self)


def _plan_views(flat, shapes: list[tuple[str, tuple[int, ...]]], padded: bool) -> CompressPlan:
    """A CompressPlan whose arrays are consecutive views of `flat` with these (name, shape)s, in field order."""
    moved, at = {}, 0
    for name, shape in shapes:
        size = math.prod(shape)
        moved[name] = flat[at:at + size].reshape(shape)
        at += size
    return CompressPlan(**moved, padded=padded)


def padded_plan(plan: CompressPlan, num_tokens: int, bounds: PlanBounds) -> CompressPlan:
    """`plan` (of a step of `num_tokens` rows) at the fixed sizes of `bounds`, for a step whose token rows are
    padded to bounds.tokens (views of `padded_flat`)."""
    return bounds.views(padded_flat(plan, num_tokens, bounds))


def padded_flat(plan: CompressPlan, num_tokens: int, bounds: PlanBounds, out: np.ndarray | None = None) -> np.ndarray:
    """The padded plan's arrays, flattened in field order, into `out` (a fresh array when None) -> that array.
    Padding is harmless by construction: padding entries repeat the last real entry (same rows, same slot, same
    value), or, when none closes, rewrite slot (0, 0) with what it holds (entry_valid 0); padding carry writes
    repeat the last real one, or rewrite carry row 0 with its own value. Carry source rows move up by the padding
    (they follow the padded token rows)."""
    S, T, r = bounds.tokens, num_tokens, bounds.ratio
    E, R, U = plan.num_entries, plan.carry_dst.shape[0], plan.carry_gather.shape[0]
    e_max, r_max, u_max = bounds.entries, bounds.carry_writes, bounds.carry_pool_rows
    if T > S or E > e_max or R > r_max or U > u_max:
        raise ValueError(f"compressor plan of {T} tokens ({E} entries, {R} carry writes, {U} carry rows) exceeds "
                         f"its padded bounds {bounds}")
    if out is None:
        out = np.empty(bounds.flat_size, np.int64)
    at = 0

    def put(a: np.ndarray, n: int, fill: int | None, width: int = 1, shift: bool = False) -> None:
        """a's values, then padding up to n rows of `width`: `fill`, or None: a's last row again"""
        nonlocal at
        k = a.size
        seg = out[at:at + k]
        seg[:] = a.ravel()
        if shift and S > T:
            seg[seg >= T] += S - T
        pad = out[at + k:at + n * width]
        if pad.size:
            if fill is not None:
                pad[:] = fill
            elif width == 1:
                pad[:] = seg[-1]
            else:
                pad.reshape(-1, width)[:] = seg[k - width:]
        at += n * width

    n_prev = e_max if r == 4 else 0
    put(plan.cur_rows, e_max, None if E else 0, r, shift=True)
    put(plan.prev_rows, n_prev, None if E else 0, r, shift=True)
    for a in (plan.entry_pos, plan.entry_block, plan.entry_index):
        put(a, e_max, None if E else 0)
    put(plan.carry_dst, r_max, None if R else 0)
    if R:
        put(plan.carry_src, r_max, None, shift=True)
    else:                                       # rewrite carry row 0 from the source row holding it
        hits = np.flatnonzero(plan.carry_gather == 0)
        put(plan.carry_src, r_max, S + (int(hits[0]) if hits.size else U))
    put(plan.new_rows, S, 0)
    put(plan.carry_gather, u_max, 0)
    out[at:at + e_max] = 1 if E else 0          # entry_valid
    return out


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of `counts` items: each item's group and its rank inside the group."""
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    rank = np.arange(owner.shape[0]) - (np.cumsum(counts) - counts)[owner]
    return owner, rank


def compress_plan(batch: ForwardBatch, ratio: int, block_size: int, carry_rows: int) -> CompressPlan:
    # vectorised over sequences (a mixed step holds dozens of one-token decode rows; a Python loop over them cost
    # ~1.8 ms per layer on the H100 host), and with as few numpy calls as possible: at these sizes each costs its
    # overhead, not its work (the plans were ~0.9 ms of a 4.7 ms step with prompt tokens on the H100 host)
    overlap = ratio == 4
    cur0 = ratio if overlap else 0             # carry rows of the still-open window start here
    qs = np.asarray(batch.query_start, dtype=np.int64)
    T = int(qs[-1])
    n = qs[1:] - qs[:-1]
    c = np.asarray(batch.context_lens, dtype=np.int64)
    slots = np.asarray(batch.state_slots, dtype=np.int64)
    s0 = qs[:-1]
    live = None
    if not n.all():                            # keep the sequences with tokens in this step
        live = np.flatnonzero(n)
        s0, n, c, slots = s0[live], n[live], c[live], slots[live]
    carry0 = T + slots * carry_rows
    first_w = c // ratio                       # window the chunk starts in (maybe partly in the carry)
    fwr = first_w * ratio
    end_w = (c + n) // ratio
    # source row of position q of sequence k (q >= fwr - ratio) = q + off[k, (q >= fwr[k]) + (q >= c[k])]: before
    # the chunk's first window the carry's previous window, then the carry's open window, then this step's rows
    off = np.empty((c.shape[0], 3), np.int64)
    off[:, 0] = carry0 - fwr + ratio
    off[:, 1] = off[:, 0] + (cur0 - ratio)
    off[:, 2] = s0 - c

    def source(q: np.ndarray, k: np.ndarray) -> np.ndarray:
        return q + off[k, (q >= fwr[k]).astype(np.int64) + (q >= c[k])]

    tok, rank = _expand(n)                     # this step's tokens, in order
    new_rows = (c[tok] + rank) % ratio

    win, wrank = _expand(end_w - first_w)      # closing windows
    starts = fwr[win] + wrank * ratio
    ar = np.arange(ratio)
    if overlap:                                # [previous window | closing window] in one go
        both = source(starts[:, None] + np.arange(-ratio, ratio), win[:, None])
        prev_rows, cur_rows = both[:, :ratio], both[:, ratio:]
    else:
        cur_rows = source(starts[:, None] + ar, win[:, None])
        prev_rows = np.zeros((0, ratio), np.int64)
    tables = batch.comp_block_tables
    ws = win if live is None else live[win]
    if isinstance(tables, np.ndarray):         # [B, W] (engine.decode_inputs.MixedInputs)
        entry_block = tables[ws, starts // block_size].astype(np.int64)
    else:
        entry_block = np.asarray([tables[k][s // block_size] for k, s in zip(ws.tolist(), starts.tolist())],
                                 dtype=np.int64)
    entry_index = (starts % block_size) // ratio

    # carry writes: this step's rows of the still-open window (rows the carry already holds in place are not
    # rewritten), and for ratio 4 first the last closed window, which becomes the previous one
    first_new = np.maximum(end_w * ratio, c)
    lk, lrank = _expand(c + n - first_new)
    q = first_new[lk] + lrank
    carry_dst = carry0[lk] - T + cur0 + q - end_w[lk] * ratio
    if overlap:
        closed = np.flatnonzero(end_w > first_w)
        q = np.concatenate([((end_w[closed] - 1) * ratio)[:, None] + ar, q], axis=None)
        lk = np.concatenate([np.repeat(closed, ratio), lk])
        carry_dst = np.concatenate([(carry0[closed] - T)[:, None] + ar, carry_dst], axis=None)
    carry_src = source(q, lk)

    # only the carry rows some window reads join the source (not the whole carry pool): renumber them T, T+1, ...
    refs = np.concatenate([cur_rows, prev_rows, carry_src], axis=None)
    in_carry = refs >= T
    carry_gather, inverse = np.unique(refs[in_carry], return_inverse=True)
    refs[in_carry] = T + inverse
    E, e2 = cur_rows.shape[0], cur_rows.size + prev_rows.size
    return CompressPlan(cur_rows=refs[:cur_rows.size].reshape(E, ratio),
                        prev_rows=refs[cur_rows.size:e2].reshape(-1, ratio), entry_pos=starts,
                        entry_block=entry_block, entry_index=entry_index, carry_dst=carry_dst,
                        carry_src=refs[e2:], new_rows=new_rows, carry_gather=carry_gather - T,
                        entry_valid=np.ones(E, np.int64))


__all__ = ["CompressPlan", "PlanBounds", "compress_plan", "padded_flat", "padded_plan"]
