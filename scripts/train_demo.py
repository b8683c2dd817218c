#!/usr/bin/env python3
"""Train the demo checkpoint: a tiny DeepSeek-V4 (every layer kind) on the checkable tasks of `dsv4.demo_tasks`.

    PYTHONPATH=backend_src python scripts/train_demo.py                         # 2400 steps, ~25 min on 1 thread
    PYTHONPATH=backend_src python scripts/train_demo.py --resume --steps 3600   # 1200 more, ~15 min

The committed checkpoint is the result of exactly these two commands (docs/DEMO.md: after the first, 90.5 % of the
evaluation's questions are right; the second continues the same run, from <bf16-out>/state.pt, with the schedule
of a 3600-step run, and ends at 100 %).

The model is the `tiny` preset's architecture (5 layers: window-only + hash MoE, CSA + hash MoE, HCA, CSA,
window-only; one MTP layer; mHC; 8 routed experts + 1 shared), initialised by the checkpoint generator
(`generate_tensors`, seed `--seed`) and trained with AdamW in FP32 on the CPU. The forward is the oracle's math
(`dsv4.reference`): mHC, MoE routing, experts, the LM head and every basic piece are the oracle's own functions and
methods; attention, the compressors and the indexer are the oracle's formulas re-written for a batch in a
[seq, batch, ...] layout, and the script checks at start-up that its logits equal `ReferenceModel.forward`.

Beyond the oracle's forward, training needs what DeepSeek's training does:
- the indexer's top-k selection has no gradient: the indexer is trained, as in DeepSeek's sparse attention, by a
  KL loss towards the main attention's distribution over the compressed entries (summed over heads), on inputs
  detached from the model; the first `--dense-frac` of the steps let the CSA layers attend to every compressed
  entry (dense warm-up) so that the main attention learns what to look at before the top-k mask is imposed;
- score-routed layers balance their experts without an auxiliary loss by nudging `gate.bias` (sign of the load
  error), hash-routed layers use the generator's fixed `tid2eid` table;
- the last `--qat-frac` of the steps are quantisation-aware: the forward sees the weights as they will be stored
  (routed experts NVFP4 with w1/w3 sharing weight_scale_2, other projections FP8 e4m3 with UE8M0 128x128 block
  scales, BF16 tensors rounded to BF16), with straight-through gradients;
- the MTP layer is trained on the same answer positions (predicting the token after next), with weight 0.3, every
  4th step (`--mtp-every`).

Outputs: `--out` (NVFP4, the layout of NVIDIA's DeepSeek-V4 NVFP4 checkpoints, plus `train_log.txt`), `--bf16-out`
(the same trained weights unquantised, in BF16, for the comparison, with `train_log.txt`, `train_log.jsonl` and the
resumable `state.pt`). Reproducible: with one thread (`--threads 1`, the default; also the faster setting on two
shared cores) the same seed gives the same loss at every step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend_src"))

from dsv4 import demo_tasks  # noqa: E402
from dsv4.checkpoint.formats import quantize_fp8_block  # noqa: E402
from dsv4.checkpoint.generator import generate_tensors  # noqa: E402
from dsv4.checkpoint.names import model_specs  # noqa: E402
from dsv4.checkpoint.presets import tiny  # noqa: E402
from dsv4.checkpoint.tokenizer import train_tokenizer  # noqa: E402
from dsv4.checkpoint.writer import (expert_format, nvfp4_global_scale, quantize_nvfp4_with_scale_2,  # noqa: E402
                                    write_checkpoint)
from dsv4.checkpoint.formats import quantize_mxfp4  # noqa: E402
from dsv4.config import ModelConfig  # noqa: E402
from dsv4.reference import ReferenceModel, hc_mixes, rms_norm, rope_tail, sinkhorn_split  # noqa: E402

Tensor = torch.Tensor


def demo_config() -> ModelConfig:
    """The `tiny` architecture unchanged except for the context limit (the demo prompts are < 512 tokens)."""
    return tiny().replace(max_position_embeddings=4096)


# ----------------------------------------------------------------------------------------------------------------
# The oracle's forward, batched ([S, B, ...] layout), differentiable, plus the indexer's KL loss
# ----------------------------------------------------------------------------------------------------------------
class TrainModel(ReferenceModel):
    """ReferenceModel whose `w` holds tensors that require grad; `forward_batch` runs B sequences at once."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Tensor]):
        super().__init__(cfg, weights)
        self.dense_csa = False       # CSA layers attend to every compressed entry (warm-up)
        self.aux: list[Tensor] = []  # indexer KL losses of the last forward
        self.loads: dict[str, Tensor] = {}

    def compress_b(self, x: Tensor, p: str, ratio: int, d: int, rope_cfg) -> Tensor:
        """`ReferenceModel.compress` for x [S, B, D] -> [S // ratio, B, d]."""
        w, cfg = self.w, self.cfg
        S, B = x.shape[:2]
        n = S // ratio
        width = w[f"{p}.wkv.weight"].shape[0]
        xs = x[: n * ratio]
        kv = (xs @ w[f"{p}.wkv.weight"].T).view(n, ratio, B, width)
        gate = (xs @ w[f"{p}.wgate.weight"].T).view(n, ratio, B, width) + w[f"{p}.ape"][None, :, None, :]
        if ratio == 4:
            prev_kv = torch.cat([torch.zeros_like(kv[:1, :, :, :d]), kv[:-1, :, :, :d]], dim=0)
            prev_gate = torch.cat([torch.full_like(gate[:1, :, :, :d], -math.inf), gate[:-1, :, :, :d]], dim=0)
            kv = torch.cat([prev_kv, kv[:, :, :, d:]], dim=1)
            gate = torch.cat([prev_gate, gate[:, :, :, d:]], dim=1)
        pooled = (kv * gate.softmax(dim=1)).sum(dim=1)
        pooled = rms_norm(pooled, w[f"{p}.norm.weight"], cfg.norm_eps)
        return rope_tail(pooled, torch.arange(n) * ratio, rope_cfg, cfg.rope_head_dim)

    def index_scores_b(self, x: Tensor, q_latent: Tensor, p: str, rope_cfg) -> Tensor:
        """The indexer's score [S, B, n] (-inf where not visible), as in `ReferenceModel.index_topk`."""
        w, cfg = self.w, self.cfg
        S, B = x.shape[:2]
        nh, hd = cfg.index_n_heads, cfg.index_head_dim
        q = (q_latent @ w[f"{p}.wq_b.weight"].T).view(S, B, nh, hd)
        q = rope_tail(q, torch.arange(S), rope_cfg, cfg.rope_head_dim)
        head_weights = (x @ w[f"{p}.weights_proj.weight"].T) * (hd ** -0.5 * nh ** -0.5)
        keys = self.compress_b(x, f"{p}.compressor", 4, hd, rope_cfg)
        score = torch.einsum("tbhd,nbd->tbhn", q, keys).relu()
        score = (score * head_weights[..., None]).sum(2)
        visible = torch.arange(keys.shape[0])[None, :] < ((torch.arange(S) + 1) // 4)[:, None]
        return score.masked_fill(~visible[:, None, :], -math.inf)

    def attention_b(self, x: Tensor, layer: int, p: str) -> Tensor:
        w, cfg = self.w, self.cfg
        S, B = x.shape[:2]
        H, hd, rd = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        ratio = cfg.compress_ratio(layer)
        rope_cfg = cfg.rope_for_layer(layer)
        pos = torch.arange(S)

        q_latent = rms_norm(x @ w[f"{p}.wq_a.weight"].T, w[f"{p}.q_norm.weight"], cfg.norm_eps)
        q = (q_latent @ w[f"{p}.wq_b.weight"].T).view(S, B, H, hd)
        q = rope_tail(rms_norm(q, None, cfg.norm_eps), pos, rope_cfg, rd)
        kv = rms_norm(x @ w[f"{p}.wkv.weight"].T, w[f"{p}.kv_norm.weight"], cfg.norm_eps)
        kv = rope_tail(kv, pos, rope_cfg, rd)

        # The window part, computed block-wise: queries in blocks of W = window_size see the keys of their own
        # and the previous block (2W), masked to t - W < j <= t. Same logits as the oracle's dense mask.
        W = cfg.window_size
        nb = -(-S // W)
        Sp = nb * W
        qp = F.pad(q, (0, 0, 0, 0, 0, 0, 0, Sp - S))
        kvp = F.pad(kv, (0, 0, 0, 0, W, Sp - S))                                    # [W + Sp, B, hd]
        kb = torch.cat([kvp[:-W].view(nb, W, B, hd), kvp[W:].view(nb, W, B, hd)], dim=1)   # [nb, 2W, B, hd]
        a = torch.arange(W)[None, :, None]
        c = torch.arange(2 * W)[None, None, :]
        wmask = (c > a) & (c <= a + W) & (torch.arange(nb)[:, None, None] * W + c - W >= 0)   # [nb, W, 2W]
        lw = torch.einsum("iabhd,icbd->iabhc", qp.view(nb, W, B, H, hd), kb) * hd ** -0.5
        lw = lw.masked_fill(~wmask[:, :, None, None, :], -math.inf).reshape(Sp, B, H, 2 * W)
        sink = w[f"{p}.attn_sink"].view(1, 1, H, 1).expand(Sp, B, H, 1)
        idx_score = None
        if ratio:
            compressed = self.compress_b(x, f"{p}.compressor", ratio, hd, rope_cfg)
            n = compressed.shape[0]
            posp = torch.arange(Sp)
            causal = (torch.arange(n)[None, :] < ((posp + 1) // ratio)[:, None])[:, None, :].expand(Sp, B, n)
            sees = causal
            if ratio == 4:
                # the indexer sees the model's activations but does not train them (DeepSeek detaches them)
                idx_score = self.index_scores_b(x.detach(), q_latent.detach(), f"{p}.indexer", rope_cfg)
                if not self.dense_csa:
                    k = min(cfg.index_topk, n)
                    chosen = torch.zeros(Sp, B, n, dtype=torch.bool)
                    if k > 0:
                        top = torch.sort(idx_score.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
                        chosen[:S].scatter_(2, top, True)
                    sees = chosen & causal
            lc = torch.einsum("tbhd,nbd->tbhn", qp, compressed) * hd ** -0.5
            lc_raw = lc
            lc = lc.masked_fill(~sees[:, :, None, :], -math.inf)
            probs = torch.cat([lw, lc, sink], dim=-1).softmax(-1)
            out = torch.einsum("iabhc,icbd->iabhd", probs[..., :2 * W].reshape(nb, W, B, H, 2 * W), kb)
            out = out.reshape(Sp, B, H, hd) + torch.einsum("tbhn,nbd->tbhd", probs[..., 2 * W:-1], compressed)
        else:
            probs = torch.cat([lw, sink], dim=-1).softmax(-1)
            out = torch.einsum("iabhc,icbd->iabhd", probs[..., :-1].reshape(nb, W, B, H, 2 * W), kb)
            out = out.reshape(Sp, B, H, hd)
        out = rope_tail(out[:S], pos, rope_cfg, rd, inverse=True)

        if idx_score is not None and torch.is_grad_enabled():
            # KL(main attention over the compressed entries, heads summed and L1-normalised || indexer softmax),
            # the target taken from the dense attention (every causal entry visible).
            with torch.no_grad():
                dl = lc_raw[:S].masked_fill(~causal[:S, :, None, :], -math.inf)
                dp = torch.cat([lw[:S], dl, sink[:S]], dim=-1).softmax(-1)[..., 2 * W:-1].sum(2)   # [S, B, n]
                target = dp / dp.sum(-1, keepdim=True).clamp_min(1e-9)
                rows = causal[:S].any(-1)                                                        # [S, B]
            logp = idx_score.masked_fill(~causal[:S], -1e9).log_softmax(-1)
            kl = (target * (target.clamp_min(1e-9).log() - logp)).sum(-1)
            self.aux.append((kl * rows).sum() / rows.sum().clamp_min(1))

        g = cfg.o_groups
        wo_a = w[f"{p}.wo_a.weight"].view(g, cfg.o_lora_rank, -1)
        out = torch.einsum("tbgi,gri->tbgr", out.reshape(S, B, g, -1), wo_a).reshape(S, B, -1)
        return out @ w[f"{p}.wo_b.weight"].T

    def block_b(self, h: Tensor, ids: Tensor, layer: int, p: str) -> Tensor:
        """`ReferenceModel.block` for h [S, B, N, D], ids [S, B]."""
        cfg, w = self.cfg, self.w
        S, B, n, D = h.shape
        for sub in ("attn", "ffn"):
            hf = h.reshape(S * B, n, D)
            pre, post, comb = sinkhorn_split(hc_mixes(hf, w[f"{p}.hc_{sub}_fn"], cfg.norm_eps),
                                             w[f"{p}.hc_{sub}_scale"], w[f"{p}.hc_{sub}_base"], n,
                                             cfg.hc_sinkhorn_iters, cfg.hc_eps)
            x = rms_norm((pre[:, :, None] * hf).sum(1), w[f"{p}.{sub}_norm.weight"], cfg.norm_eps)
            if sub == "attn":
                y = self.attention_b(x.view(S, B, D), layer, f"{p}.attn").reshape(S * B, D)
            else:
                flat_ids = ids.reshape(-1)
                if not cfg.is_hash_layer(layer) and torch.is_grad_enabled():
                    with torch.no_grad():
                        eids, _ = self.route(x, flat_ids, layer, f"{p}.ffn")
                        self.loads[p] = torch.bincount(eids.reshape(-1), minlength=cfg.n_routed_experts)
                y = self.moe(x, flat_ids, layer, f"{p}.ffn")
            hf = post[:, :, None] * y[:, None, :] + torch.einsum("sij,sid->sjd", comb, hf)
            h = hf.view(S, B, n, D)
        return h

    def forward_batch(self, ids: Tensor) -> Tensor:
        """ids [B, S] -> final residual streams [S, B, N, D]."""
        self.aux, self.loads = [], {}
        ids_t = ids.T.contiguous()
        h = self.w["embed.weight"][ids_t][:, :, None, :].expand(-1, -1, self.cfg.hc_mult, -1)
        for i in range(self.cfg.n_layers):
            h = self.block_b(h, ids_t, i, f"layers.{i}")
        return h

    def mtp_forward_batch(self, h: Tensor, next_ids: Tensor) -> Tensor:
        """`ReferenceModel.mtp_logits`'s block for h [S, B, N, D] (streams at t) and next_ids [S, B] (token t+1)."""
        cfg, w = self.cfg, self.w
        p = "mtp.0"
        e = rms_norm(w["embed.weight"][next_ids], w[f"{p}.enorm.weight"], cfg.norm_eps)
        hs = rms_norm(h, w[f"{p}.hnorm.weight"], cfg.norm_eps)
        x = (e @ w[f"{p}.e_proj.weight"].T)[:, :, None, :] + hs @ w[f"{p}.h_proj.weight"].T
        return self.block_b(x, next_ids, cfg.n_layers, p)


# ----------------------------------------------------------------------------------------------------------------
# Storage-format fake quantisation (QAT)
# ----------------------------------------------------------------------------------------------------------------
def stored_values(cfg: ModelConfig, params: dict[str, Tensor], fmt: str = "nvfp4") -> dict[str, Tensor]:
    """Each parameter as the checkpoint of format `fmt` will hold it, dequantised to float32 (no grad)."""
    out: dict[str, Tensor] = {}
    by_name = {s.param_name: s for s in model_specs(cfg)}
    with torch.no_grad():
        for name, t in params.items():
            spec = by_name[name]
            if spec.role == "table" or spec.role == "fp32":
                out[name] = t
            elif spec.role == "bf16" or fmt == "bf16":
                out[name] = t.to(torch.bfloat16).float()
            elif spec.role == "linear":
                out[name] = quantize_fp8_block(t, ue8m0_scale=True).dequantize()
            else:
                kind = expert_format(spec.name, fmt)
                if kind == "mxfp4":
                    out[name] = quantize_mxfp4(t).dequantize()
                else:
                    owner, proj = spec.name.rsplit(".", 1)
                    if proj == "w2":
                        s2 = nvfp4_global_scale(float(t.abs().max()))
                    else:
                        amax = max(float(params[f"{owner}.w1.weight"].abs().max()),
                                   float(params[f"{owner}.w3.weight"].abs().max()))
                        s2 = nvfp4_global_scale(amax)
                    out[name] = quantize_nvfp4_with_scale_2(t, s2).dequantize()
    return out


def ste(params: dict[str, Tensor], stored: dict[str, Tensor]) -> dict[str, Tensor]:
    """Forward with the stored values, gradient to the FP32 masters (straight-through)."""
    return {k: (v if not v.is_floating_point() else v + (stored[k] - v).detach()) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
class Batches:
    def __init__(self, tokenizer, seed: int):
        self.rng = random.Random(seed)
        self.tok = tokenizer
        self.bos = tokenizer.token_to_id("<｜begin▁of▁sentence｜>")
        self.eos = tokenizer.token_to_id("<｜end▁of▁sentence｜>")
        self.cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            ids = self.tok.encode(text, add_special_tokens=False).ids
            if len(self.cache) < 200000:
                self.cache[text] = ids
        return ids

    def encode_long(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def batch(self, n_seqs: int, pairs: tuple[int, int], n_queries: int) -> tuple[Tensor, Tensor]:
        """n_seqs recall sequences (`demo_tasks.training_sequence`), right-padded with EOS (masked out)."""
        seqs = [demo_tasks.training_sequence(self._enc_recall, self.bos, self.eos, self.rng, "recall", pairs=pairs,
                                             n_queries=n_queries) for _ in range(n_seqs)]
        S = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), S), self.eos, dtype=torch.long)
        mask = torch.zeros((len(seqs), S), dtype=torch.bool)
        for b, (s, m) in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(m)] = torch.tensor(m)
        return ids, mask

    def _enc_recall(self, text: str) -> list[int]:
        # the context is built of characters the tokenizer keeps single (checked at start-up); short texts cached
        return self.encode(text) if len(text) < 16 else self.encode_long(text)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def losses(model: TrainModel, ids: Tensor, mask: Tensor, mtp_weight: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(main CE over answer tokens, MTP CE, indexer KL, answer-token accuracy)."""
    h = model.forward_batch(ids)                      # [S, B, N, D]
    # position t predicts token t+1; supervised where token t+1 is an answer token (or its EOS)
    tgt_mask = mask[:, 1:].T                          # [S-1, B]
    hs = h[:-1][tgt_mask]                             # [M, N, D]
    targets = ids[:, 1:].T[tgt_mask]
    logits = model.head(hs)
    ce = F.cross_entropy(logits, targets)
    acc = (logits.argmax(-1) == targets).float().mean()
    aux = torch.stack(model.aux).mean() if model.aux else torch.zeros(())
    mtp = torch.zeros(())
    if mtp_weight > 0:
        next_ids = ids[:, 1:].T                       # token t+1 for t = 0..S-2
        hm = model.mtp_forward_batch(h[:-1], next_ids)    # predicts token t+2
        m2 = mask[:, 2:].T                            # [S-2, B]
        logits2 = model.head(hm[:-1][m2], "mtp.0.")
        mtp = F.cross_entropy(logits2, ids[:, 2:].T[m2])
        aux = torch.stack(model.aux).mean()            # the MTP layer's indexer (CSA) too
    return ce, mtp, aux, acc


CURRICULUM = [   # (fraction of the run where the stage starts, recall pairs range, queries per recall sequence)
    (0.00, (2, 8), 8),
    (0.15, (6, 20), 12),
    (0.30, (12, 32), 16),
    (0.45, (16, 44), 16),
]


def curriculum(frac: float, tokens: int) -> dict:
    """Stage of the run: short recall contexts (mostly inside the window) first, the evaluation's 20-40 pairs
    from 45% of the run on. The batch holds about `tokens` tokens (at least 4 sequences)."""
    stage = [c for c in CURRICULUM if c[0] <= frac][-1]
    pairs, n_queries = stage[1], stage[2]
    seq_len = 1 + pairs[1] * demo_tasks.PAIR_TOKENS + n_queries * 8
    return dict(pairs=pairs, n_queries=n_queries, n_seqs=max(4, round(tokens / seq_len)))


def check_against_reference(cfg: ModelConfig, params: dict[str, Tensor], batches: Batches) -> float:
    """The batched forward's logits equal ReferenceModel.forward's, sequence by sequence (sparse CSA)."""
    model = TrainModel(cfg, params)
    ref = ReferenceModel(cfg, {k: v.detach() for k, v in params.items()})
    ids, _ = batches.batch(3, (20, 30), 2)
    lengths = [int((ids[b] != batches.eos).nonzero().max()) + 1 for b in range(ids.shape[0])]
    with torch.no_grad():
        h = model.forward_batch(ids)
        worst = 0.0
        for b, L in enumerate(lengths):
            mine = model.head(h[:L, b])
            theirs = ref.forward(ids[b, :L]).logits
            worst = max(worst, float((mine - theirs).abs().max() / theirs.abs().max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "checkpoints" / "demo"))
    ap.add_argument("--bf16-out", default=str(ROOT / "build" / "demo-bf16"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="stop early when this much wall time has passed (0: no limit); the LR schedule follows "
                         "whichever of steps/time runs out first")
    ap.add_argument("--batch-tokens", type=int, default=1500, help="about this many tokens per batch")
    ap.add_argument("--mtp-every", type=int, default=4, help="train the MTP layer every N steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--dense-frac", type=float, default=0.45)
    ap.add_argument("--qat-frac", type=float, default=0.15)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--aux-weight", type=float, default=0.1)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=50, help="save a resumable state every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from <bf16-out>/state.pt")
    ap.add_argument("--no-check", action="store_true", help="skip the start-up check against the reference")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = demo_config()
    tokenizer = train_tokenizer(cfg.vocab_size)
    batches = Batches(tokenizer, seed=args.seed + 1)
    for ch in "k=,;?+0123456789":
        assert len(tokenizer.encode(ch, add_special_tokens=False).ids) == 1, ch

    params = {k: (v.float() if v.is_floating_point() else v) for k, v in generate_tensors(cfg, seed=args.seed)}
    trainable = {k: v.requires_grad_(True) for k, v in params.items()
                 if v.is_floating_point() and not k.endswith(".gate.bias")}

    log_dir = Path(args.bf16_out)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_json = open(log_dir / "train_log.jsonl", "a" if args.resume else "w")
    log_txt = open(log_dir / "train_log.txt", "a" if args.resume else "w")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log_txt.write(msg + "\n")
        log_txt.flush()

    say(f"demo model: {sum(v.numel() for v in params.values()) / 1e6:.2f}M parameters, layers "
        f"{list(cfg.compress_ratios)} (last = MTP), window {cfg.window_size}, index_topk {cfg.index_topk}; "
        f"args {vars(args)}")
    if not args.no_check:   # its own data stream: the run is the same with or without the check
        err = check_against_reference(cfg, params, Batches(tokenizer, seed=args.seed + 1000))
        say(f"start-up check: batched training forward vs ReferenceModel.forward, max rel. logit error {err:.2e}")
        if err > 1e-4:
            raise SystemExit("the training forward does not match the reference")

    decay = [v for k, v in trainable.items() if v.dim() >= 2 and not k.startswith("hc_") and ".hc_" not in k]
    no_decay = [v for k, v in trainable.items() if not (v.dim() >= 2 and not k.startswith("hc_") and ".hc_" not in k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    t0 = time.monotonic()
    budget = args.minutes * 60 if args.minutes > 0 else math.inf
    ema = None
    step = 0
    state_path = log_dir / "state.pt"
    if args.resume:
        st = torch.load(state_path, weights_only=False)
        with torch.no_grad():
            for k, v in st["params"].items():
                params[k].copy_(v)
        opt.load_state_dict(st["opt"])
        batches.rng.setstate(st["data_rng"])
        step, ema = st["step"], st["ema"]
        t0 -= st["elapsed"]
        say(f"resumed from {state_path} at step {step}")
    while step < args.steps:
        elapsed = time.monotonic() - t0
        frac = max(step / args.steps, elapsed / budget)
        if frac >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        qat = frac >= 1.0 - args.qat_frac
        if qat:
            w = ste(params, stored_values(cfg, params))
        else:
            w = params
        model = TrainModel(cfg, w)
        model.dense_csa = frac < args.dense_frac
        cur = curriculum(frac, args.batch_tokens)
        ids, mask = batches.batch(cur["n_seqs"], cur["pairs"], cur["n_queries"])
        mtp_w = args.mtp_weight if step % args.mtp_every == 0 else 0.0
        ce, mtp, aux, acc = losses(model, ids, mask, mtp_w)
        loss = ce + mtp_w * mtp + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        opt.step()
        with torch.no_grad():   # auxiliary-loss-free load balancing of the score-routed layers
            for prefix, load in model.loads.items():
                b = params[f"{prefix}.ffn.gate.bias"]
                b += args.bias_rate * torch.sign(load.float().mean() - load.float())
        step += 1
        ce_v = float(ce.detach())
        ema = ce_v if ema is None else 0.95 * ema + 0.05 * ce_v
        rec = dict(step=step, t=round(time.monotonic() - t0, 1), lr=lr, loss=loss.item(), ce=ce_v,
                   ce_ema=ema, mtp=mtp.item(), idx_kl=aux.item(), answer_acc=acc.item(), grad_norm=gn.item(),
                   seq_len=ids.shape[1], dense_csa=model.dense_csa, qat=qat)
        log_json.write(json.dumps(rec) + "\n")
        if step % args.log_every == 0 or step == 1:
            log_json.flush()
            say(f"step {step:5d}  t {rec['t']:7.1f}s  lr {lr:.2e}  loss {rec['loss']:.4f}  ce {rec['ce']:.4f} "
                f"(ema {ema:.4f})  mtp {rec['mtp']:.3f}  idx_kl {rec['idx_kl']:.3f}  answer-token acc "
                f"{rec['answer_acc']:.3f}  |g| {rec['grad_norm']:.2f}  S {rec['seq_len']}"
                f"{'  dense-CSA' if model.dense_csa else ''}{'  QAT' if qat else ''}")
        if step % args.save_every == 0:
            torch.save(dict(params={k: v.detach() for k, v in params.items()}, opt=opt.state_dict(),
                            data_rng=batches.rng.getstate(), step=step, ema=ema,
                            elapsed=time.monotonic() - t0), state_path)
    say(f"trained {step} steps in {time.monotonic() - t0:.0f}s")

    final = {k: v.detach() for k, v in params.items()}
    write_checkpoint(cfg, final, args.bf16_out, "bf16", tokenizer=tokenizer)
    write_checkpoint(cfg, final, args.out, "nvfp4", tokenizer=tokenizer)
    say(f"wrote {args.out} (nvfp4) and {args.bf16_out} (bf16)")
    shutil.copyfile(log_dir / "train_log.txt", Path(args.out) / "train_log.txt")   # the loss curve ships along
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
