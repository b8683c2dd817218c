"""`dsv4 bench decode`: the engine's decode step on the GPU, eager vs CUDA graph, and per layer vs its HBM floor.

Weights come from a checkpoint (--checkpoint) or are drawn on the GPU for a preset (--preset flash-layers
--layers 4: real V4-Flash dims without writing ~4 GB per layer to disk). Sequences sit at position --context with
their blocks allocated; the cache contents are whatever the pools hold (timing does not depend on them).

Per layer (batch 1): a graph of the step with the first k layers for k = 0..L; layer k's time is t(k+1) - t(k). Its
floor: the bytes it must read (its weights as they sit in GPU memory, routed experts only those the token uses, the
KV rows and index keys attention reads) over the measured HBM copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="decode step: eager vs CUDA graph, per-layer time vs HBM floor")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (else --preset, random weights)")
    p.add_argument("--preset", default="flash-layers")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--context", type=int, default=1024, help="tokens already in the cache per sequence")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json-out", default="")
    p.add_argument("--profile", action="store_true", help="print the kernels of one batch-1 step (torch profiler)")
    p.add_argument("--fp8-cache", action="store_true", help="FP8 KV-cache rows (kv_cache_dtype=fp8_e4m3)")
    p.add_argument("--profile-stack", action="store_true",
                   help="with --profile: also the torch ops of layer 0 grouped by Python call site")
    p.set_defaults(func=run)


@dataclass
class _Seq:
    """What DecodeInputs reads of a running sequence."""

    request_id: str
    num_computed: int
    vocab: int

    def token_at(self, i: int) -> int:
        return 2 + (int(self.request_id[1:]) * 7919 + i * 104729) % (self.vocab - 2)


def _random_tensors(cfg, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Every main-layer tensor the model reads: projections FP8 e4m3 with 128x128 UE8M0 scales and routed experts
    NVFP4 (as the nvfp4 checkpoint holds them, quantised on the GPU), the rest as the generator makes them. CuteOps
    keeps the FP8 projections FP8 (W8A16 GEMM) unless DSV4_CUTE_FP8_LINEAR=0 (then BF16, the previous path)."""
    from dsv4.checkpoint.formats import quantize_fp8_block, quantize_nvfp4
    from dsv4.checkpoint.generator import generate_tensor
    from dsv4.checkpoint.names import model_specs

    torch.manual_seed(seed)
    out: dict[str, Any] = {}
    for spec in model_specs(cfg):
        if spec.name.startswith("mtp."):
            continue
        if spec.role in ("linear", "expert") and spec.init == "normal":
            w = torch.randn(spec.shape, device=device) * spec.std
            out[spec.param_name] = quantize_nvfp4(w) if spec.role == "expert" else quantize_fp8_block(
                w, ue8m0_scale=True)
        else:
            out[spec.param_name] = generate_tensor(cfg, spec, seed)
    return out


def _nbytes(h: Any) -> int:
    if h is None:
        return 0
    if isinstance(h, torch.Tensor):
        return h.numel() * h.element_size()
    if isinstance(h, (tuple, list)):
        return sum(_nbytes(x) for x in h)
    if hasattr(h, "codes") and hasattr(h, "dense"):             # PackedBF16: decode reads the packed copy only
        return _nbytes(h.codes)
    if hasattr(h, "codes") and hasattr(h, "scales"):            # PackedNVFP4, PackedFP8
        return _nbytes(h.codes) + _nbytes(h.scales)
    if hasattr(h, "weight") and hasattr(h, "sizes"):             # cute's LinearStack
        return _nbytes(h.weight)
    if hasattr(h, "ape"):                                        # CompressorWeights
        return _nbytes(h.ape) + _nbytes(h.norm)
    raise TypeError(f"no byte count for {type(h).__name__}")


def layer_floor_bytes(model, i: int, context: int, fp8: bool = False) -> dict[str, int]:
    """Bytes layer i must read for one decode token at position `context` (KV rows as the cache stores them)."""
    from dsv4.ops.fp8_rows import Fp8Rows
    cfg, L = model.cfg, model.layers[i]
    w = sum(_nbytes(getattr(L, f)) for f in ("attn_norm", "ffn_norm", "qkv_a", "q_norm", "q_b", "kv_norm", "wo_a",
                                             "wo_b", "sink", "compressor", "x_proj", "idx_compressor", "gate",
                                             "gate_bias", "shared"))
    w += sum(_nbytes(t) for t in L.hc.values())
    ex = L.experts
    per_expert = ex.expert_bytes() if hasattr(ex, "expert_bytes") else sum(_nbytes(t) for t in ex.values()) // \
        cfg.n_routed_experts
    experts = cfg.n_activated_experts * per_expert
    ratio = cfg.compress_ratio(i)
    es = 2
    rows = min(context + 1, cfg.window_size)
    if ratio == 4:
        rows += min(cfg.index_topk, (context + 1) // 4)
    elif ratio:
        rows += (context + 1) // ratio
    def row(d: int) -> int:
        return Fp8Rows(d, cfg.rope_head_dim).row_bytes if fp8 else d * es

    kv = rows * row(cfg.head_dim)
    if ratio == 4:
        kv += (context + 1) // 4 * row(cfg.index_head_dim)
    return {"weights": w, "experts": experts, "kv": kv, "total": w + experts + kv}


@dataclass
class DecodeSetup:
    """A model on CuteOps and a KV cache whose `seqs` sit at position `context` with their blocks allocated."""

    cfg: Any
    ops: Any
    model: Any
    cache: Any
    seqs: list[_Seq]
    max_len: int              # positions the graphs are captured for (context + 64)
    block_size: int
    width: int                # block-table width per sequence


def build_decode_setup(cfg, tensors: dict[str, Any], context: int, max_batch: int, fp8_cache: bool = False,
                       block_size: int = 128, backend: str = "cute", device: str = "cuda") -> DecodeSetup:
    """What `dsv4 bench decode` and the decode scripts time: the model (BF16, CuteOps unless `backend`), a cache,
    `max_batch` sequences at position `context`."""
    from dsv4.engine.kv_cache import KVCache
    from dsv4.model.deepseek_v4 import DeepseekV4Model
    from dsv4.ops import select_ops

    dev = torch.device(device)
    ops = select_ops(backend, dev, torch.bfloat16)
    max_len = context + 64
    ops.reserve_positions(max_len)
    model = DeepseekV4Model(cfg, tensors, ops, dev, torch.bfloat16)
    width = -(-max_len // block_size)
    cache = KVCache(cfg, num_blocks=max_batch * width + 1, block_size=block_size, max_seqs=max_batch, device=dev,
                    dtype=torch.bfloat16, fp8=fp8_cache)
    seqs = []
    for b in range(max_batch):
        rid = f"s{b}"
        cache.add(rid)
        cache.grow(rid, context + 1)
        seqs.append(_Seq(rid, context, cfg.vocab_size))
    return DecodeSetup(cfg, ops, model, cache, seqs, max_len, block_size, width)


def _profile_layers(model, all_layers: list, eager_ms, steps: int, json_out: str | None) -> None:
    """Kernels of one eager batch-1 step with only layer k, for each k: name, count and GPU time, so the launches
    a layer costs (and which of them move no bytes) can be read off. Written next to --json-out."""
    from torch.profiler import ProfilerActivity, profile
    per_layer = []
    for k, layer in enumerate(all_layers):
        model.layers = [layer]
        eager_ms(1)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager_ms(1)
        rows = [{"name": e.key[:120], "count": round(e.count / steps, 2),
                 "us": round(e.device_time_total / max(e.count, 1), 2)}
                for e in prof.key_averages() if e.device_time_total > 0]
        rows.sort(key=lambda r: -r["us"] * r["count"])
        launches = sum(r["count"] for r in rows)
        print(f"\nlayer {k} alone (+ embedding and head), kernels per step: {launches}")
        for r in rows[:45]:
            print(f"{r['count']:6.1f} x {r['us']:8.2f} us  {r['name']}")
        per_layer.append({"layer": k, "kernels": rows})
    model.layers = all_layers
    if json_out:
        with open(json_out.replace(".json", "") + "_profile.json", "w") as f:
            json.dump(per_layer, f, indent=1)


def _profile_call_sites(model, layer, eager_ms) -> None:
    """GPU time of layer 0's torch ops by the model-side call site, to see which line launches what."""
    from torch.profiler import ProfilerActivity, profile
    model.layers = [layer]
    eager_ms(1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        eager_ms(1)
    print(prof.key_averages(group_by_stack_n=4).table(sort_by="self_device_time_total", row_limit=80,
                                                      max_name_column_width=40, max_src_column_width=90))


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("dsv4 bench decode needs a CUDA GPU", file=sys.stderr)
        return 2
    from dsv4.bench_cmd import _device, hbm_bandwidth, time_ms
    from dsv4.checkpoint.loader import load_checkpoint
    from dsv4.checkpoint.presets import PRESETS
    from dsv4.engine.cuda_graphs import DecodeGraphs
    from dsv4.engine.decode_inputs import DecodeInputs, decode_batch

    dev = torch.device("cuda")
    t0 = time.monotonic()
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint, progress=False)
        cfg, tensors = ckpt.config, ckpt.tensors
    else:
        cfg = PRESETS[args.preset](args.layers)
        tensors = _random_tensors(cfg, dev)
    batches = [int(b) for b in args.batches.split(",")]
    setup = build_decode_setup(cfg, tensors, args.context, max(batches), args.fp8_cache)
    del tensors
    ops, model, cache, seqs = setup.ops, setup.model, setup.cache, setup.seqs
    max_len, bs, width = setup.max_len, setup.block_size, setup.width
    print(f"model built in {time.monotonic() - t0:.0f} s; device {_device()}", file=sys.stderr)
    bw = hbm_bandwidth()
    all_layers = list(model.layers)
    result: dict[str, Any] = {"device": _device(), "hbm_copy_GBps": bw / 1e9, "context": args.context,
                              "model": args.checkpoint or f"{args.preset} x{cfg.n_layers} (random weights)",
                              "fp8_weights": getattr(ops, "fp8_weights", False),
                              "steps": [], "layers": []}

    def eager_ms(B: int) -> float:
        inputs = DecodeInputs.build(seqs[:B], cache, B, width)
        i64 = torch.from_numpy(inputs.i64).to(dev)
        i32 = torch.from_numpy(inputs.i32).to(dev)

        def step():
            model.forward(decode_batch(i64, i32, max_len - 1, torch.arange(B, device=dev)), cache.layers)
        step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.reps):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / args.reps * 1e3

    def graph_ms(B: int) -> float:
        graphs = DecodeGraphs(model, cache.layers, dev, [B], max_len, bs)
        graphs.capture()
        inputs = DecodeInputs.build(seqs[:B], cache, B, width)
        ms = time_ms(lambda: graphs.run(inputs), args.reps, graph=False)
        del graphs
        return ms

    if args.profile:
        _profile_layers(model, all_layers, eager_ms, args.reps + 1, args.json_out)
        if args.profile_stack:
            _profile_call_sites(model, all_layers[0], eager_ms)
            model.layers = all_layers

    print(f"{'batch':>5} {'eager ms':>9} {'graph ms':>9} {'speed-up':>8} {'tok/s (graph)':>13}")
    for B in batches:
        e, g = eager_ms(B), graph_ms(B)
        row = {"batch": B, "eager_ms": round(e, 3), "graph_ms": round(g, 3), "speedup": round(e / g, 2),
               "tokens_per_s": round(B / g * 1e3, 1)}
        result["steps"].append(row)
        print(f"{B:5d} {e:9.2f} {g:9.3f} {e / g:8.1f} {B / g * 1e3:13.0f}")

    times = []
    for k in range(len(all_layers) + 1):
        model.layers = all_layers[:k]
        times.append(graph_ms(1))
    model.layers = all_layers
    print(f"\nbatch 1, context {args.context}: step with 0 layers (embedding + head) {times[0] * 1e3:.1f} us")
    print(f"{'layer':>5} {'ratio':>5} {'us':>8} {'floor us':>8} {'x floor':>7} {'MB read':>8}  (weights/experts/kv MB)")
    for i in range(len(all_layers)):
        us = (times[i + 1] - times[i]) * 1e3
        fb = layer_floor_bytes(model, i, args.context, args.fp8_cache)
        floor_us = fb["total"] / bw * 1e6
        row = {"layer": i, "ratio": cfg.compress_ratio(i), "us": round(us, 1), "floor_us": round(floor_us, 1),
               "x_floor": round(us / floor_us, 2), **{f"{k}_bytes": v for k, v in fb.items()}}
        result["layers"].append(row)
        print(f"{i:5d} {cfg.compress_ratio(i):5d} {us:8.1f} {floor_us:8.1f} {us / floor_us:7.2f} "
              f"{fb['total'] / 1e6:8.1f}  ({fb['weights'] / 1e6:.1f}/{fb['experts'] / 1e6:.1f}/{fb['kv'] / 1e6:.2f})")
    result["head_us"] = round(times[0] * 1e3, 1)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0
