"""`dsv4 bench gemm|moe`: the CuTe DSL NVFP4 / FP8 kernels against cuBLAS BF16 and the measured HBM bandwidth.

`bench gemm --fmt nvfp4|fp8|both`: NVFP4 W4A16 rows (the NVFP4-quantised shapes, `SHAPES`) and/or FP8-block W8A16
rows (the projections the checkpoint stores as FP8 e4m3 + 128x128 UE8M0 scales, `FP8_SHAPES`). Every row: the CuTe
kernel's time, cuBLAS BF16 on the same dequantised weight in the same run, the weight bytes the kernel reads per
second against the measured HBM copy bandwidth, and the path / plan.

Prints a table and writes JSON (--json-out). Needs a CUDA GPU with CuTe DSL (`import dsv4_kernels`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
from typing import Any, Callable

import torch

# (name, N, K) of the projections that run through the NVFP4 GEMM
SHAPES = {
    "flash": [("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096), ("wo_b", 4096, 8192),
              ("expert.w1", 2048, 4096), ("expert.w2", 4096, 2048), ("head", 129280, 4096)],
    "pro": [("wq_a", 1536, 7168), ("wq_b", 65536, 1536), ("wkv", 512, 7168), ("wo_b", 7168, 16384),
            ("expert.w1", 3072, 7168), ("expert.w2", 7168, 3072)],
}
# (name, N, K) of the projections V4 stores as FP8 blocks and CuteOps runs through the W8A16 GEMM (wo_a, grouped, runs
# through the same kernel and is timed inside `bench decode`; shared.w3 has w1's shape; MTP layers are not run)
FP8_SHAPES = {
    "flash": [("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096), ("wo_b", 4096, 8192),
              ("idx.wq_b", 8192, 1024), ("shared.w1", 2048, 4096), ("shared.w2", 4096, 2048)],
    "pro": [("wq_a", 1536, 7168), ("wq_b", 65536, 1536), ("wkv", 512, 7168), ("wo_b", 7168, 16384),
            ("idx.wq_b", 8192, 1536), ("shared.w1", 3072, 7168), ("shared.w2", 7168, 3072)],
}
MOE = {"flash": dict(experts=256, dim=4096, inter=2048, topk=6), "pro": dict(experts=384, dim=7168, inter=3072, topk=6)}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `gemm` and `moe` under `dsv4 bench`."""
    for what, text in (("gemm", "NVFP4 W4A16 / FP8 W8A16 GEMM vs cuBLAS BF16 and the HBM roofline"),
                       ("moe", "NVFP4 grouped MoE vs the HBM floor of the experts touched")):
        _add_one(sub.add_parser(what, help=text), what)


def _add_one(p: argparse.ArgumentParser, what: str) -> None:
    p.set_defaults(what=what)
    p.add_argument("--model", choices=("flash", "pro", "both"), default="both")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M (gemm)")
    p.add_argument("--batches", default="1,8,64,256", help="comma-separated token counts (moe)")
    p.add_argument("--shapes", default="", help="comma-separated projection names to keep (gemm)")
    p.add_argument("--json-out", default="", help="write the results here as JSON")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--fused-max", default="", help="gemm: comma-separated nvfp4_gemm.FUSED_MAX values to compare "
                   "(0 = partials + reduce kernel); default: the module's setting")
    p.add_argument("--fmt", choices=("nvfp4", "fp8", "both"), default="nvfp4",
                   help="gemm: NVFP4 W4A16 rows, FP8-block W8A16 rows, or both")
    p.add_argument("--fp8-plans", default="auto", help="gemm --fmt fp8: comma-separated decode plans to compare, "
                   "'auto' (fp8_gemm.fp8_gemv_plan) or SxU[xP] = K splits x unroll [x L2 prefetch iterations]")
    p.add_argument("--cold-l2", action="store_true", help="gemm: every timed call reads a different copy of the "
                   "weight (copies >= 2x the L2 size), so weights that fit in L2 are read from HBM as in a model "
                   "step; default: the same weight every call (what docs/PERF.md's NVFP4 rows measured)")
    p.add_argument("--moe-ks", default="", help="moe: comma-separated decode K splits to compare, 'auto' or "
                   "GxD (gate_up x down), plus 'sorted' for the torch-routing path")
    p.set_defaults(func=run)


def time_ms(fn, reps: int = 50, graph: bool = True, inner: int = 10) -> float:
    """Median time of fn() in ms: CUDA-graph replays of `inner` calls when graph=True, events around each."""
    fn()
    torch.cuda.synchronize()
    g = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
        except Exception:  # noqa: BLE001 - fall back to eager timing
            g = None
    if g is None:
        inner = 1
    run = g.replay if g is not None else fn
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def hbm_bandwidth(reps: int = 20) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + written), 2 GiB buffers."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), reps, graph=False)
    del a, b
    return 2 * n / (ms * 1e-3)


def _device() -> str:
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("dsv4 bench needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    models = ["flash", "pro"] if args.model == "both" else [args.model]
    bw = hbm_bandwidth()
    result = {"device": _device(), "hbm_copy_GBps": bw / 1e9, "what": args.what, "rows": []}
    print(f"device: {result['device']}  measured HBM copy bandwidth: {bw / 1e9:.0f} GB/s")
    if args.what == "gemm":
        result["rows"] = bench_gemm(models, [int(m) for m in args.ms.split(",")], bw, args)
    else:
        result["rows"] = bench_moe(models, [int(b) for b in args.batches.split(",")], bw, args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def bench_gemm(models, ms, bw, args) -> list[dict]:
    rows = []
    hdr = (f"{'fmt':5} {'model':6} {'proj':10} {'N':>6} {'K':>6} {'M':>5} {'cute us':>9} {'cublas us':>9} "
           f"{'x cublas':>8} {'wGB/s':>7} {'%HBM':>5} {'TFLOP/s':>7} {'read us':>8} {'read%':>5} {'x read':>6} "
           f"{'path':>10} plan")
    print(hdr)
    fmts = ["nvfp4", "fp8"] if getattr(args, "fmt", "nvfp4") == "both" else [getattr(args, "fmt", "nvfp4")]
    for fmt in fmts:
        rows += (_bench_gemm_nvfp4 if fmt == "nvfp4" else _bench_gemm_fp8)(models, ms, bw, args)
    return rows


def _settle(fn: Callable[[], Any], inner: int) -> None:
    """One untimed pass of exactly what a timed row does (graph capture, replays) before a shape's first row. The
    first row measured after the shape's weights were made came out up to 15 % slow on the H100, whatever the
    kernel and the M (session 18: the head 128.7 us first, 109.1 us measured again; 0.3 s of eager calls before it
    did not remove it), and the rows after it did not."""
    time_ms(fn, 3, inner=inner)


def _copies(w: Any, nbytes: int, cold: bool, clone: Callable[[Any], Any]) -> list[Any]:
    """w plus clones (clone(w)) until they hold >= 2x the L2 size (cold) -- else just [w]."""
    if not cold:
        return [w]
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return [w] + [clone(w) for _ in range(min(63, -(-2 * l2 // nbytes) - 1))]


def _clone_packed(p: Any) -> Any:
    """A PackedNVFP4 / PackedFP8 with its own copy of the weight (and an empty per-weight cache)."""
    return dataclasses.replace(p, codes=p.codes.clone(), scales=p.scales.clone(), cache={})


def _rotating(call: Callable[[Any], Any], ws: list[Any]) -> Callable[[], Any]:
    """fn() calling `call` on the next of ws each time. time_ms(..., inner=len(ws)) captures one pass over all of
    them per graph replay, so a replay reads >= 2x L2 of weights and none is still in L2 when it comes round."""
    it = itertools.cycle(ws)
    return lambda: call(next(it))


def _gemm_row(fmt: str, model: str, name: str, n: int, k: int, m: int, t_cute: float, t_cub: float, wbytes: int,
              bw: float, path: str, plan: str, read_us: float, **extra) -> dict:
    """One row of `bench gemm` (times in ms in, µs out), printed as it is made. `read_us`: the plain-read peer
    (torch streaming the same number of bytes from HBM, same timing), the best a weight-streaming kernel can do."""
    flops = 2.0 * m * n * k
    row = dict(fmt=fmt, model=model, proj=name, N=n, K=k, M=m, cute_us=t_cute * 1e3, cublas_us=t_cub * 1e3,
               speedup_vs_cublas=t_cub / t_cute, weight_GBps=wbytes / (t_cute * 1e-3) / 1e9,
               frac_hbm=wbytes / (t_cute * 1e-3) / bw, tflops=flops / (t_cute * 1e-3) / 1e12,
               cublas_tflops=flops / (t_cub * 1e-3) / 1e12, cublas_frac_hbm=2 * n * k / (t_cub * 1e-3) / bw,
               read_peer_us=read_us, read_peer_frac_hbm=wbytes / (read_us * 1e-6) / bw,
               ratio_to_read_peer=t_cute * 1e3 / read_us, path=path, weight_bytes=wbytes, plan=plan, **extra)
    print(f"{fmt:5} {model:6} {name:10} {n:6d} {k:6d} {m:5d} {row['cute_us']:9.1f} {row['cublas_us']:9.1f} "
          f"{row['speedup_vs_cublas']:8.2f} {row['weight_GBps']:7.0f} {100 * row['frac_hbm']:5.0f} "
          f"{row['tflops']:7.1f} {read_us:8.1f} {100 * row['read_peer_frac_hbm']:5.0f} "
          f"{row['ratio_to_read_peer']:6.2f} {path:>10} {plan}", flush=True)
    return row


def _bench_gemm_nvfp4(models, ms, bw, args) -> list[dict]:
    from dsv4.checkpoint.formats import quantize_nvfp4
    from dsv4_kernels import nvfp4_gemm as G
    from dsv4_kernels.nvfp4_moe import read_peer_us

    rows = []
    keep = set(filter(None, args.shapes.split(",")))
    for model in models:
        for name, n, k in SHAPES[model]:
            if keep and name not in keep:
                continue
            w = torch.randn(n, k, device="cuda", dtype=torch.float32)
            q = quantize_nvfp4(w)
            del w
            pw = G.prepare_nvfp4_weight(q)
            wbf = G.dequantize_packed(pw)
            del q
            wbytes = pw.nbytes()
            pws = _copies(pw, wbytes, args.cold_l2, _clone_packed)
            wbfs = _copies(wbf, 2 * n * k, args.cold_l2, torch.clone)
            read_us = read_peer_us(wbytes, time_ms, args.reps)
            variants = [int(v) for v in args.fused_max.split(",")] if args.fused_max else [G.FUSED_MAX]
            default_fm = G.FUSED_MAX
            x1 = torch.zeros(1, k, device="cuda", dtype=torch.bfloat16)
            for p in pws:
                G.warmup(p, [1])
            _settle(_rotating(lambda p: G.nvfp4_linear(x1, p), pws), max(10, len(pws)))
            _settle(_rotating(lambda wb: torch.matmul(x1, wb.t()), wbfs), max(10, len(wbfs)))
            for m, fm in [(m, fm) for m in ms for fm in variants]:
                G.FUSED_MAX = fm
                for p in pws:
                    G.warmup(p, [m] if m <= G.GEMV_MAX_M else [])
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                t_cute = time_ms(_rotating(lambda p: G.nvfp4_linear(x, p, out=y), pws), args.reps,
                                 inner=max(10, len(pws)))
                G.FUSED_MAX = default_fm
                t_cub = time_ms(_rotating(lambda wb: torch.matmul(x, wb.t()), wbfs), args.reps,
                                inner=max(10, len(wbfs)))
                splits, _ = pw.cache.get("plan", (1, 1))
                fused = m <= G.GEMV_MAX_M and splits > 1 and splits * -(-m // 8) <= fm
                path = ("gemv" + ("-fused" if fused else "")) if m <= G.GEMV_MAX_M else "dequant"
                rows.append(_gemm_row("nvfp4", model, name, n, k, m, t_cute, t_cub, wbytes, bw, path, f"s{splits}",
                                      read_us, fused_max=fm, splits=splits, cold_l2=len(pws) > 1))
            del pw, wbf, pws, wbfs
            torch.cuda.empty_cache()
    return rows


def _fp8_plans(spec: str, n: int, k: int) -> list[tuple[int, int, int]]:
    """--fp8-plans -> (splits, unroll, prefetch) plans valid for [N, K] ('auto' = the module's plan)."""
    from dsv4_kernels import fp8_gemm as F

    plans = []
    for item in filter(None, spec.split(",")):
        if item == "auto":
            plans.append(F.fp8_gemv_plan(n, k))
            continue
        parts = [int(v) for v in item.lower().split("x")]
        if len(parts) not in (2, 3):
            raise SystemExit(f"--fp8-plans: {item!r} is not 'auto', SxU or SxUxP")
        splits, unroll, prefetch = (parts + [F.PREFETCH])[:3]
        if (k // F.KCHUNK) % (splits * unroll) == 0:
            plans.append((splits, unroll, prefetch))
    return list(dict.fromkeys(plans)) or [F.fp8_gemv_plan(n, k)]


def _bench_gemm_fp8(models, ms, bw, args) -> list[dict]:
    from dsv4.checkpoint.formats import quantize_fp8_block
    from dsv4_kernels import fp8_gemm as F
    from dsv4_kernels.nvfp4_moe import read_peer_us

    rows = []
    keep = set(filter(None, args.shapes.split(",")))
    for model in models:
        for name, n, k in FP8_SHAPES[model]:
            if keep and name not in keep:
                continue
            w = torch.randn(n, k, device="cuda", dtype=torch.float32)
            q = quantize_fp8_block(w, ue8m0_scale=True)      # what our checkpoints hold (DeepSeek's UE8M0 recipe)
            del w
            pw = F.prepare_fp8_weight(q)
            del q
            wbf = F.dequantize_packed(pw)                     # torch's bf16 weight, bit for bit
            wbytes = pw.nbytes()
            pws = _copies(pw, wbytes, args.cold_l2, _clone_packed)
            wbfs = _copies(wbf, 2 * n * k, args.cold_l2, torch.clone)
            read_us = read_peer_us(wbytes, time_ms, args.reps)
            for m in ms:
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                t_cub = time_ms(_rotating(lambda wb: torch.matmul(x, wb.t()), wbfs), args.reps,
                                inner=max(10, len(wbfs)))
                plans = _fp8_plans(args.fp8_plans, n, k) if m <= F.GEMV_MAX_M else [F.fp8_gemv_plan(n, k)]
                for plan in plans:
                    for p in pws:
                        p.cache["plan"] = plan
                        F.warmup(p, [m] if m <= F.GEMV_MAX_M else [])
                    t_cute = time_ms(_rotating(lambda p: F.fp8_linear(x, p, out=y), pws), args.reps,
                                     inner=max(10, len(pws)))
                    path = "gemv" if m <= F.GEMV_MAX_M else "dequant"
                    label = "s{}u{}p{}".format(*plan) if path == "gemv" else ""
                    rows.append(_gemm_row("fp8", model, name, n, k, m, t_cute, t_cub, wbytes, bw, path, label,
                                          read_us, splits=plan[0], unroll=plan[1], prefetch=plan[2],
                                          cold_l2=len(pws) > 1))
            del pw, wbf, pws, wbfs
            torch.cuda.empty_cache()
    return rows


def bench_moe(models, batches, bw, args) -> list[dict]:
    from dsv4_kernels import nvfp4_moe as MO

    return MO.bench(models, batches, bw, args.reps, MOE, time_ms,
                    variants=[v for v in args.moe_ks.split(",") if v] or ["auto"])
