"""`dsv4 bench gemm|moe`: the CuTe DSL NVFP4 kernels against cuBLAS BF16 and the measured HBM bandwidth.

Prints a table and writes JSON (--json-out). Needs a CUDA GPU with CuTe DSL (`import dsv4_kernels`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

# (name, N, K) of the projections that run through the NVFP4 GEMM
SHAPES = {
    "flash": [("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096), ("wo_b", 4096, 8192),
              ("expert.w1", 2048, 4096), ("expert.w2", 4096, 2048), ("head", 129280, 4096)],
    "pro": [("wq_a", 1536, 7168), ("wq_b", 65536, 1536), ("wkv", 512, 7168), ("wo_b", 7168, 16384),
            ("expert.w1", 3072, 7168), ("expert.w2", 7168, 3072)],
}
MOE = {"flash": dict(experts=256, dim=4096, inter=2048, topk=6), "pro": dict(experts=384, dim=7168, inter=3072, topk=6)}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `gemm` and `moe` under `dsv4 bench`."""
    for what, text in (("gemm", "NVFP4 W4A16 GEMM vs cuBLAS BF16 and the HBM roofline"),
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
    p.add_argument("--moe-ks", default="", help="moe: comma-separated decode K splits to compare, 'auto' or "
                   "GxD (gate_up x down), plus 'sorted' for the torch-routing path")
    p.set_defaults(func=run)


def time_ms(fn, reps: int = 50, graph: bool = True) -> float:
    """Median time of fn() in ms: CUDA-graph replays of `inner` calls when graph=True, events around each."""
    fn()
    torch.cuda.synchronize()
    inner = 1
    g = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            inner = 10
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
        except Exception:  # noqa: BLE001 - fall back to eager timing
            g, inner = None, 1
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
    from dsv4.checkpoint.formats import quantize_nvfp4
    from dsv4_kernels import nvfp4_gemm as G

    rows = []
    keep = set(filter(None, args.shapes.split(",")))
    hdr = (f"{'model':6} {'proj':10} {'N':>6} {'K':>6} {'M':>5} {'cute us':>9} {'cublas us':>9} {'x cublas':>8} "
           f"{'wGB/s':>7} {'%HBM':>5} {'TFLOP/s':>7} {'path':>7}")
    print(hdr)
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
            variants = [int(v) for v in args.fused_max.split(",")] if args.fused_max else [G.FUSED_MAX]
            default_fm = G.FUSED_MAX
            for m, fm in [(m, fm) for m in ms for fm in variants]:
                G.FUSED_MAX = fm
                G.warmup(pw, [m] if m <= G.GEMV_MAX_M else [])
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                t_cute = time_ms(lambda: G.nvfp4_linear(x, pw, out=y), args.reps)
                G.FUSED_MAX = default_fm
                t_cub = time_ms(lambda: torch.matmul(x, wbf.t()), args.reps)
                splits, _ = pw.cache.get("plan", (1, 1))
                fused = m <= G.GEMV_MAX_M and splits > 1 and splits * -(-m // 8) <= fm
                flops = 2.0 * m * n * k
                row = dict(model=model, proj=name, N=n, K=k, M=m, cute_us=t_cute * 1e3, cublas_us=t_cub * 1e3,
                           speedup_vs_cublas=t_cub / t_cute, weight_GBps=wbytes / (t_cute * 1e-3) / 1e9,
                           frac_hbm=wbytes / (t_cute * 1e-3) / bw, tflops=flops / (t_cute * 1e-3) / 1e12,
                           cublas_tflops=flops / (t_cub * 1e-3) / 1e12,
                           path=("gemv" + ("-fused" if fused else "")) if m <= G.GEMV_MAX_M else "dequant",
                           weight_bytes=wbytes, fused_max=fm, splits=splits)
                rows.append(row)
                print(f"{model:6} {name:10} {n:6d} {k:6d} {m:5d} {row['cute_us']:9.1f} {row['cublas_us']:9.1f} "
                      f"{row['speedup_vs_cublas']:8.2f} {row['weight_GBps']:7.0f} {100 * row['frac_hbm']:5.0f} "
                      f"{row['tflops']:7.1f} {row['path']:>10} s{splits}", flush=True)
            del pw, wbf
            torch.cuda.empty_cache()
    return rows


def bench_moe(models, batches, bw, args) -> list[dict]:
    from dsv4_kernels import nvfp4_moe as MO

    return MO.bench(models, batches, bw, args.reps, MOE, time_ms,
                    variants=[v for v in args.moe_ks.split(",") if v] or ["auto"])
