"""The paged caches of every kind of state DeepSeek-V4 keeps per request, and their block accounting.

Two pools of equal block count, each block covering `block_size` token positions of one sequence:
- window pool: the raw KV (after norm and RoPE) of every layer, [layers, blocks, block_size, head_dim]. Only the
  last `window_size` positions are ever read, so blocks that slide out of the window are released while the
  request runs (its block table then holds -1 there).
- compressed pool: per compressed layer, the entries of the windows inside the block's positions
  ([blocks, block_size // ratio, head_dim]), and for CSA layers the indexer keys ([blocks, block_size // 4,
  index_head_dim]).
With `fp8=True` every cached vector is an FP8 row (dsv4.ops.fp8_rows: e4m3 non-RoPE channels with power-of-two
scales per 64, BF16 RoPE channels; 584 bytes for head_dim 512 instead of 1024 in BF16) in uint8 pools; the ops
quantize on write and dequantize on read (LayerCache.kv_rows / index_rows say how).
The compressor carry (rows of the incomplete window, and for ratio 4 the previous window) is per running sequence,
not per block: it lives in `max_num_seqs` state slots, like recurrent state in vLLM, and is rebuilt by recompute
after a preemption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

import torch

from dsv4.config import ModelConfig, ceil_div
from dsv4.engine.block_manager import BlockManager
from dsv4.errors import OutOfBlocksError
from dsv4.ops.base import LayerCache
from dsv4.ops.fp8_rows import Fp8Rows


@dataclass(frozen=True)
class CacheShape:
    """Bytes of one block of each pool and of one state slot, for sizing from a memory budget."""

    window_block_bytes: int
    compressed_block_bytes: int
    state_slot_bytes: int

    @classmethod
    def of(cls, cfg: ModelConfig, block_size: int, dtype: torch.dtype, fp8: bool = False) -> "CacheShape":
        es = torch.empty((), dtype=dtype).element_size()

        def row(d: int) -> int:
            return Fp8Rows(d, cfg.rope_head_dim).row_bytes if fp8 else d * es

        window = cfg.n_layers * block_size * row(cfg.head_dim)
        comp = state = 0
        for i in range(cfg.n_layers):
            r = cfg.compress_ratio(i)
            if not r:
                continue
            comp += block_size // r * row(cfg.head_dim)
            coff = 2 if r == 4 else 1
            state += 2 * coff * r * coff * cfg.head_dim * 4
            if r == 4:
                comp += block_size // 4 * row(cfg.index_head_dim)
                state += 2 * 2 * 4 * 2 * cfg.index_head_dim * 4
        return cls(window, comp, state)

    @property
    def block_bytes(self) -> int:
        return self.window_block_bytes + self.compressed_block_bytes


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, max_seqs: int,
                 device: torch.device, dtype: torch.dtype, fp8: bool = False):
        if block_size % 128:
            raise ValueError(f"block_size must be a multiple of 128 (the largest compress ratio), got {block_size}")
        self.cfg, self.block_size, self.num_blocks = cfg, block_size, num_blocks
        self.device = torch.device(device)
        self.window = BlockManager(num_blocks, block_size)
        self.compressed = BlockManager(num_blocks, block_size)
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._slot_of: dict[Hashable, int] = {}
        hd, L = cfg.head_dim, cfg.n_layers
        self.fp8 = fp8
        kv_rows = Fp8Rows(hd, cfg.rope_head_dim) if fp8 else None
        index_rows = Fp8Rows(cfg.index_head_dim, cfg.rope_head_dim) if fp8 else None

        def pool(*shape: int, rows: Fp8Rows | None) -> torch.Tensor:
            if rows is None:
                return torch.zeros(shape, dtype=dtype, device=device)
            return torch.zeros((*shape[:-1], rows.row_bytes), dtype=torch.uint8, device=device)

        self.window_kv = pool(L, num_blocks, block_size, hd, rows=kv_rows)
        self.layers: list[LayerCache] = []
        for i in range(L):
            lc = LayerCache(swa_kv=self.window_kv[i], block_size=block_size, kv_rows=kv_rows)
            r = cfg.compress_ratio(i)
            if r:
                coff = 2 if r == 4 else 1
                lc.comp_kv = pool(num_blocks, block_size // r, hd, rows=kv_rows)
                lc.comp_carry_kv = torch.zeros((max_seqs, coff * r, coff * hd), dtype=torch.float32, device=device)
                lc.comp_carry_score = torch.full_like(lc.comp_carry_kv, -math.inf)
            if r == 4:
                ihd = cfg.index_head_dim
                lc.index_k = pool(num_blocks, block_size // 4, ihd, rows=index_rows)
                lc.index_rows = index_rows
                lc.index_carry_kv = torch.zeros((max_seqs, 8, 2 * ihd), dtype=torch.float32, device=device)
                lc.index_carry_score = torch.full_like(lc.index_carry_kv, -math.inf)
            self.layers.append(lc)

    @classmethod
    def blocks_for_budget(cls, cfg: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int,
                          max_seqs: int, fp8: bool = False) -> int:
        shape = CacheShape.of(cfg, block_size, dtype, fp8)
        n = (budget_bytes - max_seqs * shape.state_slot_bytes) // shape.block_bytes
        if n < 2:
            raise ValueError(f"a KV-cache budget of {budget_bytes} bytes holds fewer than 2 blocks of "
                             f"{shape.block_bytes} bytes (plus {max_seqs} state slots of {shape.state_slot_bytes}); "
                             "raise kv_cache_memory_bytes or lower max_num_seqs")
        return int(n)

    # --- accounting --------------------------------------------------------------------------------------------
    @property
    def blocks_in_use(self) -> int:
        return self.window.num_used + self.compressed.num_used

    @property
    def blocks_total(self) -> int:
        return 2 * self.num_blocks

    @property
    def free_state_slots(self) -> int:
        return len(self._free_slots)

    def blocks_needed(self, seq_id: Hashable | None, new_len: int) -> int:
        """Blocks per pool that growing `seq_id` (None: a new sequence) to new_len tokens would take."""
        have = self.compressed.table_length(seq_id, default=0) if seq_id is not None else 0
        return max(0, ceil_div(new_len, self.block_size) - have)

    def can_grow(self, seq_id: Hashable | None, new_len: int) -> bool:
        need = self.blocks_needed(seq_id, new_len)
        if seq_id is None and not self._free_slots:
            return False
        return need == 0 or (need <= self.window.num_free and need <= self.compressed.num_free)

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def add(self, seq_id: Hashable, clear_state: bool = True) -> int:
        """Register a sequence (no tokens yet); returns its state slot, cleared unless `clear_state` is False (then
        the caller clears it with clear_state() before the sequence's first step: one call for many slots)."""
        if not self._free_slots:
            raise OutOfBlocksError("no free sequence state slot (max_num_seqs running)")
        slot = self._free_slots.pop()
        self._slot_of[seq_id] = slot
        self.window.allocate(seq_id, 0)
        self.compressed.allocate(seq_id, 0)
        if clear_state:
            self.clear_state([slot])
        return slot

    def clear_state(self, slots: list[int]) -> None:
        """Reset the compressor carry of these state slots (a fresh sequence has no partial window)."""
        if not slots:
            return
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        for lc in self.layers:
            for carry_kv, carry_score in ((lc.comp_carry_kv, lc.comp_carry_score),
                                          (lc.index_carry_kv, lc.index_carry_score)):
                if carry_kv is not None:
                    carry_kv.index_fill_(0, idx, 0.0)
                    carry_score.index_fill_(0, idx, -math.inf)

    def grow(self, seq_id: Hashable, new_len: int) -> None:
        if not self.try_grow(seq_id, new_len):
            raise OutOfBlocksError(f"not enough free KV blocks to grow sequence {seq_id!r} to {new_len} tokens")

    def try_grow(self, seq_id: Hashable, new_len: int) -> bool:
        """grow() if can_grow(), returning whether it did (the scheduler's per-sequence step: one check, not two)."""
        if not self.can_grow(seq_id, new_len):
            return False
        self.window.append_slots(seq_id, new_len)
        self.compressed.append_slots(seq_id, new_len)
        return True

    def release_window(self, seq_id: Hashable, seq_len: int) -> None:
        """After a step: free window blocks no future query of this sequence can see (position < len - window + 1)."""
        self.window.release_blocks_before(seq_id, seq_len - self.cfg.window_size + 1)

    def free(self, seq_id: Hashable) -> None:
        self.window.free(seq_id)
        self.compressed.free(seq_id)
        self._free_slots.append(self._slot_of.pop(seq_id))

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._slot_of

    def slot(self, seq_id: Hashable) -> int:
        return self._slot_of[seq_id]

    def slots(self, seq_ids: list[Hashable]) -> list[int]:
        """slot() of each of `seq_ids`."""
        return [self._slot_of[s] for s in seq_ids]

    def window_slots(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        return self.window.slot_mapping(seq_id, start, end)
