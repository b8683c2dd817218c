"""Plain-PyTorch implementation of every op: the engine's level-2 truth, and the CPU path CI serves with.

Weights are dequantised once at load time into `dtype`. Numerically sensitive steps (mHC, compressor pooling,
softmaxes, routing) run in FP32 whatever `dtype` is.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from dsv4.config import RopeConfig
from dsv4.ops.base import ForwardBatch, LayerCache, Ops
from dsv4.ops.compress_plan import compress_plan
from dsv4.ops.fp8_rows import Fp8Rows

Tensor = torch.Tensor


@lru_cache(maxsize=16)
def _rope_freqs(rope: RopeConfig, rope_dim: int) -> Tensor:
    """Per channel-pair angular frequency (float64); YaRN blends interpolated and original frequencies."""
    freqs = 1.0 / (rope.theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    if rope.original_seq_len > 0:
        def corr(rot: float) -> float:
            return rope_dim * math.log(rope.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(rope.theta))
        lo = max(math.floor(corr(rope.beta_fast)), 0)
        hi = min(math.ceil(corr(rope.beta_slow)), rope_dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        smooth = 1 - ((torch.arange(rope_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        freqs = freqs / rope.factor * (1 - smooth) + freqs * smooth
    return freqs


def _attend_with_sink(logits: list[Tensor], values: list[Tensor], equations: list[str], sink: Tensor) -> Tensor:
    """One softmax over every part's logits [n, H, k_i] plus the per-head sink (which only takes probability), then
    sum_i probs_i @ values_i, each by its einsum `equations[i]` -> fp32 [n, H, d]."""
    n, H = logits[0].shape[:2]
    probs = torch.cat(logits + [sink.float().view(1, H, 1).expand(n, H, 1)], dim=-1).softmax(-1)
    out, off = None, 0
    for lg, v, eq in zip(logits, values, equations):
        k = lg.shape[-1]
        part = torch.einsum(eq, probs[..., off:off + k], v)
        out = part if out is None else out + part
        off += k
    return out


def _cache_rows(entries: Tensor, pool: Tensor, rope_dim: int) -> Tensor:
    """`entries` [..., d] as `pool` stores them: its dtype, or FP8 rows for a uint8 pool."""
    if pool.dtype == torch.uint8:
        return Fp8Rows(entries.shape[-1], rope_dim).quantize(entries)
    return entries.to(pool.dtype)


def dense(t: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Checkpoint tensor (dense or one of the quantised containers) -> dense tensor."""
    if not isinstance(t, torch.Tensor):  # a quantised container
        t = t.dequantize(torch.float32)
    return t.to(device=device, dtype=dtype)


class TorchOps(Ops):
    name = "torch"

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self._rope_cache: dict[tuple[RopeConfig, int], tuple[Tensor, Tensor]] = {}
        self.max_positions = 0   # the engine's max_model_len: tables this long need no bounds check (no host sync)

    def reserve_positions(self, n: int) -> None:
        """Promise that every position is < n, so RoPE lookups skip the host-synchronising bounds check (decode
        steps then stay CUDA-graph capturable)."""
        self.max_positions = max(self.max_positions, n)

    # --- weights ---------------------------------------------------------------------------------------------
    def prepare_linear(self, weight: Any) -> Tensor:
        return dense(weight, self.dtype, self.device)

    def prepare_grouped_linear(self, weight: Any, groups: int) -> Tensor:
        w = dense(weight, self.dtype, self.device)
        if w.dim() != 2 or w.shape[0] % groups:
            raise ValueError(f"grouped projection: weight {tuple(w.shape)} is not {groups} row groups [G*R, K]")
        return w.view(groups, w.shape[0] // groups, w.shape[1])

    def prepare_experts(self, w1: list[Any], w2: list[Any], w3: list[Any]) -> dict[str, Tensor]:
        return {"w1": torch.stack([dense(t, self.dtype, self.device) for t in w1]),
                "w2": torch.stack([dense(t, self.dtype, self.device) for t in w2]),
                "w3": torch.stack([dense(t, self.dtype, self.device) for t in w3])}

    # --- dense math ------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x.to(w.dtype), w)

    def lm_head(self, x: Tensor, w: Tensor) -> Tensor:
        """FP32 logits, as DeepSeek's inference code computes them (`F.linear(x.float(), head.float())`): a BF16
        product is exact in FP32, so a BF16 GEMM accumulating and writing FP32 is that computation without an FP32
        copy of the head. BF16 logits would tie exactly at the top on ~5 % of steps of a random-weight model (one
        BF16 step is 0.0625 at |logit| 8-16), which turns greedy decoding into a coin toss between backends."""
        x = x.to(w.dtype)
        if x.is_cuda and w.dtype in (torch.bfloat16, torch.float16):
            return torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
        return F.linear(x.float(), w.float())

    def grouped_linear(self, x: Tensor, w: Tensor) -> Tensor:
        G, R, K = w.shape
        return torch.einsum("tgi,gri->tgr", x.reshape(-1, G, K).to(w.dtype), w).reshape(*x.shape[:-1], G * R)

    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        # one fused kernel on the GPU (the composite form is ~7 launches, and decode runs ~5 norms per layer)
        w = None if weight is None else weight.float()
        return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)

    def rope_table(self, rope: RopeConfig, rope_dim: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Full (cos, sin) tables [P, rope_dim // 2] fp32 covering every position in `positions` (no host sync
        once reserve_positions covers them)."""
        key = (rope, rope_dim)
        cached = self._rope_cache.get(key)
        if cached is not None and self.max_positions and cached[0].shape[0] >= self.max_positions:
            return cached
        need = max(int(positions.max()) + 1 if positions.numel() else 1, self.max_positions)
        if cached is None or cached[0].shape[0] < need:
            n = max(need, 4096 if cached is None else 2 * cached[0].shape[0])
            angle = torch.arange(n, dtype=torch.float64)[:, None] * _rope_freqs(rope, rope_dim)[None, :]
            cached = (angle.cos().float().to(self.device), angle.sin().float().to(self.device))
            self._rope_cache[key] = cached
        return cached

    def _cos_sin(self, rope: RopeConfig, rope_dim: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.rope_table(rope, rope_dim, positions)
        return cos[positions], sin[positions]

    def rope_tail(self, x: Tensor, positions: Tensor, rope: RopeConfig, rope_dim: int, inverse: bool = False) -> Tensor:
        cos, sin = self._cos_sin(rope, rope_dim, positions)
        if inverse:
            sin = -sin
        shape = (positions.shape[0],) + (1,) * (x.dim() - 2) + (rope_dim // 2,)
        cos, sin = cos.view(shape), sin.view(shape)
        tail = x[..., -rope_dim:].float()
        even, odd = tail[..., 0::2], tail[..., 1::2]
        rot = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
        return torch.cat([x[..., :-rope_dim], rot.to(x.dtype)], dim=-1)

    def hc_pre(self, streams: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, iters: int,
               hc_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n = streams.shape[1]
        flat = streams.flatten(1).float()
        mixes = (flat @ fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
        pre = torch.sigmoid(mixes[:, :n] * scale[0] + base[:n]) + hc_eps
        post = 2 * torch.sigmoid(mixes[:, n:2 * n] * scale[1] + base[n:2 * n])
        comb = (mixes[:, 2 * n:] * scale[2] + base[2 * n:]).view(-1, n, n).softmax(-1) + hc_eps
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
            comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
        x = torch.einsum("tn,tnd->td", pre, streams.float())
        return x.to(streams.dtype), post, comb

    def hc_post(self, y: Tensor, streams: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        out = post[:, :, None] * y.float()[:, None, :] + torch.einsum("tij,tid->tjd", comb, streams.float())
        return out.to(streams.dtype)

    def hc_head(self, streams: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, hc_eps: float) -> Tensor:
        flat = streams.flatten(1).float()
        mixes = (flat @ fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
        pre = torch.sigmoid(mixes * scale + base) + hc_eps
        return torch.einsum("tn,tnd->td", pre, streams.float()).to(streams.dtype)

    def route(self, x: Tensor, gate: Tensor, gate_bias: Tensor | None, tid2eid: Tensor | None, token_ids: Tensor,
              topk: int, score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
        logits = x.float() @ gate.T
        if score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(-1)
        if tid2eid is not None:
            ids = tid2eid[token_ids]
        else:
            ids = (scores + gate_bias).topk(topk, dim=-1).indices
        weights = scores.gather(1, ids)
        if score_func != "softmax":
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights * route_scale

    def _swiglu(self, gate: Tensor, up: Tensor, limit: float) -> Tensor:
        gate, up = gate.float(), up.float()
        if limit > 0:
            gate = gate.clamp(max=limit)
            up = up.clamp(-limit, limit)
        return F.silu(gate) * up

    def swiglu_mlp(self, x: Tensor, w13: Any, w2: Tensor, swiglu_limit: float) -> Tensor:
        h = self._swiglu(*self.linear_stack(x, w13), swiglu_limit)
        return self.linear(h.to(x.dtype), w2)

    def moe(self, x: Tensor, expert_ids: Tensor, expert_weights: Tensor, experts: dict[str, Tensor],
            swiglu_limit: float) -> Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        flat_ids = expert_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=experts["w1"].shape[0]).tolist()
        rows = order // expert_ids.shape[1]
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            sel = order[start:start + c]
            r = rows[start:start + c]
            xe = x[r]
            h = self._swiglu(xe @ experts["w1"][e].T, xe @ experts["w3"][e].T, swiglu_limit)
            y = h.to(x.dtype) @ experts["w2"][e].T
            out.index_add_(0, r, y.float() * expert_weights.flatten()[sel, None].float())
            start += c
        return out.to(x.dtype)

    # --- cache and attention ---------------------------------------------------------------------------------
    def store_window_kv(self, kv: Tensor, cache: LayerCache, batch: ForwardBatch) -> None:
        rows = kv.to(cache.swa_kv.dtype) if cache.kv_rows is None else cache.kv_rows.quantize(kv)
        cache.swa_kv.view(-1, cache.swa_kv.shape[-1])[batch.swa_slot_mapping] = rows

    def compress_and_store(self, kv: Tensor, score: Tensor, ape: Tensor, norm_weight: Tensor, norm_eps: float,
                           ratio: int, rope: RopeConfig, rope_dim: int, carry_kv: Tensor, carry_score: Tensor,
                           out: Tensor, block_size: int, batch: ForwardBatch) -> None:
        if batch.decode is not None:
            return self._compress_decode(kv, score, ape, norm_weight, norm_eps, ratio, rope, rope_dim, carry_kv,
                                         carry_score, out, block_size, batch)
        # every sequence at once, from one index plan (compress_plan.py): a fixed number of launches per step
        overlap = ratio == 4
        d = carry_kv.shape[-1] // (2 if overlap else 1)
        dev = kv.device
        key = ("compress_plan", ratio, block_size, carry_kv.shape[1], dev)
        plan = batch.memo.get(key)
        if plan is None:        # the layers of one step with the same ratio share it (one host plan, one copy)
            plan = batch.memo[key] = compress_plan(batch, ratio, block_size, carry_kv.shape[1]).on(dev)
        new_sc = score.float() + ape[plan.new_rows]
        src_kv = torch.cat([kv.float(), carry_kv.view(-1, carry_kv.shape[-1])[plan.carry_gather]])
        src_sc = torch.cat([new_sc, carry_score.view(-1, carry_score.shape[-1])[plan.carry_gather]])
        if plan.num_entries:
            wk, ws = src_kv[plan.cur_rows], src_sc[plan.cur_rows]    # [E, ratio, coff*d]
            if overlap:
                # entry w: first half (series A) of window w-1's rows, second half (series B) of window w's
                wk = torch.cat([src_kv[plan.prev_rows][:, :, :d], wk[:, :, d:]], dim=1)
                ws = torch.cat([src_sc[plan.prev_rows][:, :, :d], ws[:, :, d:]], dim=1)
            entries = (wk * ws.softmax(dim=1)).sum(dim=1)
            entries = self.rms_norm(entries, norm_weight, norm_eps)
            entries = self.rope_tail(entries, plan.entry_pos, rope, rope_dim)
            rows = _cache_rows(entries, out, rope_dim)
            if plan.padded:     # padding entries of a fixed-size plan write back what their slot holds
                keep = plan.entry_valid.bool().view(-1, *([1] * (rows.dim() - 1)))
                rows = torch.where(keep, rows, out[plan.entry_block, plan.entry_index])
            out[plan.entry_block, plan.entry_index] = rows
        if plan.carry_dst.shape[0]:
            carry_kv.view(-1, carry_kv.shape[-1])[plan.carry_dst] = src_kv[plan.carry_src]
            carry_score.view(-1, carry_score.shape[-1])[plan.carry_dst] = src_sc[plan.carry_src]

    def _compress_decode(self, kv: Tensor, score: Tensor, ape: Tensor, norm_weight: Tensor, norm_eps: float,
                         ratio: int, rope: RopeConfig, rope_dim: int, carry_kv: Tensor, carry_score: Tensor,
                         out: Tensor, block_size: int, batch: ForwardBatch) -> None:
        """compress_and_store for one new token per sequence, batched, from device tables only (no host sync).

        Every row pools its window as it stands and writes that entry to the window's slot: a window that is not
        yet closed gets a provisional entry, which no query can see ((pos + 1) // ratio excludes it) and which the
        step that closes the window overwrites. Branch-free, so one CUDA graph serves every step."""
        t = batch.decode
        overlap = ratio == 4
        d = carry_kv.shape[-1] // (2 if overlap else 1)
        cur0 = ratio if overlap else 0
        pos = batch.positions
        j = pos % ratio                                               # row of the new token in its window
        slots = t.state_slots
        # one gather and one scatter per state tensor (row-wise index ops cost a launch each)
        ck, cs = carry_kv[slots], carry_score[slots]                  # [B, rows, coff*d]
        new_row = (torch.arange(ck.shape[1], device=pos.device)[None, :] == (cur0 + j)[:, None])[:, :, None]
        ck = torch.where(new_row, kv.float()[:, None, :], ck)
        cs = torch.where(new_row, (score.float() + ape[j])[:, None, :], cs)
        cur_k, cur_s = ck[:, cur0:cur0 + ratio], cs[:, cur0:cur0 + ratio]   # the window so far
        if overlap:
            pk = torch.cat([ck[:, :ratio, :d], cur_k[:, :, d:]], dim=1)
            ps = torch.cat([cs[:, :ratio, :d], cur_s[:, :, d:]], dim=1)
        else:
            pk, ps = cur_k, cur_s
        # rows after j hold the previous window's values until overwritten: mask them out of the provisional
        # entry so that it never sees stale scores (the closing step has none)
        future = torch.arange(ratio, device=pos.device)[None, :] > j[:, None]
        if overlap:
            future = torch.cat([torch.zeros_like(future), future], dim=1)
        ps = ps.masked_fill(future[:, :, None], -math.inf)
        # softmax over dim 1 written out: torch's strided-softmax kernel takes ~25 us on these shapes
        e = (ps - ps.amax(dim=1, keepdim=True)).exp_()
        entries = (pk * e).sum(dim=1) / e.sum(dim=1)
        entries = self.rms_norm(entries, norm_weight, norm_eps)
        start = pos - j                                               # first position of the window
        entries = self.rope_tail(entries, start, rope, rope_dim)
        blk = t.comp_block_tables.gather(1, (start // block_size)[:, None]).squeeze(1).long()
        out[blk, (start % block_size) // ratio] = _cache_rows(entries, out, rope_dim)
        if overlap:   # a closing window becomes the previous one
            closing = (j == ratio - 1)[:, None, None]
            ck = torch.cat([torch.where(closing, cur_k, ck[:, :ratio]), cur_k], dim=1)
            cs = torch.cat([torch.where(closing, cur_s, cs[:, :ratio]), cur_s], dim=1)
        carry_kv[slots] = ck
        carry_score[slots] = cs

    def _gather_entries(self, pool: Tensor, table: list[int], count: int, ratio: int, block_size: int,
                        rows: Fp8Rows | None = None) -> Tensor:
        """The first `count` compressed entries of one sequence, in order: [count, d] (fp32 from FP8 rows)."""
        per_block = block_size // ratio
        nblk = -(-count // per_block)
        blocks = torch.as_tensor(table[:nblk], device=pool.device, dtype=torch.long)
        got = pool[blocks].reshape(-1, pool.shape[-1])[:count]
        return got if rows is None else rows.dequantize(got)

    def indexer_topk(self, q: Tensor, head_weights: Tensor, index_k: Tensor, block_size: int, topk: int,
                     batch: ForwardBatch, key_rows: Fp8Rows | None = None, head_scale: float = 1.0) -> Tensor:
        head_weights = head_weights.float() * head_scale
        if batch.decode is not None:
            return self._indexer_decode(q, head_weights, index_k, block_size, topk, batch, key_rows)
        T = q.shape[0]
        result = torch.full((T, topk), -1, dtype=torch.long, device=q.device)
        for b in range(batch.num_seqs):
            s0, s1 = batch.query_start[b], batch.query_start[b + 1]
            n_vis = (batch.positions[s0:s1] + 1) // 4
            total = int(n_vis.max()) if s1 > s0 else 0
            if total == 0:
                continue
            keys = self._gather_entries(index_k, batch.comp_block_tables[b], total, 4, block_size, key_rows).float()
            score = torch.einsum("thd,nd->thn", q[s0:s1].float(), keys).relu()
            score = (score * head_weights[s0:s1, :, None].float()).sum(1)
            visible = torch.arange(total, device=q.device)[None, :] < n_vis[:, None]
            score = score.masked_fill(~visible, -math.inf)
            k = min(topk, total)
            top = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]  # ties: earlier entry
            ok = torch.gather(visible, 1, top)
            result[s0:s1, :k] = torch.where(ok, top, torch.full_like(top, -1))
        return result

    def sparse_attention(self, q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                         sink: Tensor, scale: float, batch: ForwardBatch,
                         out_rope: tuple[RopeConfig, int] | None = None) -> Tensor:
        if batch.decode is not None:
            o = self._attention_decode(q, cache, ratio, window, topk_entries, sink, scale, batch)
        else:
            o = self._attention_prefill(q, cache, ratio, window, topk_entries, sink, scale, batch)
        return o if out_rope is None else self.rope_tail(o, batch.positions, out_rope[0], out_rope[1], inverse=True)

    def _attention_prefill(self, q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                           sink: Tensor, scale: float, batch: ForwardBatch) -> Tensor:
        T, H, d = q.shape
        out = torch.empty((T, H, d), dtype=q.dtype, device=q.device)
        bs = cache.block_size
        rows = cache.kv_rows
        swa = cache.swa_kv.view(-1, cache.swa_kv.shape[-1])
        for b in range(batch.num_seqs):
            s0, s1 = batch.query_start[b], batch.query_start[b + 1]
            if s1 == s0:
                continue
            pos = batch.positions[s0:s1]
            qb = q[s0:s1].float()
            lo = max(0, int(pos.min()) - window + 1)
            hi = int(pos.max()) + 1
            kpos = torch.arange(lo, hi, device=q.device)
            table = torch.as_tensor(batch.swa_block_tables[b], device=q.device, dtype=torch.long)
            kwin = swa[table[kpos // bs] * bs + kpos % bs]
            kwin = kwin.float() if rows is None else rows.dequantize(kwin)             # [Lw, d]
            logits = torch.einsum("thd,kd->thk", qb, kwin) * scale
            vis = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] > pos[:, None] - window)
            logits = logits.masked_fill(~vis[:, None, :], -math.inf)
            parts_l, parts_v = [logits], [kwin]
            if ratio and ratio != 4:
                total = (hi) // ratio
                if total > 0:
                    kc = self._gather_entries(cache.comp_kv, batch.comp_block_tables[b], total, ratio, bs,
                                              rows).float()
                    lc = torch.einsum("thd,kd->thk", qb, kc) * scale
                    cvis = torch.arange(total, device=q.device)[None, :] < ((pos + 1) // ratio)[:, None]
                    parts_l.append(lc.masked_fill(~cvis[:, None, :], -math.inf))
                    parts_v.append(kc)
            per_token = None
            if ratio == 4 and topk_entries is not None:
                idx = topk_entries[s0:s1]                                                # [n, k]
                total = int(idx.max()) + 1 if idx.numel() and int(idx.max()) >= 0 else 0
                if total > 0:
                    kc = self._gather_entries(cache.comp_kv, batch.comp_block_tables[b], total, 4, bs, rows).float()
                    per_token = kc[idx.clamp(min=0)]                                     # [n, k, d]
                    lc = torch.einsum("thd,tkd->thk", qb, per_token) * scale
                    parts_l.append(lc.masked_fill((idx < 0)[:, None, :], -math.inf))
            eqs = ["thk,kd->thd"] * len(parts_v)
            if per_token is not None:
                parts_v.append(per_token)
                eqs.append("thk,tkd->thd")
            out[s0:s1] = _attend_with_sink(parts_l, parts_v, eqs, sink).to(q.dtype)
        return out

    # --- decode steps from device tables (no host lists, no sync: what a CUDA graph can replay) -----------------
    @staticmethod
    def _entries_by_number(pool: Tensor, tables: Tensor, entries: Tensor, ratio: int, block_size: int,
                           rows: Fp8Rows | None) -> Tensor:
        """Compressed entries `entries` [B, N] (entry numbers; negative ones read entry 0, callers mask them) of
        each row's sequence through its block table row -> [B, N, d] fp32."""
        per_block = block_size // ratio
        e = entries.clamp(min=0)
        blk = tables.gather(1, e // per_block).long().clamp(min=0)
        got = pool.view(-1, pool.shape[-1])[blk * per_block + e % per_block]
        return got.float() if rows is None else rows.dequantize(got)

    def _indexer_decode(self, q: Tensor, head_weights: Tensor, index_k: Tensor, block_size: int, topk: int,
                        batch: ForwardBatch, key_rows: Fp8Rows | None) -> Tensor:
        t = batch.decode
        B = q.shape[0]
        n = (t.max_position + 1) // 4                        # every entry any row may see, masked per row below
        result = torch.full((B, topk), -1, dtype=torch.long, device=q.device)
        if n == 0:
            return result
        num = torch.arange(n, device=q.device)
        keys = self._entries_by_number(index_k, t.comp_block_tables, num.expand(B, n), 4, block_size, key_rows)
        score = torch.einsum("bhd,bnd->bhn", q.float(), keys).relu()
        score = (score * head_weights[:, :, None].float()).sum(1)
        visible = num[None, :] < ((batch.positions + 1) // 4)[:, None]
        score = score.masked_fill(~visible, -math.inf)
        k = min(topk, n)
        top = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]   # ties: earlier entry
        result[:, :k] = torch.where(torch.gather(visible, 1, top), top, torch.full_like(top, -1))
        return result

    def _attention_decode(self, q: Tensor, cache: LayerCache, ratio: int, window: int, topk_entries: Tensor | None,
                          sink: Tensor, scale: float, batch: ForwardBatch) -> Tensor:
        t = batch.decode
        B = q.shape[0]
        bs, rows = cache.block_size, cache.kv_rows
        pos = batch.positions
        qf = q.float()
        kpos = pos[:, None] - (window - 1) + torch.arange(window, device=q.device)[None, :]     # [B, W]
        in_win = kpos >= 0
        kp = kpos.clamp(min=0)
        blk = t.swa_block_tables.gather(1, kp // bs).long().clamp(min=0)
        kwin = cache.swa_kv.view(-1, cache.swa_kv.shape[-1])[blk * bs + kp % bs]
        kwin = kwin.float() if rows is None else rows.dequantize(kwin)                         # [B, W, d]
        parts_l = [(torch.einsum("bhd,bkd->bhk", qf, kwin) * scale).masked_fill(~in_win[:, None, :], -math.inf)]
        parts_v = [kwin]
        if ratio:
            if ratio == 4:
                entries = topk_entries
                seen = None if entries is None else entries >= 0
            else:
                n = (t.max_position + 1) // ratio
                entries = torch.arange(n, device=q.device).expand(B, n)
                seen = entries < ((pos + 1) // ratio)[:, None]
            if entries is not None and entries.shape[1]:
                kc = self._entries_by_number(cache.comp_kv, t.comp_block_tables, entries, ratio, bs, rows)
                lc = torch.einsum("bhd,bkd->bhk", qf, kc) * scale
                parts_l.append(lc.masked_fill(~seen[:, None, :], -math.inf))
                # entries a row cannot see yet may never have been written: weight 0 times whatever they hold
                # (NaN in a fresh pool) must stay 0
                parts_v.append(kc.masked_fill(~seen[:, :, None], 0.0))
        return _attend_with_sink(parts_l, parts_v, ["bhk,bkd->bhd"] * len(parts_v), sink).to(q.dtype)
