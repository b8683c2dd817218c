"""CUDA graphs of steps with prompt tokens, captured piecewise per token-count bucket (vLLM's piecewise scheme).

Under a server's load, requests arrive one or two at a time, so many steps carry a few prompt chunks next to the
decode rows. Launched op by op from Python such a "mixed" step of the `small` model cost ~26 ms on an H100 against
~2.8 ms for a graph-replayed decode step (docs/PERF.md), nearly all of it host time: ~1 000 launches, and cuBLAS
picking an algorithm for every new token count.

Only part of a mixed step depends on the step's host-side description (which sequence owns which rows, the
compressor's index plan, the attention launch plan): `DeepseekV4Model.attn_core`. Everything else is
token-parallel (`embed_tokens`, `attn_in`, `layer_out`) and sees only device tensors. So for each bucket size S
the token-parallel stages between two attention cores are captured as one graph, n_layers + 1 pieces in all:

    piece 0:  embed -> attn_in(0)
    piece k:  layer_out(k-1) -> attn_in(k)          (1 <= k < n_layers)
    piece n:  layer_out(n-1)

and a step of T <= S tokens copies its token ids and positions into the bucket's static inputs, replays piece k,
runs attn_core(k) eagerly on the first T rows of the piece's outputs, copies the attention output into the static
input of piece k+1, and so on; the logits of the sampling rows are computed eagerly at the end. Rows T..S-1 are
padding: they hold whatever token ids and positions an earlier step left (valid values), every token-parallel stage
computes them independently of the real rows, and nothing of theirs reaches a cache (attn_core sees T rows only).

Memory: every piece copies what it hands on into one of two sets of static buffers (pieces alternate between
them), shared by all buckets at the largest bucket's size; the static inputs are shared the same way. So the
graphs hold two pieces' outputs plus the pool of intermediates. (The first version kept every piece's outputs of
every bucket: 842 MiB for `small`'s 10 buckets on the H100, ~18 GB estimated for V4-Flash's 44 pieces.)

Whole-step buckets (`whole_max_tokens`, the engine's `cuda_graph_full_max_tokens`, default 256): a step is a
decode step whose rows happen to share sequences. `MixedInputs` gives every token its own row of DecodeInputs'
layout (token, position, window slot, state slot) with its own copy of its sequence's block tables, and the decode
path of every op is per row: the window write goes to the token's slot, the indexer and the attention read the
token's sequence up to the token's own position (so this step's earlier rows of that sequence too, written by the
window write and the in-graph compressors before any read), with launch plans sized for max_model_len. So the
whole step, attention included, is one graph per bucket, and the host's share of a step is building the inputs and
the compressor plans and one copy. Padding rows repeat row 0 (they write what row 0 writes); the compressor plans
are padded as above. On the H100 at c = 32 under staggered arrivals this took a `small` mixed step from 7.1-7.6 to
4.0-5.0 ms (docs/PERF.md session 24). Larger steps keep the pieces: the indexer and attention plans of the decode
path grow with the token count times max_model_len.

`capture=False` runs the same pieces eagerly through the same static buffers (CPU tests of the padding and the
wiring; graph-free debugging).

`graph_compressor` (default on; env DSV4_GRAPH_COMPRESSOR=0 turns it off for A/B runs) moves the prefill
compressors out of attn_core into the captured pieces: each step's compressor index plan is padded to fixed sizes
per bucket (`ops.compress_plan.padded_flat`, padding writes are no-ops by construction) and copied into the
bucket's static plan buffers. Their host time was ~6 ms of a ~8 ms mixed step of `small` on an H100; inside the
pieces, mixed steps went from 11.7-13.6 to 8.3-9.6 ms (H100, c=32 staggered load, docs/PERF.md session 15).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from dsv4.engine.cuda_graphs import smallest_prepared
from dsv4.engine.decode_inputs import LOGITS_ROW, POSITION, TOKEN, MixedInputs, PendingTokens, decode_batch, upload
from dsv4.engine.sampler import SamplerOutput, greedy_head
from dsv4.errors import ConfigError
from dsv4.model.deepseek_v4 import AttnInputs, DeepseekV4Model
from dsv4.ops.base import ForwardBatch, LayerCache
from dsv4.ops.compress_plan import CompressPlan, PlanBounds, compress_plan, padded_flat

log = logging.getLogger("dsv4.engine")
Tensor = torch.Tensor


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, then x1.5 / x2 steps (192, 256, 384, 512, 768, 1024, ...) up to max_tokens, and
    max_tokens itself. The boundaries 64 and 256 are where the GEMM and mHC kernels change path, so a padded
    step runs the kernels its unpadded size would."""
    if max_tokens < 1:
        raise ConfigError(f"engine setting 'cuda_graph_max_tokens' must be >= 1, got {max_tokens}")
    sizes, s = [], 16
    while s <= max_tokens:
        sizes.append(s)
        if s >= 128 and s * 3 // 2 <= max_tokens:
            sizes.append(s * 3 // 2)
        s *= 2
    if not sizes or sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sorted(set(sizes))


@dataclass
class _Piece:
    """One captured stretch between two attention cores; its outputs are the next stretch's inputs."""

    run: Callable[[], None]                  # replays the graph (or, uncaptured, runs the stages)
    h: Tensor | None = None                  # the residual streams it hands on (after embed or layer_out)
    attn: AttnInputs | None = None           # attn_in outputs (None for the last piece)
    post: Tensor | None = None
    comb: Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None  # captured: kept alive with its piece


class _OutputSlots:
    """Static buffers for what pieces hand on: two sets, piece k writes set k % 2, so piece k + 1 reads its inputs
    while writing the other set, and attn_core(k) still reads set k % 2. One buffer per (name, trailing shape,
    dtype) at `max_tokens` rows; a bucket of S tokens uses the first S rows. Buffers are allocated when the
    largest bucket's stages first run eagerly, so never inside a capture."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._sets: tuple[dict, dict] = ({}, {})

    def put(self, k: int, name: str, t: Tensor) -> Tensor:
        key = (name, tuple(t.shape[1:]), t.dtype)
        buf = self._sets[k % 2].get(key)
        if buf is None:
            buf = self._sets[k % 2][key] = torch.empty((self.max_tokens, *t.shape[1:]), dtype=t.dtype,
                                                        device=t.device)
        view = buf[:t.shape[0]]
        view.copy_(t)
        return view

    def put_attn(self, k: int, a: AttnInputs) -> AttnInputs:
        def one(name: str, t: Tensor | None) -> Tensor | None:
            return None if t is None else self.put(k, name, t)

        def pair(name: str, p: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
            return None if p is None else (self.put(k, name + ".0", p[0]), self.put(k, name + ".1", p[1]))
        return AttnInputs(q=one("q", a.q), kv=one("kv", a.kv), comp=pair("comp", a.comp),
                          idx_comp=pair("idx_comp", a.idx_comp), iq=one("iq", a.iq), head_w=one("head_w", a.head_w))


@dataclass
class _StaticPlan:
    """One compressor ratio's fixed-size index plan of a bucket: device buffer + the plan's views into it."""

    bounds: PlanBounds
    flat: Tensor
    plan: CompressPlan


@dataclass
class _Bucket:
    size: int
    token_ids: Tensor                        # [size] long, static input (a view of the shared buffer)
    positions: Tensor                        # [size] long
    o: Tensor | None                         # [size, H, head_dim]: the attention output piece k+1 reads
    pieces: list[_Piece] = field(default_factory=list)
    plans: dict[tuple, _StaticPlan] = field(default_factory=dict)   # graph_compressor: memo key -> plan
    compress_batch: ForwardBatch | None = None                      # what the captured compressors see
    whole: "_Whole | None" = None                                   # set: one graph of the whole step


@dataclass
class _Whole:
    """A bucket whose whole step is one graph: static inputs in MixedInputs' layout, logits of the first `rows`
    entries of the logits-row input. Every input (the two tables and the compressor plans) lives in one device
    buffer that one copy fills from a pinned host twin (a copy from a fresh pinned tensor cost ~90 us of host
    time each on the H100 machine, four a step)."""

    buf: Tensor                              # int64 device: i64 | i32's words | the plans' flats
    host: Tensor                             # the same layout in pinned host memory (plain memory on CPU)
    i64: Tensor                              # [5, size] long (token ids and positions are the bucket's views)
    i32: Tensor                              # [2, size, W] int32 per-token block tables
    rows: int
    plan_at: dict[tuple, int] = field(default_factory=dict)     # plan key -> offset of its flat in buf
    copied: torch.cuda.Event | None = None   # recorded after the last copy out of `host`
    run: Callable[[], None] = lambda: None
    logits: Tensor | None = None             # [rows, vocab] fp32, the graph's static output
    greedy: SamplerOutput | None = None      # greedy_head(logits), static output too
    graph: torch.cuda.CUDAGraph | None = None


class MixedGraphs:
    def __init__(self, model: DeepseekV4Model, layers: list[LayerCache], device: torch.device, sizes: list[int],
                 capture: bool = True, graph_compressor: bool | None = None, whole_max_tokens: int = 0,
                 max_model_len: int = 0, block_size: int = 128, max_rows: int | None = None):
        if capture and device.type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA device")
        self.model, self.layers, self.device = model, layers, device
        self.sizes = sorted(sizes)
        self.captured = capture
        if graph_compressor is None:
            graph_compressor = os.environ.get("DSV4_GRAPH_COMPRESSOR", "1") != "0"
        self.graph_compressor = graph_compressor
        self._slots = _OutputSlots(self.sizes[-1])
        cfg, n = model.cfg, self.sizes[-1]
        self._token_ids = torch.zeros(n, dtype=torch.long, device=device)     # static inputs, shared by buckets
        self._positions = torch.zeros(n, dtype=torch.long, device=device)
        self._o = torch.zeros((n, cfg.n_heads, cfg.head_dim), dtype=model.dtype, device=device)
        self._buckets: dict[int, _Bucket] = {}
        self.capture_seconds = 0.0
        # whole-step graphs need the compressors inside the graph (their decode path takes one token per sequence)
        # and the decode tables' bounds: block tables of max_model_len, launch plans sized for its last position
        if whole_max_tokens and not graph_compressor:
            log.warning("whole-step graphs of steps with prompt tokens need the compressors in the graphs "
                        "(DSV4_GRAPH_COMPRESSOR=0 was set): pieces only")
            whole_max_tokens = 0
        if whole_max_tokens and max_model_len < 1:
            raise ConfigError("whole-step mixed graphs need max_model_len")
        self.whole_max_tokens = whole_max_tokens
        self.width = -(-max_model_len // block_size) if max_model_len else 0
        self.max_position = max_model_len - 1
        self.max_rows = max_rows

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def bucket(self, num_tokens: int) -> int | None:
        """The smallest prepared size that holds num_tokens (None: run the step eagerly)."""
        return smallest_prepared(self.sizes, self._buckets, num_tokens)

    def whole_bucket(self, num_tokens: int) -> int | None:
        """bucket(), where that bucket replays the whole step as one graph (forward_whole), else None."""
        size = self.bucket(num_tokens)
        return size if size is not None and self._buckets[size].whole is not None else None

    # --- building --------------------------------------------------------------------------------------------
    def _stages(self, b: _Bucket, k: int, prev: _Piece | None) -> Callable[[], _Piece]:
        """The stage function of piece k of bucket b, reading the static inputs and `prev`'s outputs."""
        model, n, slots = self.model, len(self.model.layers), self._slots

        def stages() -> _Piece:
            with torch.no_grad():
                if k == 0:
                    h = model.embed_tokens(b.token_ids)
                else:
                    h = model.layer_out(b.o, prev.h, prev.post, prev.comb, k - 1, b.token_ids)
                if k == n:
                    return _Piece(run=lambda: None, h=slots.put(k, "h", h))
                if b.compress_batch is not None:
                    a, post, comb = model.attn_in(h, k, b.positions, self.layers[k], b.compress_batch)
                else:
                    a, post, comb = model.attn_in(h, k, b.positions)
                return _Piece(run=lambda: None, h=slots.put(k, "h", h), attn=slots.put_attn(k, a),
                              post=slots.put(k, "post", post), comb=slots.put(k, "comb", comb))
        return stages

    def _new_bucket(self, size: int, whole: bool = False) -> _Bucket:
        z = dict(dtype=torch.long, device=self.device)
        bounds = self._plan_keys(size) if self.graph_compressor else {}
        empties = {key: torch.from_numpy(bb.empty().flat()) for key, bb in bounds.items()}   # flat, padded
        if whole:
            # the dummy inputs of capture: every row position 0 of a sequence owning block 0 and state slot 0
            # (DecodeInputs.dummy), logits of rows 0; the plans close no window
            n64, n32 = 5 * size, size * self.width          # 2 * size * width int32 = size * width int64 words
            plan_at, at = {}, n64 + n32
            for key, bb in bounds.items():
                plan_at[key] = at
                at += bb.flat_size
            host = torch.zeros(at, dtype=torch.long, pin_memory=self.device.type == "cuda")
            for key, empty in empties.items():
                host[plan_at[key]:plan_at[key] + empty.numel()] = empty
            buf = host.to(self.device)
            w = _Whole(buf=buf, host=host, i64=buf[:n64].view(5, size),
                       i32=buf[n64:n64 + n32].view(torch.int32).view(2, size, self.width),
                       rows=min(size, self.max_rows or size), plan_at=plan_at)
            b = _Bucket(size, w.i64[TOKEN], w.i64[POSITION], None, whole=w)
        else:
            b = _Bucket(size, self._token_ids[:size], self._positions[:size], self._o[:size])
        for key, empty in empties.items():
            if whole:
                flat = b.whole.buf[b.whole.plan_at[key]:b.whole.plan_at[key] + empty.numel()]
            else:
                flat = empty.to(self.device)
            b.plans[key] = _StaticPlan(bounds[key], flat, bounds[key].views(flat))
        if self.graph_compressor:
            e = torch.zeros(0, **z)
            b.compress_batch = ForwardBatch(
                token_ids=b.token_ids, positions=b.positions, query_start=[0, size], context_lens=[0],
                state_slots=[0], swa_block_tables=[[]], comp_block_tables=[[]], swa_slot_mapping=e, logits_indices=e,
                memo={key: sp.plan for key, sp in b.plans.items()})
        return b

    def _plan_keys(self, size: int) -> dict[tuple, PlanBounds]:
        """The compressor plans a step needs (TorchOps' memo keys: ratio, block size, carry rows, device) with
        their bounds for `size` token rows."""
        keys = {}
        for i, lc in enumerate(self.layers):
            ratio = self.model.cfg.compress_ratio(i)
            for carry in (lc.comp_carry_kv, lc.index_carry_kv if ratio == 4 else None):
                if ratio and carry is not None:
                    seqs, rows = carry.shape[0], carry.shape[1]
                    keys[("compress_plan", ratio, lc.block_size, rows, carry.device)] = PlanBounds(
                        tokens=size, seqs=seqs, ratio=ratio, carry_pool_rows=seqs * rows)
        return keys

    @staticmethod
    def _step_plan(batch: ForwardBatch, key: tuple) -> CompressPlan:
        """This step's compressor plan for a plan key (ratio, block size, carry rows)."""
        _, ratio, block_size, rows, _ = key
        return compress_plan(batch, ratio, block_size, rows)

    def _load_plans(self, b: _Bucket, batch: ForwardBatch, T: int) -> None:
        """This step's compressor plans (of T token rows), padded to the bucket's bounds, into its static plan
        buffers."""
        for key, sp in b.plans.items():
            upload(sp.flat, torch.from_numpy(padded_flat(self._step_plan(batch, key), T, sp.bounds)))

    def prepare(self) -> None:
        """For each bucket, largest first: run its stages eagerly (compiles kernels, sizes the shared scratch and
        output buffers), capture its pieces in order into one memory pool (uncaptured: wire them to rerun their
        stages), then run the chain again piece by piece and check it against the eager run."""
        t0 = time.monotonic()
        n = len(self.model.layers) + 1
        reserved0 = torch.cuda.memory_reserved(self.device) if self.captured else 0
        pool = torch.cuda.graph_pool_handle() if self.captured else None
        whole = [s for s in self.sizes if s <= self.whole_max_tokens]
        for size in reversed(self.sizes):
            if size in whole:
                continue
            b = self._new_bucket(size)
            eager: list[list] = []      # digests: the pieces share their output buffers, so no copies are kept
            prev = None
            for k in range(n):
                prev = self._stages(b, k, prev)()
                eager.append(_digest(prev))
            prev = None
            for k in range(n):
                stages = self._stages(b, k, prev)
                if self.captured:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        piece = stages()
                    piece.run, piece.graph = g.replay, g
                else:
                    piece = stages()
                    piece.run = _rebinder(piece, stages)
                b.pieces.append(piece)
                prev = piece
            for k, (piece, want) in enumerate(zip(b.pieces, eager)):
                piece.run()
                for (name, s_got, a_got), (_, s_want, a_want) in zip(_digest(piece), want):
                    tol = 1e-3 * (a_want + 1.0)
                    if not (math.isfinite(a_got) and abs(s_got - s_want) <= tol and abs(a_got - a_want) <= tol):
                        self._buckets.clear()
                        raise RuntimeError(f"mixed-step piece {k} ({name}), {size} tokens, replays differently from "
                                           f"its eager run (sum {s_got:.6g} vs {s_want:.6g}, abs sum {a_got:.6g} vs "
                                           f"{a_want:.6g}): mixed-step graphs disabled")
            self._buckets[size] = b
        self._prepare_whole(whole, pool)
        self.capture_seconds = time.monotonic() - t0
        if self.captured:
            log.info("captured mixed-step CUDA graphs for %d token counts %s (whole steps up to %d tokens, %d pieces "
                     "each above) in %.1f s, %.0f MiB", len(self._buckets), self.sizes, self.whole_max_tokens, n,
                     self.capture_seconds, (torch.cuda.memory_reserved(self.device) - reserved0) / 2**20)

    def _whole_forward(self, b: _Bucket) -> Tensor:
        """The whole step of bucket b from its static inputs: compressors through the bucket's padded plans (in
        attn_in), window writes, indexer and attention through the per-token decode tables."""
        w, model, layers = b.whole, self.model, self.layers
        rows = w.i64[LOGITS_ROW, :w.rows]
        attn_batch = decode_batch(w.i64, w.i32, self.max_position, rows)
        with torch.no_grad():
            h = model.embed_tokens(b.token_ids)
            for k in range(len(model.layers)):
                a, post, comb = model.attn_in(h, k, b.positions, layers[k], b.compress_batch)
                o = model.attn_core(a, k, layers[k], attn_batch)
                h = model.layer_out(o, h, post, comb, k, b.token_ids)
            return model.logits(h, rows)

    def _prepare_whole(self, sizes: list[int], pool) -> None:
        """Whole-step buckets: every size run eagerly first (largest first: compiles, sizes the shared scratch),
        then captured, then each replay checked against its eager logits (uncaptured: rerun on every step)."""
        eager: dict[int, Tensor] = {}
        buckets = {size: self._new_bucket(size, whole=True) for size in reversed(sizes)}
        for size, b in buckets.items():
            eager[size] = self._whole_forward(b).clone()
        for size, b in buckets.items():
            w = b.whole
            if self.captured:
                torch.cuda.synchronize(self.device)
                w.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(w.graph, pool=pool):
                    w.logits = self._whole_forward(b)
                    w.greedy = greedy_head(w.logits)
                w.run = w.graph.replay
            else:
                w.run = _whole_rerun(self, b)
        for size, b in buckets.items():
            b.whole.run()
            got, want = b.whole.logits, eager[size]
            if not (torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-3, atol=1e-3)):
                self._buckets.clear()
                raise RuntimeError(f"whole-step mixed graph of {size} tokens replays differently from its eager run "
                                   f"(max |diff| {(got - want).abs().max().item():.3g}): mixed-step graphs disabled")
            self._buckets[size] = b

    # --- running ---------------------------------------------------------------------------------------------
    def forward_whole(self, inputs: MixedInputs,
                      pending: PendingTokens | None = None) -> tuple[Tensor, SamplerOutput]:
        """(FP32 logits [len(inputs.sampling), vocab], their greedy_head) of a step built for a whole-step bucket
        (MixedInputs.build at whole_bucket()'s size): views of the graph's static outputs, to consume before the
        next replay. `pending`: input tokens still on the device, by token row (their rows in `inputs` hold
        placeholders)."""
        S = inputs.i64.shape[1]
        b = self._buckets.get(S)
        if b is None or b.whole is None:
            raise ValueError(f"no whole-step mixed graph of {S} token rows")
        w = b.whole
        if len(inputs.sampling) > w.rows:
            raise ValueError(f"{len(inputs.sampling)} sampling rows exceed the {w.rows} of the {S}-token graph")
        if w.copied is not None:
            w.copied.synchronize()      # the last step's copy out of `host` (done by now: such steps drain first)
        host = w.host.numpy()
        n64, n32 = w.i64.numel(), w.i32.numel() // 2
        host[:n64] = inputs.i64.ravel()
        host[n64:n64 + n32].view(np.int32)[:] = inputs.i32.ravel()
        for key, sp in b.plans.items():       # the padded plans straight into their place in `host`
            at = w.plan_at[key]
            padded_flat(self._step_plan(inputs.plan_batch, key), inputs.num_tokens, sp.bounds,
                        host[at:at + sp.bounds.flat_size])
        if self.device.type == "cuda":
            w.buf.copy_(w.host, non_blocking=True)
            w.copied = torch.cuda.Event()
            w.copied.record()
        else:
            w.buf.copy_(w.host)
        if pending is not None:
            pending.apply(w.i64[TOKEN], inputs.num_tokens)
        w.run()
        n = len(inputs.sampling)
        return w.logits[:n], SamplerOutput(w.greedy.token_ids[:n], w.greedy.logprobs[:n])

    def forward(self, batch: ForwardBatch) -> Tensor:
        """FP32 logits [len(batch.logits_indices), vocab] of a step of at most max_tokens tokens."""
        T = batch.token_ids.shape[0]
        size = self.bucket(T)
        if size is None:
            raise ValueError(f"a step of {T} tokens has no mixed-step graph (largest {self.max_tokens})")
        b = self._buckets[size]
        b.token_ids[:T].copy_(batch.token_ids)
        b.positions[:T].copy_(batch.positions)
        if b.plans:
            self._load_plans(b, batch, T)
        model = self.model
        with torch.no_grad():
            for k, piece in enumerate(b.pieces):
                piece.run()
                if piece.attn is not None:
                    b.o[:T].copy_(model.attn_core(piece.attn.rows(T), k, self.layers[k], batch))
            return model.logits(b.pieces[-1].h[:T], batch.logits_indices)


def _whole_rerun(graphs: MixedGraphs, b: _Bucket) -> Callable[[], None]:
    def run() -> None:
        b.whole.logits = graphs._whole_forward(b)
        b.whole.greedy = greedy_head(b.whole.logits)
    return run


def _rebinder(piece: _Piece, stages: Callable[[], _Piece]) -> Callable[[], None]:
    """Uncaptured pieces: rerun the stages and point the piece at the fresh outputs (the next piece's stages read
    them through the same _Piece object)."""
    def run() -> None:
        fresh = stages()
        piece.h, piece.attn, piece.post, piece.comb = fresh.h, fresh.attn, fresh.post, fresh.comb
    return run


def _digest(piece: _Piece) -> list[tuple[str, float, float]]:
    """(name, sum, sum of magnitudes) in float64 of every tensor a piece hands on: what the capture check compares
    (the outputs themselves are overwritten two pieces later)."""
    named = [("h", piece.h)]
    if piece.attn is not None:
        a = piece.attn
        named += [("post", piece.post), ("comb", piece.comb), ("q", a.q), ("kv", a.kv), ("iq", a.iq),
                  ("head_w", a.head_w)]
        for name in ("comp", "idx_comp"):
            pair = getattr(a, name)
            if pair is not None:
                named += [(name + ".0", pair[0]), (name + ".1", pair[1])]
    out = []
    for name, t in named:
        if t is not None:
            x = t.double()
            out.append((name, x.sum().item(), x.abs().sum().item()))
    return out
