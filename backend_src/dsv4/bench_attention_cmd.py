"""`dsv4 bench attention`: the CuTe sparse-attention decode kernel vs measured HBM bandwidth and vs
torch SDPA over the same KV rows gathered beforehand, at context 1k/8k/64k and batch 1/16/64.

Bytes counted per query token: every KV row it must read (window rows min(ctx, W) plus compressed rows: all
(ctx // ratio) for HCA, `topk` for CSA) x d x 2 B, plus q and out (H x d x 2 B each). HBM bandwidth is measured in the
same run by a large device-to-device copy (read + write bytes). Times: CUDA events around each call, median of
repeats, L2 flushed (256 MiB memset) before every repeat. Also holds `make_case`, the random paged-cache builder the
GPU tests share.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass

import torch

from dsv4.ops.base import ForwardBatch, LayerCache


@dataclass
class Case:
    q: torch.Tensor
    cache: LayerCache
    batch: ForwardBatch
    ratio: int
    window: int
    topk: torch.Tensor | None
    sink: torch.Tensor
    scale: float
    rows: list[torch.Tensor]   # per token: the [n, d] KV rows it reads (window then compressed), for SDPA / bytes


def make_case(ctx_lens: list[int], new_tokens: list[int], heads: int, d: int, ratio: int, window: int = 128,
              topk: int = 512, block_size: int = 128, device: str = "cuda", seed: int = 0, poison: bool = True,
              gather_rows: bool = False, topk_holes: bool = True) -> Case:
    """Random paged caches for sequences with ctx_lens[b] cached tokens and new_tokens[b] queries each.

    Block tables are random permutations; window blocks no query of this step can see are released (-1). Pool blocks
    owned by nobody are filled with NaN (except the pool's last block, which TorchOps' wrap-around of -1 reads),
    so a kernel that reads a row it should not read fails the NaN check.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = len(ctx_lens)
    lens = [c + n for c, n in zip(ctx_lens, new_tokens)]
    nblk = [math.ceil(L / block_size) for L in lens]
    total_blocks = sum(nblk) + 2
    perm_w = torch.randperm(total_blocks - 1, generator=g).tolist()
    perm_c = torch.randperm(total_blocks - 1, generator=g).tolist()
    swa_tables, comp_tables, used_w, used_c = [], [], set(), set()
    off = 0
    for b in range(B):
        tw = perm_w[off:off + nblk[b]]
        tc = perm_c[off:off + nblk[b]]
        off += nblk[b]
        first_visible = max(0, ctx_lens[b] - window + 1)
        tw = [blk if (i + 1) * block_size > first_visible else -1 for i, blk in enumerate(tw)]
        swa_tables.append(tw)
        comp_tables.append(tc)
        used_w.update(x for x in tw if x >= 0)
        used_c.update(tc)
    dt = torch.bfloat16
    gd = torch.Generator(device=device).manual_seed(seed)
    swa = torch.randn(total_blocks, block_size, d, generator=gd, device=device, dtype=dt)
    comp_kv = None
    if ratio:
        comp_kv = torch.randn(total_blocks, block_size // ratio, d, generator=gd, device=device, dtype=dt)
    if poison:
        dead_w = torch.ones(total_blocks, dtype=torch.bool)
        dead_w[list(used_w)] = False
        dead_w[-1] = False
        swa[dead_w.to(device)] = float("nan")
        if comp_kv is not None:
            dead_c = torch.ones(total_blocks, dtype=torch.bool)
            dead_c[list(used_c)] = False
            dead_c[-1] = False
            comp_kv[dead_c.to(device)] = float("nan")
    qs = [0]
    for n in new_tokens:
        qs.append(qs[-1] + n)
    T = qs[-1]
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx_lens, new_tokens)]).to(device)
    slot = []
    for b in range(B):
        for p in range(ctx_lens[b], lens[b]):
            slot.append(swa_tables[b][p // block_size] * block_size + p % block_size)
    batch = ForwardBatch(token_ids=torch.zeros(T, dtype=torch.long, device=device), positions=positions,
                         query_start=qs, context_lens=list(ctx_lens), state_slots=list(range(B)),
                         swa_block_tables=swa_tables, comp_block_tables=comp_tables,
                         swa_slot_mapping=torch.tensor(slot, dtype=torch.long, device=device),
                         logits_indices=torch.arange(T, device=device))
    cache = LayerCache(swa_kv=swa, block_size=block_size, comp_kv=comp_kv)
    q = torch.randn(T, heads, d, generator=gd, device=device, dtype=dt)
    sink = torch.randn(heads, generator=gd, device=device)
    tk = None
    if ratio == 4:
        tk = torch.full((T, topk), -1, dtype=torch.long)
        for t, p in enumerate(positions.tolist()):
            vis = (p + 1) // 4
            k = min(topk, vis)
            if k:
                sel = torch.randperm(vis, generator=g)[:k]
                if topk_holes and k > 2:
                    sel[torch.randperm(k, generator=g)[: k // 8]] = -1
                tk[t, :k] = sel
        tk = tk.to(device)
    rows = []
    if gather_rows:
        rows = _gather_rows(cache, batch, ratio, window, tk)
    return Case(q, cache, batch, ratio, window, tk, sink, d ** -0.5, rows)


def _gather_rows(cache: LayerCache, batch: ForwardBatch, ratio: int, window: int, tk) -> list[torch.Tensor]:
    bs, d = cache.block_size, cache.swa_kv.shape[-1]
    swa = cache.swa_kv.view(-1, d)
    out = []
    for b in range(batch.num_seqs):
        tw = torch.tensor(batch.swa_block_tables[b], device=swa.device)
        tc = torch.tensor(batch.comp_block_tables[b], device=swa.device)
        for t in range(batch.query_start[b], batch.query_start[b + 1]):
            p = int(batch.positions[t])
            pos = torch.arange(max(0, p - window + 1), p + 1, device=swa.device)
            parts = [swa[tw[pos // bs] * bs + pos % bs]]
            if ratio:
                pb = bs // ratio
                ent = torch.arange((p + 1) // ratio, device=swa.device) if ratio != 4 else tk[t][tk[t] >= 0]
                if ent.numel():
                    parts.append(cache.comp_kv.view(-1, d)[tc[ent // pb] * pb + ent % pb])
            out.append(torch.cat(parts))
    return out


def _time(fn, reps: int, flush: torch.Tensor) -> float:
    """Median microseconds of fn() between CUDA events, L2 flushed before each repeat; a ~1.5 ms GPU sleep ahead of
    the start event hides the host's launch cost (the JIT call with from_dlpack-converted arguments costs tens to
    hundreds of microseconds of host time: see docs/PERF_ATTENTION.md)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        torch.cuda._sleep(3_000_000)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def hbm_bandwidth(flush: torch.Tensor) -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    us = _time(lambda: dst.copy_(src), 20, flush)
    del src, dst
    return 2 * (1 << 30) / (us * 1e-6)


def bench(ctxs=(1024, 8192, 65536), batches=(1, 16, 64), heads=64, d=512, kinds=("csa", "hca"), topk=512,
          reps=30) -> list[dict]:
    from dsv4.ops.cute_attention import plan_for, prepare_sparse_attention

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    bw = hbm_bandwidth(flush)
    results = []
    for kind in kinds:
        ratio = 4 if kind == "csa" else (128 if kind == "hca" else 0)
        for ctx in ctxs:
            for B in batches:
                case = make_case([ctx - 1] * B, [1] * B, heads, d, ratio, topk=topk, poison=False,
                                 topk_holes=False)
                plan = plan_for(case.batch, case.q.device)
                f, _ = prepare_sparse_attention(case.q, case.cache, ratio, 128, case.topk, case.sink, case.scale,
                                                case.batch, plan)
                us = _time(f, reps, flush)
                t0 = time.perf_counter()
                for _ in range(20):
                    f()
                torch.cuda.synchronize()
                host_us = (time.perf_counter() - t0) / 20 * 1e6
                n_rows = min(ctx, 128) + (min(topk, ctx // 4) if ratio == 4 else (ctx // ratio if ratio else 0))
                nbytes = B * (n_rows * d * 2 + 2 * heads * d * 2)
                # SDPA over the same rows gathered beforehand (all tokens see n_rows rows: uniform batch)
                kv = torch.randn(B, 1, n_rows, d, device="cuda", dtype=torch.bfloat16)
                qq = case.q.view(B, heads, 1, d)
                sd = lambda: torch.nn.functional.scaled_dot_product_attention(qq, kv, kv, scale=case.scale,
                                                                             enable_gqa=True)
                try:
                    us_sdpa = _time(sd, reps, flush)
                except Exception as e:  # noqa: BLE001
                    us_sdpa = float("nan")
                r = dict(kind=kind, ctx=ctx, batch=B, heads=heads, rows=n_rows, us=round(us, 2),
                         gbps=round(nbytes / (us * 1e-6) / 1e9, 1), pct_hbm=round(100 * nbytes / (us * 1e-6) / bw, 1),
                         sdpa_us=round(us_sdpa, 2), speedup_vs_sdpa=round(us_sdpa / us, 2),
                         back_to_back_us=round(host_us, 1))
                results.append(r)
                print(json.dumps(r), flush=True)
                del case
    print(json.dumps({"hbm_copy_gbps": round(bw / 1e9, 1)}))
    return results


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="benchmark the CuTe sparse-attention decode kernel")
    p.add_argument("--ctx", type=int, nargs="+", default=[1024, 8192, 65536])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=512)
    p.add_argument("--topk", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=["csa", "hca"], choices=["csa", "hca", "window"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", help="write the results to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    res = bench(tuple(args.ctx), tuple(args.batch), args.heads, args.head_dim, tuple(args.kinds), args.topk,
                args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
