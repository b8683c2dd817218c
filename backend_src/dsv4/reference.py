"""The oracle: DeepSeek-V4 as a dense, cache-free FP32 forward over a whole sequence.

Every other level of this project (the engine with torch ops, the engine with CuTe DSL kernels) is judged against
this file. It is written to be read next to docs/MODEL.md, one function per component, and it never shares code
with the engine beyond weight loading: no caches, no batching, no paging, no kernels. Generation recomputes the
whole sequence for every new token. It is slow on purpose.

Differences from DeepSeek's own inference code, all deliberate (see docs/MODEL.md): activations are FP32 (theirs
are BF16 with FP8/FP4 simulation of the KV entries and indexer inputs, a quantisation-aware-training artefact), and
the indexer's Hadamard rotation is omitted (it is orthogonal, so it does not change q.k outside quantisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4.config import ModelConfig, RopeConfig
from dsv4.ops.fp8_rows import Fp8Rows

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Basic pieces
# ----------------------------------------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def rope_frequencies(rope: RopeConfig, rope_dim: int) -> Tensor:
    """Angular frequency of each channel pair; YaRN blends interpolated and original frequencies."""
    freqs = 1.0 / (rope.theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    if rope.original_seq_len > 0:
        def correction_dim(rotations: float) -> float:
            return rope_dim * math.log(rope.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

        low = max(math.floor(correction_dim(rope.beta_fast)), 0)
        high = min(math.ceil(correction_dim(rope.beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 for high-frequency pairs (kept), 0 for low-frequency pairs (interpolated)
        freqs = freqs / rope.factor * (1 - keep) + freqs * keep
    return freqs


def rope(x: Tensor, positions: Tensor, rope_cfg: RopeConfig, inverse: bool = False) -> Tensor:
    """Rotate the trailing `rope_dim` channels of x as interleaved pairs (x[2i], x[2i+1]) by position * freq.

    x: [S, ..., d] with positions [S]. `inverse` rotates by the negative angle (used on the attention output).
    """
    rope_dim = x.shape[-1]
    angle = positions.to(torch.float64)[:, None] * rope_frequencies(rope_cfg, rope_dim)[None, :]  # [S, rd/2]
    if inverse:
        angle = -angle
    cos = angle.cos().to(x.dtype).view(angle.shape[0], *([1] * (x.dim() - 2)), rope_dim // 2)
    sin = angle.sin().to(x.dtype).view_as(cos)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rope_tail(x: Tensor, positions: Tensor, rope_cfg: RopeConfig, rope_dim: int, inverse: bool = False) -> Tensor:
    """RoPE on the trailing rope_dim channels ([nope | rope] layout), the rest unchanged."""
    return torch.cat([x[..., :-rope_dim], rope(x[..., -rope_dim:], positions, rope_cfg, inverse)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# mHC: manifold-constrained hyper-connections
# ----------------------------------------------------------------------------------------------------------------
def sinkhorn_split(mixes: Tensor, scale: Tensor, base: Tensor, n: int, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """mixes [S, (2+n)n] -> pre [S, n], post [S, n], comb [S, n, n] (doubly stochastic, columns normalised first)."""
    pre = torch.sigmoid(mixes[:, :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mixes[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mixes[:, 2 * n:] * scale[2] + base[2 * n:]).view(-1, n, n).softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def hc_mixes(streams: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
    """The N streams flattened, RMS-normalised without weight, projected by fn: [S, N, D] -> [S, rows(fn)]."""
    flat = streams.flatten(1)
    return (flat @ fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ReferenceOutput:
    logits: Tensor          # [S, vocab] for every position
    hidden_streams: Tensor  # [S, hc_mult, dim] after the last layer (input of the MTP layers)


class ReferenceModel:
    """DeepSeek-V4, FP32, one sequence at a time. `weights` maps checkpoint names to dequantised tensors."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Tensor], kv_cache_dtype: str = "auto"):
        """`kv_cache_dtype` "fp8_e4m3" (or "fp8"): attention sees every cached vector (window KV, compressed entries,
        indexer keys) as an FP8 cache row gives it back (dsv4.ops.fp8_rows), as an engine with that cache does."""
        self.cfg = cfg
        self.w = {k: (v if not v.is_floating_point() else v.float()) for k, v in weights.items()}
        if kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be auto, fp8_e4m3 or fp8, got {kv_cache_dtype!r}")
        self.fp8_cache = kv_cache_dtype != "auto"

    def cached(self, x: Tensor) -> Tensor:
        """x [..., d] as the KV cache would return it."""
        if not self.fp8_cache:
            return x
        return Fp8Rows(x.shape[-1], self.cfg.rope_head_dim).round_trip(x)

    # --- attention -------------------------------------------------------------------------------------------
    def compress(self, x: Tensor, p: str, ratio: int, d: int, rope_cfg: RopeConfig) -> Tensor:
        """Gated pooling of every closed window of `ratio` tokens into one entry: [S, dim] -> [S // ratio, d].

        Overlapping (ratio 4): projections are 2d wide; entry w pools 2*ratio slots, the first half (series A) of
        window w-1 and the second half (series B) of window w. The softmax runs over slots, per channel.
        """
        w, cfg = self.w, self.cfg
        overlap = ratio == 4
        n = x.shape[0] // ratio
        width = w[f"{p}.wkv.weight"].shape[0]
        kv = (x[: n * ratio] @ w[f"{p}.wkv.weight"].T).view(n, ratio, width)
        gate = (x[: n * ratio] @ w[f"{p}.wgate.weight"].T).view(n, ratio, width) + w[f"{p}.ape"]
        if overlap:
            prev_kv = torch.cat([torch.zeros_like(kv[:1, :, :d]), kv[:-1, :, :d]], dim=0)
            prev_gate = torch.cat([torch.full_like(gate[:1, :, :d], -math.inf), gate[:-1, :, :d]], dim=0)
            kv = torch.cat([prev_kv, kv[:, :, d:]], dim=1)
            gate = torch.cat([prev_gate, gate[:, :, d:]], dim=1)
        pooled = (kv * gate.softmax(dim=1)).sum(dim=1)
        pooled = rms_norm(pooled, w[f"{p}.norm.weight"], cfg.norm_eps)
        positions = torch.arange(n) * ratio
        return self.cached(rope_tail(pooled, positions, rope_cfg, cfg.rope_head_dim))

    def index_topk(self, x: Tensor, q_latent: Tensor, p: str, rope_cfg: RopeConfig) -> Tensor:
        """CSA indexer: for every query t, a boolean mask over compressed entries of the top-k by index score."""
        w, cfg = self.w, self.cfg
        S = x.shape[0]
        nh, hd = cfg.index_n_heads, cfg.index_head_dim
        q = (q_latent @ w[f"{p}.wq_b.weight"].T).view(S, nh, hd)
        q = rope_tail(q, torch.arange(S), rope_cfg, cfg.rope_head_dim)
        head_weights = (x @ w[f"{p}.weights_proj.weight"].T) * (hd ** -0.5 * nh ** -0.5)  # [S, nh]
        keys = self.compress(x, f"{p}.compressor", 4, hd, rope_cfg)                      # [n, hd]
        score = torch.einsum("thd,nd->thn", q, keys).relu()
        score = (score * head_weights[:, :, None]).sum(1)                                 # [S, n]
        visible = torch.arange(keys.shape[0])[None, :] < ((torch.arange(S) + 1) // 4)[:, None]
        score = score.masked_fill(~visible, -math.inf)
        # Top-k with a defined tie order (the earlier entry wins): ReLU makes exact ties (often at 0) common, and
        # an unspecified order would make the selection depend on how many entries exist, i.e. not causal.
        chosen = torch.zeros_like(visible)
        k = min(cfg.index_topk, keys.shape[0])
        if k > 0:
            top = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
            chosen.scatter_(1, top, True)
        return chosen & visible

    def attention(self, x: Tensor, layer: int, p: str) -> Tensor:
        w, cfg = self.w, self.cfg
        S = x.shape[0]
        H, hd, rd = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        ratio = cfg.compress_ratio(layer)
        rope_cfg = cfg.rope_for_layer(layer)
        pos = torch.arange(S)

        q_latent = rms_norm(x @ w[f"{p}.wq_a.weight"].T, w[f"{p}.q_norm.weight"], cfg.norm_eps)
        q = (q_latent @ w[f"{p}.wq_b.weight"].T).view(S, H, hd)
        q = rope_tail(rms_norm(q, None, cfg.norm_eps), pos, rope_cfg, rd)
        kv = rms_norm(x @ w[f"{p}.wkv.weight"].T, w[f"{p}.kv_norm.weight"], cfg.norm_eps)
        kv = self.cached(rope_tail(kv, pos, rope_cfg, rd))  # one head, keys and values alike

        # Which keys each query sees: the raw KV of the last `window_size` positions (itself included) ...
        keys = kv
        visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - cfg.window_size)
        if ratio:
            # ... plus compressed entries of closed windows: all of them (HCA) or the indexer's top-k (CSA).
            compressed = self.compress(x, f"{p}.compressor", ratio, hd, rope_cfg)
            if ratio == 4:
                sees = self.index_topk(x, q_latent, f"{p}.indexer", rope_cfg)
            else:
                sees = torch.arange(compressed.shape[0])[None, :] < ((pos + 1) // ratio)[:, None]
            keys = torch.cat([kv, compressed], dim=0)
            visible = torch.cat([visible, sees], dim=1)

        logits = torch.einsum("thd,kd->thk", q, keys) * hd ** -0.5
        logits = logits.masked_fill(~visible[:, None, :], -math.inf)
        sink = w[f"{p}.attn_sink"].view(1, H, 1).expand(S, H, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(-1)[..., :-1]  # the sink only absorbs probability
        out = torch.einsum("thk,kd->thd", probs, keys)
        out = rope_tail(out, pos, rope_cfg, rd, inverse=True)

        # Grouped low-rank output projection: block-diagonal wo_a per group of heads, then wo_b.
        g = cfg.o_groups
        wo_a = w[f"{p}.wo_a.weight"].view(g, cfg.o_lora_rank, -1)
        out = torch.einsum("tgi,gri->tgr", out.reshape(S, g, -1), wo_a).reshape(S, -1)
        return out @ w[f"{p}.wo_b.weight"].T

    # --- mixture of experts ----------------------------------------------------------------------------------
    def expert(self, x: Tensor, p: str) -> Tensor:
        w, lim = self.w, self.cfg.swiglu_limit
        gate = x @ w[f"{p}.w1.weight"].T
        up = x @ w[f"{p}.w3.weight"].T
        if lim > 0:  # DeepSeek clamps the gate from above before SiLU and the up projection on both sides
            gate = gate.clamp(max=lim)
            up = up.clamp(-lim, lim)
        return (F.silu(gate) * up) @ w[f"{p}.w2.weight"].T

    def route(self, x: Tensor, token_ids: Tensor, layer: int, p: str) -> tuple[Tensor, Tensor]:
        """-> (expert ids [S, k], weights [S, k])."""
        w, cfg = self.w, self.cfg
        logits = x @ w[f"{p}.gate.weight"].T
        if cfg.score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif cfg.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(-1)
        if cfg.is_hash_layer(layer):
            ids = w[f"{p}.gate.tid2eid"][token_ids].long()
        else:
            ids = (scores + w[f"{p}.gate.bias"]).topk(cfg.n_activated_experts, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.score_func != "softmax":
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights * cfg.route_scale

    def moe(self, x: Tensor, token_ids: Tensor, layer: int, p: str) -> Tensor:
        ids, weights = self.route(x, token_ids, layer, p)
        out = self.expert(x, f"{p}.shared_experts")
        for e in ids.unique().tolist():
            rows, slot = (ids == e).nonzero(as_tuple=True)
            out = out.index_add(0, rows, weights[rows, slot, None] * self.expert(x[rows], f"{p}.experts.{e}"))
        return out

    # --- blocks ----------------------------------------------------------------------------------------------
    def block(self, h: Tensor, token_ids: Tensor, layer: int, p: str) -> Tensor:
        """One layer on the residual streams h [S, N, D]: attention then MoE, each wrapped in mHC."""
        cfg, w = self.cfg, self.w
        n = cfg.hc_mult
        for sub in ("attn", "ffn"):
            pre, post, comb = sinkhorn_split(hc_mixes(h, w[f"{p}.hc_{sub}_fn"], cfg.norm_eps),
                                             w[f"{p}.hc_{sub}_scale"], w[f"{p}.hc_{sub}_base"], n,
                                             cfg.hc_sinkhorn_iters, cfg.hc_eps)
            x = (pre[:, :, None] * h).sum(1)
            x = rms_norm(x, w[f"{p}.{sub}_norm.weight"], cfg.norm_eps)
            y = self.attention(x, layer, f"{p}.attn") if sub == "attn" else self.moe(x, token_ids, layer, f"{p}.ffn")
            # stream j receives post_j * y plus the streams mixed through comb's column j (comb transposed)
            h = post[:, :, None] * y[:, None, :] + torch.einsum("sij,sid->sjd", comb, h)
        return h

    def head(self, h: Tensor, p: str = "") -> Tensor:
        """Collapse the streams with sigmoid weights (no comb), final RMSNorm, LM head."""
        cfg, w = self.cfg, self.w
        mixes = hc_mixes(h, w[f"{p}hc_head_fn"], cfg.norm_eps)
        pre = torch.sigmoid(mixes * w[f"{p}hc_head_scale"] + w[f"{p}hc_head_base"]) + cfg.hc_eps
        x = rms_norm((pre[:, :, None] * h).sum(1), w[f"{p}norm.weight"], cfg.norm_eps)
        return x @ w["head.weight"].T

    @torch.no_grad()
    def forward(self, token_ids: Tensor | list[int]) -> ReferenceOutput:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("the reference takes one non-empty sequence of token ids")
        h = self.w["embed.weight"][ids][:, None, :].repeat(1, self.cfg.hc_mult, 1)
        for i in range(self.cfg.n_layers):
            h = self.block(h, ids, i, f"layers.{i}")
        return ReferenceOutput(logits=self.head(h), hidden_streams=h)

    @torch.no_grad()
    def mtp_logits(self, hidden_streams: Tensor, next_ids: Tensor, depth: int = 0) -> Tensor:
        """Multi-token prediction layer `depth`: predicts token t+2 from the streams at t and the id of token t+1."""
        cfg, w = self.cfg, self.w
        p = f"mtp.{depth}"
        e = rms_norm(w["embed.weight"][next_ids], w[f"{p}.enorm.weight"], cfg.norm_eps)
        hs = rms_norm(hidden_streams, w[f"{p}.hnorm.weight"], cfg.norm_eps)
        h = (e @ w[f"{p}.e_proj.weight"].T)[:, None, :] + hs @ w[f"{p}.h_proj.weight"].T
        h = self.block(h, next_ids, cfg.n_layers + depth, p)
        return self.head(h, f"{p}.")

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding by recomputing the whole sequence for each new token."""
        ids = list(prompt_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.forward(ids).logits[-1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
        return out
