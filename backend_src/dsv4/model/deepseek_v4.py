"""DeepSeek-V4, the one model definition the engine runs, written against `dsv4.ops.Ops`.

It processes a flat batch of tokens from many sequences (chunked prefill and decode alike) over the paged caches:
every layer first writes what the step produced (window KV, compressed entries, indexer keys, compressor carry)
and attention then reads only from the cache. Formulas: docs/MODEL.md; the oracle is dsv4/reference.py.
The MTP layers are loaded but not run: this engine does not speculate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from dsv4.config import ModelConfig
from dsv4.ops.base import ForwardBatch, LayerCache, Ops

Tensor = torch.Tensor


@dataclass
class CompressorWeights:
    ape: Tensor
    norm: Tensor


@dataclass
class LayerWeights:
    hc: dict[str, tuple[Tensor, Tensor, Tensor]]   # sub-layer -> (fn, scale, base)
    attn_norm: Tensor
    ffn_norm: Tensor
    qkv_a: Any            # wq_a and wkv (the projections of x), one ops.prepare_linear_stack
    q_norm: Tensor
    q_b: Any              # wq_b, at ratio 4 also the indexer's wq_b (the projections of the query latent): one stack
    kv_norm: Tensor
    wo_a: Any             # grouped projection: o_groups x [o_lora_rank, heads*head_dim/groups] (ops.grouped_linear)
    wo_b: Any
    sink: Tensor
    compressor: CompressorWeights | None
    idx_compressor: CompressorWeights | None
    # the compressed layers' projections of x, one ops.prepare_linear_stack: compressor wkv, wgate; ratio 4 also
    # the indexer compressor's wkv, wgate and the indexer's weights_proj
    x_proj: Any | None
    gate: Tensor          # [E, D] fp32
    gate_bias: Tensor | None
    tid2eid: Tensor | None
    experts: Any
    shared: tuple[Any, Any]   # (w1 and w3 as one ops.prepare_linear_stack, w2): the shared expert


@dataclass
class AttnInputs:
    """What layer i's token-parallel part hands its attention (`DeepseekV4Model.attn_in` -> `attn_core`)."""

    q: Tensor                                     # [T, H, head_dim], normed, RoPE'd
    kv: Tensor | None                             # [T, head_dim] window KV, normed, RoPE'd (None: stored already)
    comp: tuple[Tensor, Tensor] | None = None     # compressor (kv, score) projections (compressed layers)
    idx_comp: tuple[Tensor, Tensor] | None = None  # indexer compressor projections (ratio 4)
    iq: Tensor | None = None                      # indexer queries [T, index_heads, index_head_dim] (ratio 4)
    head_w: Tensor | None = None                  # indexer head weights' projection [T, index_heads] (ratio 4)

    def rows(self, n: int) -> AttnInputs:
        """The first n token rows of every tensor (views)."""
        cut = lambda t: None if t is None else t[:n]          # noqa: E731
        pair = lambda p: None if p is None else (p[0][:n], p[1][:n])  # noqa: E731
        return AttnInputs(q=self.q[:n], kv=cut(self.kv), comp=pair(self.comp), idx_comp=pair(self.idx_comp),
                          iq=cut(self.iq), head_w=cut(self.head_w))


class DeepseekV4Model:
    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, Any], ops: Ops, device: torch.device,
                 dtype: torch.dtype):
        self.cfg, self.ops, self.device, self.dtype = cfg, ops, device, dtype

        def small(name: str, dt: torch.dtype = torch.float32) -> Tensor:
            t = tensors[name]
            if not isinstance(t, torch.Tensor):  # a quantised container
                t = t.dequantize(torch.float32)
            return t.to(device=device, dtype=dt) if t.is_floating_point() else t.to(device)

        def lin(name: str) -> Any:
            return ops.prepare_linear(tensors[f"{name}.weight"])

        def stack(*names: str) -> Any:
            return ops.prepare_linear_stack([tensors[f"{n}.weight"] for n in names])

        def compressor(p: str) -> CompressorWeights:
            return CompressorWeights(ape=small(f"{p}.ape"), norm=small(f"{p}.norm.weight"))

        def x_projections(a: str, ratio: int) -> Any:
            names = [f"{a}.compressor.wkv", f"{a}.compressor.wgate"]
            if ratio == 4:
                names += [f"{a}.indexer.compressor.wkv", f"{a}.indexer.compressor.wgate", f"{a}.indexer.weights_proj"]
            return stack(*names)

        self.embed = small("embed.weight", dtype)
        self.head = lin("head")
        self.norm = small("norm.weight")
        self.hc_head = (small("hc_head_fn"), small("hc_head_scale"), small("hc_head_base"))
        self.layers: list[LayerWeights] = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}"
            a, f = f"{p}.attn", f"{p}.ffn"
            ratio = cfg.compress_ratio(i)
            E = cfg.n_routed_experts
            wo_a = ops.prepare_grouped_linear(tensors[f"{a}.wo_a.weight"], cfg.o_groups)
            self.layers.append(LayerWeights(
                hc={s: (small(f"{p}.hc_{s}_fn"), small(f"{p}.hc_{s}_scale"), small(f"{p}.hc_{s}_base"))
                    for s in ("attn", "ffn")},
                attn_norm=small(f"{p}.attn_norm.weight"), ffn_norm=small(f"{p}.ffn_norm.weight"),
                qkv_a=stack(f"{a}.wq_a", f"{a}.wkv"), q_norm=small(f"{a}.q_norm.weight"),
                q_b=stack(f"{a}.wq_b", *([f"{a}.indexer.wq_b"] if ratio == 4 else [])),
                kv_norm=small(f"{a}.kv_norm.weight"), wo_a=wo_a, wo_b=lin(f"{a}.wo_b"),
                sink=small(f"{a}.attn_sink"),
                compressor=compressor(f"{a}.compressor") if ratio else None,
                idx_compressor=compressor(f"{a}.indexer.compressor") if ratio == 4 else None,
                x_proj=x_projections(a, ratio) if ratio else None,
                gate=small(f"{f}.gate.weight"),
                gate_bias=None if cfg.is_hash_layer(i) else small(f"{f}.gate.bias"),
                tid2eid=small(f"{f}.gate.tid2eid").long() if cfg.is_hash_layer(i) else None,
                experts=ops.prepare_experts([tensors[f"{f}.experts.{e}.w1.weight"] for e in range(E)],
                                            [tensors[f"{f}.experts.{e}.w2.weight"] for e in range(E)],
                                            [tensors[f"{f}.experts.{e}.w3.weight"] for e in range(E)]),
                shared=(stack(f"{f}.shared_experts.w1", f"{f}.shared_experts.w3"), lin(f"{f}.shared_experts.w2")),
            ))

    # --- stages of one step ------------------------------------------------------------------------------------
    # A step is embed -> per layer (attn_in, attn_core, layer_out) -> logits. attn_core is the only stage that
    # reads the step's host-side batch description or touches the caches; the others are token-parallel and see
    # only device tensors, which is what lets engine.mixed_graphs capture them in CUDA graphs per token count.
    def embed_tokens(self, token_ids: Tensor) -> Tensor:
        """-> residual streams [T, hc_mult, D]."""
        return self.embed[token_ids][:, None, :].expand(-1, self.cfg.hc_mult, -1).contiguous()

    def attn_in(self, h: Tensor, i: int, positions: Tensor, cache: LayerCache | None = None,
                compress_batch: ForwardBatch | None = None,
                write_batch: ForwardBatch | None = None) -> tuple[AttnInputs, Tensor, Tensor]:
        """Layer i's attention sub-layer up to the cache: mHC collapse, norm, projections, RoPE.
        -> (attention inputs, mHC post [T, N], mHC comb [T, N, N]). With `cache` and a `compress_batch` whose memo
        holds fixed-size compressor plans (engine.mixed_graphs), the compressors run here too (their cache writes
        are then part of a captured piece) and the returned inputs carry no compressor projections. With `cache`
        and `write_batch` (a whole step run here, as `forward` does) the cache writes happen inside the pieces, beside
        the queries' longer chain instead of after it: the window KV right after its RoPE, the compressors right after
        their projections; the inputs then carry neither kv nor compressor projections."""
        cfg, ops, L = self.cfg, self.ops, self.layers[i]
        fn, scale, base = L.hc["attn"]
        x, hc_coefficients = ops.hc_pre_split(h, fn, scale, base, cfg.norm_eps, cfg.hc_sinkhorn_iters, cfg.hc_eps,
                                              norm_weight=L.attn_norm)
        T = x.shape[0]
        H, hd, rd = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        ratio = cfg.compress_ratio(i)
        rope = cfg.rope_for_layer(i)
        nh, ihd = cfg.index_n_heads, cfg.index_head_dim

        def queries(q_a: Tensor) -> tuple[Tensor, Tensor | None]:
            q_b = ops.linear_stack(ops.rms_norm(q_a, L.q_norm, cfg.norm_eps), L.q_b)
            q = ops.norm_rope_tail(q_b[0].view(T, H, hd), None, cfg.norm_eps, positions, rope, rd)
            if ratio != 4:
                return q, None
            return q, ops.rope_tail(q_b[1].view(T, nh, ihd), positions, rope, rd)

        def keys(kv_a: Tensor) -> Tensor | None:
            kv = ops.norm_rope_tail(kv_a, L.kv_norm, cfg.norm_eps, positions, rope, rd)
            if write_batch is None:
                return kv
            ops.store_window_kv(kv, cache, write_batch)
            return None

        def queries_and_keys() -> tuple[tuple[Tensor, Tensor | None], Tensor | None]:
            q_a, kv_a = ops.linear_stack(x, L.qkv_a)
            return ops.concurrently(lambda: queries(q_a), lambda: keys(kv_a))

        def x_projections() -> tuple[Any, Any, Tensor | None]:
            """(compressor (kv, score), indexer compressor (kv, score) or None, the indexer head weights' projection
            or None): one pass over the stacked weight (a decode step's one GEMV on CuteOps). With write_batch the
            compressors run here, and their projections are not returned."""
            p = ops.linear_stack(x, L.x_proj)
            comp, idx_comp = (p[0], p[1]), ((p[2], p[3]) if ratio == 4 else None)
            if write_batch is not None:
                self._compress(comp, idx_comp, i, cache, write_batch)
                comp = idx_comp = None
            return comp, idx_comp, p[4] if ratio == 4 else None

        if ratio:
            ((q, iq), kv), (post, comb), (comp, idx_comp, head_w) = ops.concurrently(queries_and_keys,
                                                                                     hc_coefficients, x_projections)
        else:
            ((q, iq), kv), (post, comb) = ops.concurrently(queries_and_keys, hc_coefficients)
            comp = idx_comp = head_w = None
        a = AttnInputs(q=q, kv=kv, comp=comp, idx_comp=idx_comp, iq=iq, head_w=head_w)
        if compress_batch is not None and a.comp is not None:
            self._compress(a.comp, a.idx_comp, i, cache, compress_batch)
            a.comp = a.idx_comp = None
        return a, post, comb

    def attn_core(self, a: AttnInputs, i: int, cache: LayerCache, batch: ForwardBatch) -> Tensor:
        """Layer i's cache writes (window KV unless attn_in wrote it, compressed entries, indexer keys) and its
        attention over the cache -> o [T, H, head_dim], its RoPE'd tail rotated back (to position 0)."""
        cfg, ops, L = self.cfg, self.ops, self.layers[i]
        ratio = cfg.compress_ratio(i)
        if a.kv is not None:
            ops.store_window_kv(a.kv, cache, batch)
        topk = None
        if a.comp is not None:
            self._compress(a.comp, a.idx_comp, i, cache, batch)
        if ratio == 4:
            topk = ops.indexer_topk(a.iq, a.head_w, cache.index_k, cache.block_size, cfg.index_topk, batch,
                                    key_rows=cache.index_rows,
                                    head_scale=cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5)
        return ops.sparse_attention(a.q, cache, ratio, cfg.window_size, topk, L.sink, cfg.head_dim ** -0.5, batch,
                                    out_rope=(cfg.rope_for_layer(i), cfg.rope_head_dim))

    def _compress(self, comp: tuple[Tensor, Tensor], idx_comp: tuple[Tensor, Tensor] | None, i: int,
                  cache: LayerCache, batch: ForwardBatch) -> None:
        """Layer i's compressors (and the indexer's, ratio 4, beside it: they share nothing) on their (kv, score)
        projections: pool closed windows into the compressed caches."""
        cfg, ops, L = self.cfg, self.ops, self.layers[i]
        ratio = cfg.compress_ratio(i)
        rope, rd = cfg.rope_for_layer(i), cfg.rope_head_dim
        C, I = L.compressor, L.idx_compressor

        def attention_entries() -> None:
            ops.compress_and_store(*comp, C.ape, C.norm, cfg.norm_eps, ratio, rope, rd, cache.comp_carry_kv,
                                   cache.comp_carry_score, cache.comp_kv, cache.block_size, batch)

        def index_keys() -> None:
            ops.compress_and_store(*idx_comp, I.ape, I.norm, cfg.norm_eps, 4, rope, rd, cache.index_carry_kv,
                                   cache.index_carry_score, cache.index_k, cache.block_size, batch)

        if ratio == 4:
            ops.concurrently(attention_entries, index_keys)
        else:
            attention_entries()

    def layer_out(self, o: Tensor, h: Tensor, post: Tensor, comb: Tensor, i: int, token_ids: Tensor) -> Tensor:
        """The rest of layer i: output projection and mHC update of the attention sub-layer, then the whole MoE
        sub-layer -> the layer's residual streams."""
        cfg, ops, L = self.cfg, self.ops, self.layers[i]
        T = o.shape[0]
        o = ops.grouped_linear(o.reshape(T, -1), L.wo_a)
        h = ops.linear_hc_post(o, L.wo_b, h, post, comb)
        fn, scale, base = L.hc["ffn"]
        x, hc_coefficients = ops.hc_pre_split(h, fn, scale, base, cfg.norm_eps, cfg.hc_sinkhorn_iters, cfg.hc_eps,
                                              norm_weight=L.ffn_norm)
        (routed, shared), (post, comb) = self.moe(x, L, token_ids, hc_coefficients)
        return ops.hc_post_sum(routed, shared, h, post, comb)

    def moe(self, x: Tensor, L: LayerWeights, token_ids: Tensor,
            beside: Callable[[], Any]) -> tuple[tuple[Tensor, Tensor], Any]:
        """The MoE sub-layer -> ((routed experts' output, shared expert's output), what `beside` returns: a piece
        run concurrently with it). The sub-layer's output is their sum, which the caller leaves to hc_post_sum."""
        cfg, ops = self.cfg, self.ops

        def routed() -> Tensor:
            ids, weights = ops.route(x, L.gate, L.gate_bias, L.tid2eid, token_ids, cfg.n_activated_experts,
                                     cfg.score_func, cfg.route_scale)
            return ops.moe(x, ids, weights, L.experts, cfg.swiglu_limit)

        out, shared, other = ops.concurrently(routed, lambda: ops.swiglu_mlp(x, *L.shared, cfg.swiglu_limit), beside)
        return (out, shared), other

    def logits(self, h: Tensor, rows: Tensor) -> Tensor:
        """FP32 logits [len(rows), vocab] of the residual streams' `rows`."""
        cfg, ops = self.cfg, self.ops
        x = ops.hc_head(h[rows], *self.hc_head, cfg.norm_eps, cfg.hc_eps)
        return ops.lm_head(ops.rms_norm(x, self.norm, cfg.norm_eps), self.head)

    # --- whole model -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, batch: ForwardBatch, caches: list[LayerCache]) -> Tensor:
        """-> FP32 logits [len(batch.logits_indices), vocab]."""
        h = self.embed_tokens(batch.token_ids)
        for i in range(len(self.layers)):
            a, post, comb = self.attn_in(h, i, batch.positions, caches[i], write_batch=batch)
            o = self.attn_core(a, i, caches[i], batch)
            h = self.layer_out(o, h, post, comb, i, batch.token_ids)
        return self.logits(h, batch.logits_indices)
