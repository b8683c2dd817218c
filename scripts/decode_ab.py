"""Decode-step variants A/B, interleaved in one process: side streams, and the two deferred pieces of the glue.

flash-layers (real V4-Flash dims, 4 layers, random FP8/NVFP4 weights drawn on the GPU), context 1024: decode graphs for
batch 1 and 32 captured once per variant, each with all 4 layers and with none (embedding + head); the graphs'
replays are timed in alternating rounds, so that the machine's drift hits every variant alike. Per layer =
(step - head) / 4, against the layers' mean HBM floor. Variants:
- serial: every kernel on one stream (DSV4_CUTE_STREAMS=0);
- two: the default, two side streams (CuteOps.concurrently);
- two_hc_eager: two side streams, but the mHC coefficients (Sinkhorn) computed before the sub-layer on the main
  stream, as before session 22;
- two_gate_cublas: two side streams, but the MoE gate GEMV as a cast + cuBLAS for every batch, as before session 22;
- two_norms_apart: two side streams, but the sub-layer RMSNorms and the q / kv norms as kernels of their own, not
  fused into the mHC collapse and the RoPE kernel;
- two_mix_late: two side streams, HcMix (mHC mixes, MoE gate) reading its weights after griddepcontrol.wait
  (mhc_pre.MIX_PREFETCH off);
- two_no_pdl: two side streams, but the chain kernels launched without programmatic dependent launch
  (dsv4_kernels.pdl.CHAIN off: each waits for its predecessor's end before it is launched, as before session 26);
- two_gate_late: the MoE ring gate_up launched after the routing kernel ends (nvfp4_moe.GATE_PDL off, as before
  session 27);
- two_add_apart: the MoE's routed + shared sum as a torch add before HcPost (as before session 27), not inside it;
- two_unstacked: a compressed layer's projections of x (compressor, indexer compressor, indexer weights) as one
  BF16 GEMV each, not one GEMV over their stacked weight;
- two_bf16_cublas: those projections one cuBLAS GEMM each, as before session 27 (not dsv4_kernels.bf16_gemv);
- two_indexer_scores: short contexts score the indexer entries before taking all visible ones (as before
  session 27), not dsv4_kernels.indexer.VisibleEntries alone;
- three / four: three / four side streams (session 27 measured them while the CSA layer's two compressors were
  pieces of their own: no gain; the compressors are one piece now).
Run on the GPU machine (bundle applied): [BATCHES="1 8 32"] python3 scripts/decode_ab.py [VARIANT ...] (default:
batches 1 and 32 (at most 32), every variant; "two" always).
"""
import os
import statistics
import sys
import types

import torch

import dsv4.ops.cute_attention as cute_attention
import dsv4.ops.cute_route as cute_route
import dsv4_kernels.bf16_gemv as bf16_gemv
import dsv4_kernels.mhc_pre as mhc_pre
import dsv4_kernels.nvfp4_moe as nvfp4_moe
import dsv4_kernels.pdl as pdl
from dsv4.bench_cmd import hbm_bandwidth
from dsv4.bench_decode_cmd import _random_tensors, build_decode_setup, layer_floor_bytes
from dsv4.checkpoint.presets import PRESETS
from dsv4.engine.cuda_graphs import DecodeGraphs
from dsv4.engine.decode_inputs import DecodeInputs
from dsv4.ops.cute import CuteOps

dev = torch.device("cuda")
L = 4
cfg = PRESETS["flash-layers"](L)
ctx = 1024
setup = build_decode_setup(cfg, _random_tensors(cfg, dev), ctx, 32)  # 32 sequences: the largest batch
ops, model, cache, seqs = setup.ops, setup.model, setup.cache, setup.seqs
max_len, bs, per_seq = setup.max_len, setup.block_size, setup.width
bw = hbm_bandwidth()
floor = sum(layer_floor_bytes(model, i, ctx)["total"] for i in range(L)) / bw * 1e6 / L
sides = list(ops.side_streams) + [torch.cuda.Stream(dev) for _ in range(2)]    # up to four for "four"
gate_max = cute_route.GATE_MIX_MAX_TOKENS


def hc_eager(self, *args, **kwargs):
    x, coefficients = CuteOps.hc_pre_split(self, *args, **kwargs)
    done = coefficients()
    return x, lambda: done


def hc_norm_apart(self, *args, norm_weight=None):
    x, coefficients = CuteOps.hc_pre_split(self, *args)
    return (x if norm_weight is None else self.rms_norm(x, norm_weight, args[4])), coefficients


def norm_rope_apart(self, x, weight, eps, positions, rope, rope_dim):
    return self.rope_tail(self.rms_norm(x, weight, eps), positions, rope, rope_dim)


def unstacked(self, x, stack):
    """Each projection of a LinearStack as a weight of its own, whatever the token count."""
    return tuple(self.linear(x, p) for p in stack.parts)


def add_apart(self, y, y2, streams, post, comb):
    return self.hc_post(y + y2, streams, post, comb)


VARIANTS = {"serial": dict(streams=0), "two": dict(streams=2), "two_hc_eager": dict(streams=2, hc_eager=True),
            "two_gate_cublas": dict(streams=2, gate_cublas=True), "two_norms_apart": dict(streams=2, norms_apart=True),
            "two_no_pdl": dict(streams=2, no_pdl=True), "two_mix_late": dict(streams=2, mix_late=True),
            "two_gate_late": dict(streams=2, gate_late=True), "two_add_apart": dict(streams=2, add_apart=True),
            "two_unstacked": dict(streams=2, unstacked=True), "two_indexer_scores": dict(streams=2, scores=True),
            "two_bf16_cublas": dict(streams=2, bf16_cublas=True, unstacked=True), "three": dict(streams=3),
            "four": dict(streams=4)}
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1 32").split()]
if sys.argv[1:]:
    VARIANTS = {k: v for k, v in VARIANTS.items() if k == "two" or k in sys.argv[1:]}


def apply(v: dict) -> None:
    ops.side_streams = sides[:v["streams"]]
    pdl.CHAIN = not v.get("no_pdl")
    mhc_pre.MIX_PREFETCH = not v.get("mix_late")
    nvfp4_moe.GATE_PDL = not v.get("gate_late")
    bf16_gemv.ENABLED = not v.get("bf16_cublas")
    cute_attention.VISIBLE_SHORTCUT = not v.get("scores")
    cute_route.GATE_MIX_MAX_TOKENS = 0 if v.get("gate_cublas") else gate_max
    ops.__dict__.pop("hc_pre_split", None)
    ops.__dict__.pop("norm_rope_tail", None)
    ops.__dict__.pop("hc_post_sum", None)
    ops.__dict__.pop("linear_stack", None)
    if v.get("unstacked"):
        ops.linear_stack = types.MethodType(unstacked, ops)
    if v.get("add_apart"):
        ops.hc_post_sum = types.MethodType(add_apart, ops)
    if v.get("hc_eager"):
        ops.hc_pre_split = types.MethodType(hc_eager, ops)
    if v.get("norms_apart"):
        ops.hc_pre_split = types.MethodType(hc_norm_apart, ops)
        ops.norm_rope_tail = types.MethodType(norm_rope_apart, ops)


all_layers = list(model.layers)
graphs = {}
for B in BATCHES:
    for name, v in VARIANTS.items():
        apply(v)
        for nl in (0, L):
            model.layers = all_layers[:nl]
            g = DecodeGraphs(model, cache.layers, dev, [B], max_len, bs)
            g.capture()
            graphs[(B, name, nl)] = (g, DecodeInputs.build(seqs[:B], cache, B, per_seq))
model.layers = all_layers
apply(VARIANTS["two"])


def t(key, n=20):
    g, inp = graphs[key]
    for _ in range(3):
        g.run(inp)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        g.run(inp)
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n * 1e3


res = {k: [] for k in graphs}
for r in range(15):
    for k in graphs:
        res[k].append(t(k))
print(f"avg layer floor {floor:.1f} us")
for B in BATCHES:
    out = {}
    for name in VARIANTS:
        full = statistics.median(res[(B, name, L)])
        head = statistics.median(res[(B, name, 0)])
        per = (full - head) / L
        out[name] = (full, head, per)
        print(f"B={B} {name}: step {full:.1f} us, head {head:.1f}, per layer {per:.1f} us ({per / floor:.2f}x floor); "
              f"step spread {min(res[(B, name, L)]):.1f}-{max(res[(B, name, L)]):.1f}")
    for name in VARIANTS:
        if name != "two":
            print(f"B={B} two/{name}: step {out['two'][0] / out[name][0]:.3f}, "
                  f"per layer {out['two'][2] / out[name][2]:.3f}")
