"""Paged KV-cache block accounting (host side only; no tensors).

The KV cache is a pool of ``num_blocks`` blocks of ``block_size`` token slots.  Each sequence
owns an ordered *block table*; token position ``i`` of a sequence lives in slot
``block_table[i // block_size] * block_size + i % block_size``.

Blocks are reference counted so that several sequences can share them (``fork`` now, prefix
caching later).  A shared block is never written: when a sequence grows into a partially
filled shared last block, ``append_slots`` gives it a private copy (copy-on-write) and returns
the ``(src_block, dst_block)`` pairs that the caller must copy on the device before writing.

Errors: ``OutOfBlocksError`` when the pool is exhausted (the manager state is unchanged),
``UnknownSequenceError`` for an unknown / already freed sequence (so a double free raises),
``ValueError`` for bad arguments (negative sizes, shrinking, duplicate ids).
"""

from __future__ import annotations

from itertools import chain
from typing import Hashable, Iterable

from dsv4.errors import OutOfBlocksError, UnknownSequenceError

__all__ = ["BlockManager", "OutOfBlocksError", "UnknownSequenceError"]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO free list; popping from the end hands out 0, 1, 2, ... first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks
        self._tables: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}
        # leading table entries known to be -1 (released), so that a sliding window's release each step looks only
        # at blocks it has not released yet instead of rescanning the whole table
        self._holes: dict[Hashable, int] = {}

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0.0 for an empty pool)."""
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def num_tokens(self, seq_id: Hashable) -> int:
        self._check(seq_id)
        return self._lens[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        self._check(seq_id)
        return list(self._tables[seq_id])

    def table_length(self, seq_id: Hashable, default: int | None = None) -> int:
        """len(block_table(seq_id)) without copying the table (the scheduler asks every step for every sequence);
        `default`, if given, for a sequence that is not allocated (instead of raising)."""
        table = self._tables.get(seq_id)
        if table is None:
            if default is None:
                raise UnknownSequenceError(f"unknown sequence {seq_id!r}")
            return default
        return len(table)

    def flat_block_tables(self, seq_ids: Iterable[Hashable]) -> tuple[list[int], list[int]]:
        """(length of each block table, the tables end to end) of ``seq_ids``: what a decode step scatters into
        its padded table array in one write, instead of copying each table with block_table()."""
        try:
            tables = [self._tables[s] for s in seq_ids]
        except KeyError as e:
            raise UnknownSequenceError(f"unknown sequence {e.args[0]!r}") from None
        return [len(t) for t in tables], list(chain.from_iterable(tables))

    def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Cache slots of token positions ``start .. end-1`` (must be allocated)."""
        self._check(seq_id)
        if not (0 <= start <= end <= self._lens[seq_id]):
            raise ValueError(
                f"slot range [{start}, {end}) outside the {self._lens[seq_id]} allocated tokens of {seq_id!r}"
            )
        table = self._tables[seq_id]
        bs = self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Create ``seq_id`` with room for ``num_tokens`` tokens; returns its block table."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
        need = self.blocks_needed(num_tokens)
        if need > len(self._free):
            raise OutOfBlocksError(
                f"sequence {seq_id!r} needs {need} KV blocks for {num_tokens} tokens, only {len(self._free)} free"
            )
        table = [self._take() for _ in range(need)]
        self._tables[seq_id] = table
        self._lens[seq_id] = num_tokens
        return list(table)

    def _append_need(self, seq_id: Hashable, new_len: int) -> tuple[int, bool]:
        cur = self._lens[seq_id]
        if isinstance(new_len, bool) or not isinstance(new_len, int) or new_len < cur:
            raise ValueError(f"new_len must be an integer >= current length {cur} of {seq_id!r}, got {new_len!r}")
        table = self._tables[seq_id]
        cow = new_len > cur and cur % self.block_size != 0 and self._ref[table[-1]] > 1
        return self.blocks_needed(new_len) - len(table) + (1 if cow else 0), cow

    def can_append(self, seq_id: Hashable, new_len: int) -> bool:
        self._check(seq_id)
        need, _ = self._append_need(seq_id, new_len)
        return need <= len(self._free)

    def append_slots(self, seq_id: Hashable, new_len: int) -> list[tuple[int, int]]:
        """Grow ``seq_id`` to ``new_len`` tokens (no-op if it already has them).

        Returns copy-on-write pairs ``(src_block, dst_block)`` the caller must copy before
        writing (empty unless the last block was shared)."""
        table = self._tables.get(seq_id)
        if table is None:
            raise UnknownSequenceError(f"unknown sequence {seq_id!r}")
        need, cow = self._append_need(seq_id, new_len)
        if need > len(self._free):
            raise OutOfBlocksError(
                f"sequence {seq_id!r} needs {need} more KV blocks to grow to {new_len} tokens, "
                f"only {len(self._free)} free"
            )
        copies: list[tuple[int, int]] = []
        if cow:
            src = table[-1]
            dst = self._take()
            self._decref(src)
            table[-1] = dst
            copies.append((src, dst))
            if self._holes.get(seq_id, 0) >= len(table):    # the copy filled a hole (a release went past the end)
                self._holes[seq_id] = len(table) - 1
        for _ in range(need - len(copies)):          # a copy-on-write block was one of `need`
            table.append(self._take())
        self._lens[seq_id] = new_len
        return copies

    def release_blocks_before(self, seq_id: Hashable, position: int) -> int:
        """Release the blocks that hold only positions < ``position`` (a sliding window moved past them).

        Their table entries become -1 (holes); the sequence keeps its length. Returns how many were released."""
        table = self._tables.get(seq_id)
        if table is None:
            raise UnknownSequenceError(f"unknown sequence {seq_id!r}")
        start = self._holes.get(seq_id, 0)
        end = min(max(position, 0) // self.block_size, len(table))
        released = 0
        for j in range(start, end):
            if table[j] >= 0:
                self._decref(table[j])
                table[j] = -1
                released += 1
        if end > start:
            self._holes[seq_id] = end
        return released

    def fork(self, parent_id: Hashable, child_id: Hashable) -> list[int]:
        """``child_id`` shares all of ``parent_id``'s blocks (ref counts incremented)."""
        self._check(parent_id)
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id!r} is already allocated")
        table = list(self._tables[parent_id])
        for b in table:
            if b >= 0:
                self._ref[b] += 1
        self._tables[child_id] = table
        self._lens[child_id] = self._lens[parent_id]
        return list(table)

    def free(self, seq_id: Hashable) -> None:
        """Release ``seq_id``; blocks return to the pool when no other sequence holds them."""
        if seq_id not in self._tables:
            raise UnknownSequenceError(f"free of unknown or already freed sequence {seq_id!r}")
        for b in reversed(self._tables.pop(seq_id)):
            if b >= 0:
                self._decref(b)
        del self._lens[seq_id]
        self._holes.pop(seq_id, None)

    # ------------------------------------------------------------------ internals
    def _check(self, seq_id: Hashable) -> None:
        if seq_id not in self._tables:
            raise UnknownSequenceError(f"unknown sequence {seq_id!r}")

    def _take(self) -> int:
        b = self._free.pop()
        assert self._ref[b] == 0
        self._ref[b] = 1
        return b

    def _decref(self, b: int) -> None:
        if self._ref[b] <= 0:
            raise RuntimeError(f"block {b} freed more times than allocated (internal accounting error)")
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._free.append(b)

    def check_invariants(self) -> None:
        """Assert internal consistency (for tests / debugging)."""
        counts = [0] * self.num_blocks
        for sid, table in self._tables.items():
            assert len(table) == self.blocks_needed(self._lens[sid]), sid
            assert all(b == -1 for b in table[:self._holes.get(sid, 0)]), f"{sid}: a block before the holes mark"
            for b in table:
                if b >= 0:
                    counts[b] += 1
        assert counts == self._ref, "ref counts do not match block tables"
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate block on the free list"
        for b in range(self.num_blocks):
            assert (b in free) == (self._ref[b] == 0), f"block {b} free-list/refcount mismatch"
