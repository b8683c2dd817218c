"""`dsv4 bench attention`: the CuTe sparse-attention decode kernel vs measured HBM bandwidth and vs
torch SDPA over the same KV rows gathered beforehand, at context 1k/8k/64k and batch 1/16/64; with `--prefill`,
prefill chunks in TFLOP/s against a BF16 GEMM measured in the same run and against SDPA.

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


def parse_variant(v: str) -> dict:
    """'auto' or ':'-joined tokens: m<heads per CTA>, s<splits>, n<rows per tile>, st<stages>, fp32 / bf16 (split
    partial dtype), wg / sync (the warpgroup-MMA or the mma.sync kernel; default: wgmma wherever it applies),
    cl / nocl (wgmma splits merged in a cluster, or through global partials and the combine kernel)."""
    out = dict(name=v, heads_cta=None, num_splits=None, part_bf16=None, block_n=64, stages=2, wgmma=None,
               cluster=None)
    for tok in v.split(":"):
        if tok in ("auto", ""):
            continue
        if tok in ("wg", "sync"):
            out["wgmma"] = tok == "wg"
        elif tok in ("cl", "nocl"):
            out["cluster"] = tok == "cl"
        elif tok == "fp32":
            out["part_bf16"] = False
        elif tok == "bf16":
            out["part_bf16"] = True
        elif tok.startswith("st"):
            out["stages"] = int(tok[2:])
        elif tok[0] == "n":
            out["block_n"] = int(tok[1:])
        elif tok[0] == "m":
            out["heads_cta"] = int(tok[1:])
        elif tok[0] == "s":
            out["num_splits"] = int(tok[1:])
        else:
            raise ValueError(f"unknown variant token {tok!r}")
    return out


def host_costs(case: Case, reps: int = 50) -> dict:
    """Host µs of one engine-path `sparse_attention` call with the step's plan cached (launches only, no sync inside
    the loop), of building the per-step plan for a fresh batch, and of the whole call when every launch argument is
    converted with from_dlpack instead (TVM-FFI off)."""
    import copy

    from dsv4.ops import cute_attention as ca

    def call():
        return ca.sparse_attention(case.q, case.cache, case.ratio, case.window, case.topk, case.sink, case.scale,
                                   case.batch)

    def loop():
        call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / reps * 1e6

    res = dict(call_us=round(loop(), 1), tvm_ffi=ca.TVM_FFI)
    t0 = time.perf_counter()
    for _ in range(10):
        b = copy.copy(case.batch)
        b.__dict__.pop("_cute_attention_plan", None)
        ca.plan_for(b, case.q.device)
    torch.cuda.synchronize()
    res["plan_us"] = round((time.perf_counter() - t0) / 10 * 1e6, 1)
    if ca.TVM_FFI:
        ca.TVM_FFI = False
        try:
            case.batch.__dict__.pop("_cute_attention_plan", None)
            res["call_us_dlpack"] = round(loop(), 1)
        finally:
            ca.TVM_FFI = True
            case.batch.__dict__.pop("_cute_attention_plan", None)
    return res


KIND_RATIO = {"csa": 4, "hca": 128}      # compress ratio of each attention kind (window-only: 0)


def _flush_buffer() -> torch.Tensor:
    """256 MiB that _time zeroes before each repeat, so that no repeat reads its inputs from L2."""
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def _gather_peer(rows_total: int, d: int, reps: int, flush: torch.Tensor, pool: list) -> float:
    """µs of the read-only gather peer (dsv4_kernels.gather_read) over as many random rows of d BF16 values as the
    case reads, from a 4 GiB pool (made on first use, kept in `pool`)."""
    from dsv4_kernels.gather_read import gather_read

    if not pool:
        words = d * 2 // 4
        pool.append(torch.randint(-2 ** 31, 2 ** 31 - 1, ((4 << 30) // (4 * words), words), dtype=torch.int32,
                                  device="cuda"))
    n = max(32, rows_total // 32 * 32)
    idx = torch.randint(0, pool[0].shape[0], (n,), dtype=torch.int32, device="cuda")
    out = gather_read(pool[0], idx, 32)
    return _time(lambda: gather_read(pool[0], idx, 32, out), reps, flush)


def bench(ctxs=(1024, 8192, 65536), batches=(1, 16, 64), heads=64, d=512, kinds=("csa", "hca"), topk=512,
          reps=30, variants=("auto",), sdpa=True, host=True, gather_peer=False) -> list[dict]:
    from dsv4.ops.cute_attention import plan_for, prepare_sparse_attention

    flush = _flush_buffer()
    bw = hbm_bandwidth(flush)
    print(json.dumps({"hbm_copy_gbps": round(bw / 1e9, 1)}), flush=True)
    results = []
    pool: list = []
    for kind in kinds:
        ratio = KIND_RATIO.get(kind, 0)
        for ctx in ctxs:
            for B in batches:
                case = make_case([ctx - 1] * B, [1] * B, heads, d, ratio, topk=topk, poison=False,
                                 topk_holes=False)
                plan = plan_for(case.batch, case.q.device)
                n_rows = min(ctx, 128) + (min(topk, ctx // 4) if ratio == 4 else (ctx // ratio if ratio else 0))
                nbytes = B * (n_rows * d * 2 + 2 * heads * d * 2)
                us_sdpa = float("nan")
                if sdpa:
                    # SDPA over the same rows gathered beforehand (all tokens see n_rows rows: uniform batch)
                    kv = torch.randn(B, 1, n_rows, d, device="cuda", dtype=torch.bfloat16)
                    qq = case.q.view(B, heads, 1, d)
                    sd = lambda: torch.nn.functional.scaled_dot_product_attention(qq, kv, kv, scale=case.scale,
                                                                                 enable_gqa=True)
                    try:
                        us_sdpa = _time(sd, reps, flush)
                    except Exception:  # noqa: BLE001
                        pass
                    del kv
                us_peer = _gather_peer(B * n_rows, d, reps, flush, pool) if gather_peer else float("nan")
                for v in variants:
                    var = parse_variant(v)
                    f, _ = prepare_sparse_attention(case.q, case.cache, ratio, 128, case.topk, case.sink,
                                                    case.scale, case.batch, plan, var["num_splits"],
                                                    var["heads_cta"], var["part_bf16"], var["block_n"],
                                                    var["stages"], var["wgmma"], var["cluster"])
                    us = _time(f, reps, flush)
                    r = dict(kind=kind, ctx=ctx, batch=B, heads=heads, rows=n_rows, variant=v, splits=f.splits,
                             wgmma=f.wgmma, cluster=f.cluster,
                             us=round(us, 2), gbps=round(nbytes / (us * 1e-6) / 1e9, 1),
                             pct_hbm=round(100 * nbytes / (us * 1e-6) / bw, 1), sdpa_us=round(us_sdpa, 2),
                             speedup_vs_sdpa=round(us_sdpa / us, 2), gather_peer_us=round(us_peer, 2),
                             x_gather_peer=round(us / us_peer, 2))
                    if host and v == variants[0]:
                        r.update(host_costs(case))
                    results.append(r)
                    print(json.dumps(r), flush=True)
                del case
    return results


def bench_indexer(ctxs=(1024, 8192, 65536), batches=(1, 16, 64), n_heads=64, dk=128, topk=512, reps=30) -> list[dict]:
    """CuTe indexer_topk (score kernel + torch.topk on its keys) vs TorchOps.indexer_topk, decode."""
    from dsv4.ops import cute_attention as ca
    from dsv4.ops.torch_ops import TorchOps

    ref = TorchOps(device="cuda", dtype=torch.bfloat16)
    flush = _flush_buffer()
    bw = hbm_bandwidth(flush)
    out = []
    for ctx in ctxs:
        for B in batches:
            case = make_case([ctx - 1] * B, [1] * B, 1, 64, 0, poison=False)
            nblk = case.cache.swa_kv.shape[0]
            ik = torch.randn(nblk, case.cache.block_size // 4, dk, device="cuda", dtype=torch.bfloat16)
            q = torch.randn(B, n_heads, dk, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(B, n_heads, device="cuda") * (dk ** -0.5 * n_heads ** -0.5)
            f = lambda: ca.indexer_topk(q, w, ik, case.cache.block_size, topk, case.batch)
            g = lambda: ref.indexer_topk(q, w, ik, case.cache.block_size, topk, case.batch)
            us = _time(f, reps, flush)
            us_ref = _time(g, max(3, reps // 5), flush)
            f()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                f()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            nbytes = B * (ctx // 4) * dk * 2
            r = dict(op="indexer", ctx=ctx, batch=B, n_heads=n_heads, dk=dk, topk=topk, us=round(us, 2),
                     key_gbps=round(nbytes / (us * 1e-6) / 1e9, 1), pct_hbm=round(100 * nbytes / (us * 1e-6) / bw, 1),
                     torch_us=round(us_ref, 1), speedup=round(us_ref / us, 2),
                     host_us=round((t1 - t0) / 20 * 1e6, 1))
            out.append(r)
            print(json.dumps(r), flush=True)
    return out


def tensor_core_ceiling(flush: torch.Tensor) -> float:
    """FLOP/s of a large BF16 cuBLAS GEMM (8192^3), measured in the same run: the prefill roofline's ceiling."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    us = _time(lambda: a @ b, 10, flush)
    del a, b
    return 2 * 8192 ** 3 / (us * 1e-6)


def prefill_flops(case: Case, heads: int, d: int) -> int:
    """2 GEMMs (S = QKᵀ, O = PV) of 2 * heads * d FLOP per (query token, KV row it reads)."""
    rows = 0
    for t, p in enumerate(case.batch.positions.tolist()):
        n = min(p + 1, case.window)
        if case.ratio == 4:
            n += int((case.topk[t] >= 0).sum())
        elif case.ratio:
            n += (p + 1) // case.ratio
        rows += n
    return 4 * heads * d * rows


def bench_prefill(chunks=(512, 2048, 8192), cached=(0, 8192), heads=64, d=512, kinds=("csa", "hca", "window"),
                  topk=512, reps=10, sdpa=True) -> list[dict]:
    """One sequence's prefill chunk of n query tokens on c cached ones, through the same kernel (each query token
    its own row list): TFLOP/s over the measured BF16 GEMM ceiling, and SDPA's TFLOP/s on dense causal attention of
    the same query count and key length (a peer, not the same computation: it reads every key)."""
    from dsv4.ops.cute_attention import plan_for, prepare_sparse_attention

    flush = _flush_buffer()
    peak = tensor_core_ceiling(flush)
    print(json.dumps({"bf16_gemm_tflops": round(peak / 1e12, 1)}), flush=True)
    results = []
    for kind in kinds:
        ratio = KIND_RATIO.get(kind, 0)
        for c in cached:
            for n in chunks:
                case = make_case([c], [n], heads, d, ratio, topk=topk, poison=False, topk_holes=False)
                f, _ = prepare_sparse_attention(case.q, case.cache, ratio, 128, case.topk, case.sink, case.scale,
                                                case.batch, plan_for(case.batch, case.q.device))
                us = _time(f, reps, flush)
                flops = prefill_flops(case, heads, d)
                r = dict(kind=kind, cached=c, chunk=n, heads=heads, us=round(us, 1),
                         tflops=round(flops / (us * 1e-6) / 1e12, 2),
                         pct_of_gemm=round(100 * flops / (us * 1e-6) / peak, 1))
                # d = 512 is beyond SDPA's flash kernels: its fallback materialises [heads, n, c + n] fp32 scores
                if sdpa and heads * n * (c + n) * 4 > 8 << 30:
                    r["sdpa_error"] = "skipped: the score matrix would take more than 8 GiB"
                elif sdpa:
                    q = case.q.view(1, n, heads, d).transpose(1, 2)
                    kv = torch.randn(1, 1, c + n, d, device="cuda", dtype=torch.bfloat16)
                    mask = torch.ones(n, c + n, dtype=torch.bool, device="cuda").tril(diagonal=c)
                    sd = lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=mask,
                                                                                 scale=case.scale, enable_gqa=True)
                    try:
                        us_sd = _time(sd, reps, flush)
                        dense = 4 * heads * d * sum(c + i + 1 for i in range(n))
                        r.update(sdpa_us=round(us_sd, 1), sdpa_tflops=round(dense / (us_sd * 1e-6) / 1e12, 2))
                    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                        r["sdpa_error"] = f"{type(e).__name__}: {e}"[:200]
                    del kv, mask
                results.append(r)
                print(json.dumps(r), flush=True)
                del case
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
    p.add_argument("--variants", nargs="+", default=["auto"],
                   help="kernel variants: auto, or ':'-joined m<heads per CTA>, s<splits>, n<tile rows>, st<stages>, "
                        "fp32|bf16, wg|sync, cl|nocl (e.g. m16:s2, m64:n32:st4, sync:m32, wg:nocl)")
    p.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baseline")
    p.add_argument("--no-host", action="store_true", help="skip the host-cost measurements")
    p.add_argument("--gather-peer", action="store_true",
                   help="also time the read-only gather peer (dsv4_kernels.gather_read) over as many random rows: "
                        "the most any kernel reading those rows can do")
    p.add_argument("--indexer", action="store_true", help="benchmark indexer_topk instead (cute vs torch)")
    p.add_argument("--prefill", action="store_true",
                   help="benchmark prefill chunks instead: TFLOP/s vs the measured BF16 GEMM ceiling and vs SDPA")
    p.add_argument("--chunk", type=int, nargs="+", default=[512, 2048, 8192], help="with --prefill: query tokens")
    p.add_argument("--cached", type=int, nargs="+", default=[0, 8192], help="with --prefill: cached tokens")
    p.add_argument("--json", help="write the results to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.prefill:
        res = bench_prefill(tuple(args.chunk), tuple(args.cached), args.heads, args.head_dim,
                            tuple(k for k in args.kinds), args.topk, args.reps, not args.no_sdpa)
    elif args.indexer:
        res = bench_indexer(tuple(args.ctx), tuple(args.batch), topk=args.topk, reps=args.reps)
    else:
        res = bench(tuple(args.ctx), tuple(args.batch), args.heads, args.head_dim, tuple(args.kinds), args.topk,
                    args.reps, tuple(args.variants), not args.no_sdpa, not args.no_host, args.gather_peer)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
