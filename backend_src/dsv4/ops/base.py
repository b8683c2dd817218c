"""The operations the DeepSeek-V4 model definition is written against.

The model (dsv4.model) calls only these; `TorchOps` implements them in plain PyTorch (CPU or GPU) and `CuteOps`
replaces the hot ones with CuTe DSL kernels on Hopper. Every op works on flattened token batches: T tokens of B
sequences, described by a `ForwardBatch`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dsv4.config import RopeConfig
from dsv4.ops.fp8_rows import Fp8Rows

Tensor = torch.Tensor


@dataclass
class DecodeTables:
    """Device-side description of a decode-only step (one new token per sequence), so that the ops need no host
    lists and no host synchronisation: what a CUDA graph replays. Rows may be padding copies of row 0 (every write
    they make repeats row 0's, so the caches see identical values)."""

    state_slots: Tensor          # [B] long
    swa_block_tables: Tensor     # [B, W] int32, -1 where released / unallocated
    comp_block_tables: Tensor    # [B, W] int32
    seq_index: Tensor            # [B] int32: 0 .. B-1 (token t belongs to sequence t)
    max_position: int            # upper bound of every position in the batch (sizes kernel launch plans)


@dataclass
class ForwardBatch:
    """One engine step: for sequence b, tokens [query_start[b], query_start[b+1]) of the flat batch sit at
    positions context_lens[b] ... context_lens[b] + n_b - 1."""

    token_ids: Tensor            # [T] long
    positions: Tensor            # [T] long
    query_start: list[int]       # [B + 1]
    context_lens: list[int]      # [B] tokens already in the cache before this step
    state_slots: list[int]       # [B] row of the per-sequence state tensors (compressor carry)
    swa_block_tables: list[list[int]]   # [B][...] window-cache block of each logical block (-1: released)
    comp_block_tables: list[list[int]]  # [B][...] compressed-cache block of each logical block
    swa_slot_mapping: Tensor     # [T] long: flat slot of each token's raw KV in the window cache
    logits_indices: Tensor       # [B'] long: flat token rows whose logits are needed
    decode: DecodeTables | None = None  # set for decode-only steps: ops take the device-side path
    # what the ops derive from this step's batch once and share across layers (e.g. the compressor's index plan
    # on the device: ~8 layers of a step need the same two)
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def seq_len(self, b: int) -> int:
        return self.context_lens[b] + self.query_start[b + 1] - self.query_start[b]


@dataclass
class LayerCache:
    """The cache tensors of one layer (views into the engine's pools)."""

    swa_kv: Tensor                         # [num_swa_blocks, block_size, head_dim]
    block_size: int
    comp_kv: Tensor | None = None          # [num_comp_blocks, block_size // ratio, head_dim]
    comp_carry_kv: Tensor | None = None    # [num_slots, (1+overlap) * ratio, (1+overlap) * head_dim] fp32
    comp_carry_score: Tensor | None = None
    index_k: Tensor | None = None          # [num_comp_blocks, block_size // 4, index_head_dim]
    index_carry_kv: Tensor | None = None
    index_carry_score: Tensor | None = None
    kv_rows: Fp8Rows | None = None         # set: swa_kv and comp_kv hold FP8 rows (uint8 [..., row_bytes])
    index_rows: Fp8Rows | None = None      # set: index_k holds FP8 rows


class Ops(ABC):
    """Interface; weights are prepared by the ops so that each implementation picks its own layout."""

    name: str = "abstract"
    supports_cuda_graphs: bool = False   # decode steps run without host synchronisation (see engine.cuda_graphs)

    def reserve_positions(self, n: int) -> None:
        """Every position will be < n (lets implementations precompute tables instead of checking per call)."""

    def concurrently(self, *pieces: Callable[[], Any]) -> tuple[Any, ...]:
        """Run independent pieces of a step -> their results, in order. Here one after the other; a GPU
        implementation may run all but the first on side streams, so that the small kernels of each overlap (decode at
        batch 1 is a chain of kernels too small to fill the GPU). No piece may read what another writes."""
        return tuple(p() for p in pieces)

    # --- weights ---------------------------------------------------------------------------------------------
    @abstractmethod
    def prepare_linear(self, weight: Any) -> Any:
        """Checkpoint tensor (dense or quantised) -> the handle `linear` takes."""

    @abstractmethod
    def prepare_grouped_linear(self, weight: Any, groups: int) -> Any:
        """Checkpoint tensor [groups * R, K] of a block-diagonal projection -> the handle `grouped_linear` takes."""

    @abstractmethod
    def prepare_experts(self, w1: list[Any], w2: list[Any], w3: list[Any]) -> Any:
        """Routed experts' checkpoint tensors -> the handle `moe` takes."""

    # --- dense math ------------------------------------------------------------------------------------------
    @abstractmethod
    def linear(self, x: Tensor, w: Any) -> Tensor: ...

    def prepare_linear_stack(self, weights: list[Any]) -> Any:
        """Several projections of one input, prepared so that `linear_stack` may compute them in one pass (CuteOps
        stacks BF16 ones into one GEMV); here simply each one prepared."""
        return tuple(self.prepare_linear(w) for w in weights)

    def linear_stack(self, x: Tensor, stack: Any) -> tuple[Tensor, ...]:
        """(x @ W_0^T, x @ W_1^T, ...) for a `prepare_linear_stack` result."""
        return tuple(self.linear(x, w) for w in stack)

    def lm_head(self, x: Tensor, w: Any) -> Tensor:
        """FP32 logits x @ head^T (DeepSeek computes the LM head in FP32)."""
        return self.linear(x, w).float()

    @abstractmethod
    def grouped_linear(self, x: Tensor, w: Any) -> Tensor:
        """x [T, groups * K] -> [T, groups * R]: group g's rows of the weight times x's g-th K-slice (V4's wo_a)."""

    @abstractmethod
    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor: ...

    @abstractmethod
    def rope_tail(self, x: Tensor, positions: Tensor, rope: RopeConfig, rope_dim: int, inverse: bool = False) -> Tensor: ...

    def norm_rope_tail(self, x: Tensor, weight: Tensor | None, eps: float, positions: Tensor, rope: RopeConfig,
                       rope_dim: int) -> Tensor:
        """rope_tail(rms_norm(x, weight, eps), ...): the queries' per-head norm and the keys' norm come right before
        their rotation, and a GPU implementation may fuse the two."""
        return self.rope_tail(self.rms_norm(x, weight, eps), positions, rope, rope_dim)

    @abstractmethod
    def hc_pre(self, streams: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, iters: int,
               hc_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """Collapse the residual streams [T, N, D] -> (sub-layer input [T, D], post [T, N], comb [T, N, N])."""

    def hc_pre_split(self, streams: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, iters: int,
                     hc_eps: float, norm_weight: Tensor | None = None
                     ) -> tuple[Tensor, Callable[[], tuple[Tensor, Tensor]]]:
        """hc_pre as (sub-layer input, a piece that yields (post, comb)). The sub-layer needs x at once but post
        and comb only at its hc_post, so the model hands the piece to `concurrently`. With `norm_weight` x comes
        back as the sub-layer's rms_norm(x, norm_weight, norm_eps). Here it all runs now."""
        x, post, comb = self.hc_pre(streams, fn, scale, base, norm_eps, iters, hc_eps)
        if norm_weight is not None:
            x = self.rms_norm(x, norm_weight, norm_eps)
        return x, lambda: (post, comb)

    @abstractmethod
    def hc_post(self, y: Tensor, streams: Tensor, post: Tensor, comb: Tensor) -> Tensor: ...

    def hc_post_sum(self, y: Tensor, y2: Tensor, streams: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """hc_post(y + y2, ...): a sub-layer whose output comes in two parts (the MoE's routed and shared experts),
        summed in y's dtype. Backends may fuse the add into their hc_post."""
        return self.hc_post(y + y2, streams, post, comb)

    def linear_hc_post(self, x: Tensor, w: Any, streams: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """hc_post(linear(x, w), ...): a sub-layer's output projection and the stream update after it. Backends may
        hand the projection's split-K partials to the update unreduced."""
        return self.hc_post(self.linear(x, w), streams, post, comb)

    @abstractmethod
    def hc_head(self, streams: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, hc_eps: float) -> Tensor: ...

    @abstractmethod
    def route(self, x: Tensor, gate: Tensor, gate_bias: Tensor | None, tid2eid: Tensor | None, token_ids: Tensor,
              topk: int, score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
        """MoE gate: (expert ids [T, topk] int64, weights [T, topk] fp32). Hash layers (`tid2eid`) take the ids
        from the token id; the others the top-k of score + bias. Weights are the unbiased scores, normalised for
        non-softmax scores, times route_scale."""

    @abstractmethod
    def moe(self, x: Tensor, expert_ids: Tensor, expert_weights: Tensor, experts: Any, swiglu_limit: float) -> Tensor:
        """Routed experts only: sum_k w[t,k] * expert_{ids[t,k]}(x[t])."""

    @abstractmethod
    def swiglu_mlp(self, x: Tensor, w13: Any, w2: Any, swiglu_limit: float) -> Tensor:
        """w2 @ swiglu(w1 x, w3 x): `w13` is prepare_linear_stack([w1, w3]) (the gate and up projections of x)."""

    # --- cache and attention ---------------------------------------------------------------------------------
    @abstractmethod
    def store_window_kv(self, kv: Tensor, cache: LayerCache, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def compress_and_store(self, kv: Tensor, score: Tensor, ape: Tensor, norm_weight: Tensor, norm_eps: float,
                           ratio: int, rope: RopeConfig, rope_dim: int, carry_kv: Tensor, carry_score: Tensor,
                           out: Tensor, block_size: int, batch: ForwardBatch) -> None:
        """Pool closed windows of `ratio` tokens (projections kv/score [T, coff*d]) into entries of `out`, carrying
        incomplete windows (and, for the overlapping ratio 4, the previous window) in the per-sequence state. A
        uint8 `out` holds FP8 rows (Fp8Rows(d, rope_dim))."""

    @abstractmethod
    def indexer_topk(self, q: Tensor, head_weights: Tensor, index_k: Tensor, block_size: int, topk: int,
                     batch: ForwardBatch, key_rows: Fp8Rows | None = None, head_scale: float = 1.0) -> Tensor:
        """-> [T, topk] compressed-entry numbers each query attends (-1 = none), ratio 4. `key_rows`: index_k holds
        FP8 rows of that format. The heads' weights are head_weights.float() * head_scale (computed only where the
        entries are scored: where every visible entry is taken, nothing needs them)."""

    @abstractmethod
    def sparse_attention(self, q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                         sink: Tensor, scale: float, batch: ForwardBatch,
                         out_rope: tuple[RopeConfig, int] | None = None) -> Tensor:
        """q [T, H, d] over the window KV plus compressed entries (all visible for HCA, `topk_entries` for CSA).
        With `out_rope` (rope, rope_dim) the output's RoPE'd tail comes back rotated to position 0, as
        rope_tail(o, batch.positions, rope, rope_dim, inverse=True) gives it (a GPU path fuses the two)."""
