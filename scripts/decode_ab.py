"""Decode-step variants A/B, interleaved in one process: side streams, and the two deferred pieces of the glue.

flash-layers (real V4-Flash dims, 4 layers, random FP8/NVFP4 weights drawn on the GPU), context 1024: decode graphs for
batch 1 and 32 captured once per variant, each with all 4 layers and with none (embedding + head); the graphs'
replays are timed in alternating rounds, so that the machine's drift hits every variant alike. Per layer =
(step - head) / 4, against the layers' mean HBM floor. Variants:
- serial: every kernel on one stream (DSV4_CUTE_STREAMS=0);
- base: the default, three side streams (CuteOps.concurrently); every variant below but two / four changes one
  thing of it (up to session 27 the default was two side streams, and these variants were named two_*);
- two: two side streams (the default up to session 27);
- hc_eager: the mHC coefficients (Sinkhorn) computed before the sub-layer on the main
  stream, as before session 22;
- gate_cublas: the MoE gate GEMV as a cast + cuBLAS for every batch, as before session 22;
- norms_apart: the sub-layer RMSNorms and the q / kv norms as kernels of their own, not
  fused into the mHC collapse and the RoPE kernel;
- mix_late: HcMix (mHC mixes, MoE gate) reading its weights after griddepcontrol.wait
  (mhc_pre.MIX_PREFETCH off);
- no_pdl: the chain kernels launched without programmatic dependent launch
  (dsv4_kernels.pdl.CHAIN off: each waits for its predecessor's end before it is launched, as before session 26);
- gate_late: the MoE ring gate_up launched after the routing kernel ends (nvfp4_moe.GATE_PDL off, as before
  session 27);
- add_apart: the MoE's routed + shared sum as a torch add before HcPost (as before session 27), not inside it;
- unstacked: a compressed layer's projections of x (compressor, indexer compressor, indexer weights) as one
  BF16 GEMV each, not one GEMV over their stacked weight;
- bf16_cublas: those projections one cuBLAS GEMM each, as before session 27 (not dsv4_kernels.bf16_gemv);
- indexer_scores: short contexts score the indexer entries before taking all visible ones (as before
  session 27), not dsv4_kernels.indexer.VisibleEntries alone;
- writes_late: the window KV and the compressors' cache writes after the queries' chain, in attn_core (as
  before session 28), not in the keys' and the compressor projections' pieces on their side streams;
- rope_apart: the attention output's inverse RoPE a kernel of its own (as before session 28), not inside the
  split combine;
- fp8_unstacked: wq_a / wkv and wq_b / the indexer's wq_b one FP8 GEMV each, not one over their stacked weight
  (the BF16 stacks and the shared expert's stay stacked);
- post_reduce: wo_b's split-K partials summed by the split reduce kernel, then HcPost (as before session 28),
  not inside HcPost;
- shared_unstacked: the shared expert's gate and up projections one FP8 GEMV each, not one over their stacked
  weight;
- compress_serial: a CSA layer's two compressors one after the other on one stream (as before session 28), not
  beside each other;
- side_prio: the side streams at a higher priority than the main one (the block scheduler then serves
  their kernels before the pending CTAs of a GEMV on the main stream);
- four: four side streams;
- heads32: the batch-1 attention with 32 heads a CTA, as before session 29 (not 16);
- combine_serial: the split combine's loops over the splits not unrolled (as before session 29);
- half_splits: the FP8 GEMVs that split K in 4 or more (wo_a, wo_b, the shared expert's, wq_a + wkv) with half the
  splits (half the CTAs, twice the chunks a warp), not fp8_gemv_plan's two CTAs a multiprocessor;
- down4 / down9: a one-token step's MoE down kernel with a cp.async ring of 4 stages (as before session 29) / 9
  (every iteration in flight before the wait), not 8;
- up4 / up8: a one-token step's MoE gate_up kernel with a cp.async ring of 4 stages (as before session 29) / 8, not 6;
- shared_fewer: the shared expert's FP8 GEMVs with a quarter of their K splits (w1 + w3: 2, w2: 1, so no split
  reduce), fewer CTAs beside the MoE kernels;
- shared_main: the MoE's shared expert on the main stream (its first GEMV a programmatic dependent of the collapse)
  and the routed experts on a side stream, not the other way round;
- regs_free: the grouped FP8 GEMV (wo_a) compiled with ptxas's own register count (130 at V4-Flash dims: 3 CTAs an
  SM), as before session 30, not for 4 CTAs an SM (fp8_gemm.gemv_min_ctas);
- regs_all: every FP8 GEMV with 16-chunk iterations (wq_b, wo_b too) compiled for 4 CTAs an SM;
- qkv_u8: the stacked wq_a + wkv GEMV with its whole split (8 chunks) in one unrolled iteration, so every weight
  load of it goes out before griddepcontrol.wait (not unroll 2: 4 iterations, the first before the wait);
- short_u8: the same for every FP8 GEMV whose split is at most 8 chunks (wq_a + wkv and the shared expert's);
- woa_s4 / wob_s16: wo_a with 4 K splits (fp8_gemv_plan's rule without `ahead`, as before session 30), not 8 /
  wo_b with 16, not 8;
- s29: regs_free and woa_s4 together: session 29's FP8 GEMVs;
- hoist_off: the chain's small kernels (RMSNorm, the keys' RoPE, the split combine, the mHC collapse, the routing)
  load their weights (norm weights, bias, sinks) after griddepcontrol.wait (as before session 31), not before it,
  and the mHC collapse its streams after its barrier, not with its partials (dsv4_kernels.pdl.HOIST).
Run on the GPU machine (bundle applied): [BATCHES="1 8 32"] python3 scripts/decode_ab.py [VARIANT ...] (default:
batches 1 and 32 (at most 32), every variant; "base" always).
"""
import os
import statistics
import sys
import types

import torch

import dsv4.ops.cute_attention as cute_attention
import dsv4.ops.cute_route as cute_route
import dsv4_kernels.attention_decode as attention_decode
import dsv4_kernels.bf16_gemv as bf16_gemv
import dsv4_kernels.fp8_gemm as fp8_gemm
import dsv4_kernels.mhc_pre as mhc_pre
import dsv4_kernels.nvfp4_moe as nvfp4_moe
import dsv4_kernels.nvfp4_moe_ring as nvfp4_moe_ring
import dsv4_kernels.pdl as pdl
from dsv4.bench_cmd import hbm_bandwidth
from dsv4.bench_decode_cmd import _random_tensors, build_decode_setup, layer_floor_bytes
from dsv4.checkpoint.presets import PRESETS
from dsv4.engine.cuda_graphs import DecodeGraphs
from dsv4.engine.decode_inputs import DecodeInputs
from dsv4.model.deepseek_v4 import DeepseekV4Model
from dsv4.ops.cute import CuteOps, LinearStack
from dsv4_kernels.fp8_gemm import PackedFP8, _plan as fp8_plan

dev = torch.device("cuda")
L = 4
cfg = PRESETS["flash-layers"](L)
ctx = 1024
setup = build_decode_setup(cfg, _random_tensors(cfg, dev), ctx, 32)  # 32 sequences: the largest batch
ops, model, cache, seqs = setup.ops, setup.model, setup.cache, setup.seqs
max_len, bs, per_seq = setup.max_len, setup.block_size, setup.width
bw = hbm_bandwidth()
floor = sum(layer_floor_bytes(model, i, ctx)["total"] for i in range(L)) / bw * 1e6 / L
sides = list(ops.side_streams) + [torch.cuda.Stream(dev) for _ in range(4 - len(ops.side_streams))]  # up to "four"
prio_sides = [torch.cuda.Stream(dev, priority=-1) for _ in range(3)]


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


SHARED = {id(layer.shared[0]) for layer in model.layers}


def fp8_unstacked(self, x, stack):
    if isinstance(stack, LinearStack) and isinstance(stack.weight, PackedFP8) and id(stack) not in SHARED:
        return tuple(self.linear(x, p) for p in stack.parts)
    return CuteOps.linear_stack(self, x, stack)


def shared_unstacked(self, x, stack):
    if id(stack) in SHARED and isinstance(stack, LinearStack):
        return tuple(self.linear(x, p) for p in stack.parts)
    return CuteOps.linear_stack(self, x, stack)


def writes_late(self, h, i, positions, cache=None, compress_batch=None, write_batch=None):
    return DeepseekV4Model.attn_in(self, h, i, positions, cache, compress_batch)


def rope_apart(self, q, cache, ratio, window, topk, sink, scale, batch, out_rope=None):
    o = CuteOps.sparse_attention(self, q, cache, ratio, window, topk, sink, scale, batch)
    return o if out_rope is None else self.rope_tail(o, batch.positions, out_rope[0], out_rope[1], inverse=True)


def compress_serial(self, comp, idx_comp, i, cache, batch):
    cfg, L = self.cfg, self.layers[i]
    ratio, rope, rd = cfg.compress_ratio(i), cfg.rope_for_layer(i), cfg.rope_head_dim
    for proj, C, carry_kv, carry_score, out, r in (
            (comp, L.compressor, cache.comp_carry_kv, cache.comp_carry_score, cache.comp_kv, ratio),
            (idx_comp, L.idx_compressor, cache.index_carry_kv, cache.index_carry_score, cache.index_k, 4)):
        if C is not None:
            self.ops.compress_and_store(*proj, C.ape, C.norm, cfg.norm_eps, r, rope, rd, carry_kv, carry_score,
                                        out, cache.block_size, batch)


def shared_main(self, x, L, token_ids, beside):
    cfg, ops = self.cfg, self.ops

    def routed():
        ids, weights = ops.route(x, L.gate, L.gate_bias, L.tid2eid, token_ids, cfg.n_activated_experts,
                                 cfg.score_func, cfg.route_scale)
        return ops.moe(x, ids, weights, L.experts, cfg.swiglu_limit)

    shared, out, other = ops.concurrently(lambda: ops.swiglu_mlp(x, *L.shared, cfg.swiglu_limit), routed, beside)
    return (out, shared), other


def post_reduce(self, x, w, streams, post, comb):
    return self.hc_post(self.linear(x, w), streams, post, comb)


def add_apart(self, y, y2, streams, post, comb):
    return self.hc_post(y + y2, streams, post, comb)


VARIANTS = {"serial": dict(streams=0), "base": dict(streams=3), "two": dict(streams=2),
            "hc_eager": dict(streams=3, hc_eager=True),
            "gate_cublas": dict(streams=3, gate_cublas=True), "norms_apart": dict(streams=3, norms_apart=True),
            "no_pdl": dict(streams=3, no_pdl=True), "mix_late": dict(streams=3, mix_late=True),
            "gate_late": dict(streams=3, gate_late=True), "add_apart": dict(streams=3, add_apart=True),
            "unstacked": dict(streams=3, unstacked=True), "indexer_scores": dict(streams=3, scores=True),
            "bf16_cublas": dict(streams=3, bf16_cublas=True, unstacked=True),
            "writes_late": dict(streams=3, writes_late=True), "rope_apart": dict(streams=3, rope_apart=True),
            "fp8_unstacked": dict(streams=3, fp8_unstacked=True),
            "shared_unstacked": dict(streams=3, shared_unstacked=True),
            "post_reduce": dict(streams=3, post_reduce=True), "side_prio": dict(streams=3, side_prio=True),
            "compress_serial": dict(streams=3, compress_serial=True),
            "heads32": dict(streams=3, heads32=True), "combine_serial": dict(streams=3, combine_serial=True),
            "shared_main": dict(streams=3, shared_main=True), "half_splits": dict(streams=3, half_splits=True),
            "down4": dict(streams=3, down_stages=4), "down9": dict(streams=3, down_stages=9),
            "up4": dict(streams=3, up_stages=4), "up8": dict(streams=3, up_stages=8),
            "shared_fewer": dict(streams=3, shared_fewer=True),
            "regs_free": dict(streams=3, regs_free=True), "regs_all": dict(streams=3, regs_all=True),
            "s29": dict(streams=3, regs_free=True, plans={"wo_a": (4, 8)}),
            "qkv_u8": dict(streams=3, qkv_u8=True), "short_u8": dict(streams=3, short_u8=True),
            "woa_s4": dict(streams=3, plans={"wo_a": (4, 8)}), "wob_s16": dict(streams=3, plans={"wo_b": (16, 8)}),
            "hoist_off": dict(streams=3, hoist_off=True),

            "four": dict(streams=4)}
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1 32").split()]
if sys.argv[1:]:
    VARIANTS = {k: v for k, v in VARIANTS.items() if k == "base" or k in sys.argv[1:]}


# variant flag -> the module setting it changes: (module, attribute, the variant's value; None: the flag's own value).
# Every other variant keeps the value the module had at start (its default, or what the environment set).
SETTINGS = {"no_pdl": (pdl, "CHAIN", False), "mix_late": (mhc_pre, "MIX_PREFETCH", False),
            "gate_late": (nvfp4_moe, "GATE_PDL", False), "bf16_cublas": (bf16_gemv, "ENABLED", False),
            "scores": (cute_attention, "VISIBLE_SHORTCUT", False),
            "gate_cublas": (cute_route, "GATE_MIX_MAX_TOKENS", 0),
            "heads32": (cute_attention, "SMALL_HEADS_MAX_TOKENS", 0),
            "combine_serial": (attention_decode, "COMBINE_UNROLL", 1),
            "down_stages": (nvfp4_moe_ring, "RING_DOWN_STAGES_ONE_TOKEN", None),
            "up_stages": (nvfp4_moe_ring, "RING_UP_STAGES_ONE_TOKEN", None),
            "regs_free": (fp8_gemm, "MIN_CTAS_PER_SM", 0), "regs_all": (fp8_gemm, "GROUPED_ONLY", False),
            "hoist_off": (pdl, "HOIST", False)}
DEFAULTS = {flag: getattr(module, attr) for flag, (module, attr, _) in SETTINGS.items()}

# variant flag -> the methods it replaces: (object, method name, replacement)
PATCHES = {"compress_serial": [(model, "_compress", compress_serial)],
           "shared_main": [(model, "moe", shared_main)],
           "unstacked": [(ops, "linear_stack", unstacked)],
           "fp8_unstacked": [(ops, "linear_stack", fp8_unstacked)],
           "shared_unstacked": [(ops, "linear_stack", shared_unstacked)],
           "post_reduce": [(ops, "linear_hc_post", post_reduce)],
           "writes_late": [(model, "attn_in", writes_late)],
           "rope_apart": [(ops, "sparse_attention", rope_apart)],
           "add_apart": [(ops, "hc_post_sum", add_apart)],
           "hc_eager": [(ops, "hc_pre_split", hc_eager)],
           "norms_apart": [(ops, "hc_pre_split", hc_norm_apart), (ops, "norm_rope_tail", norm_rope_apart)]}


def _fp8_weights():
    for layer in model.layers:
        for name, w in (("wo_a", layer.wo_a), ("wo_b", layer.wo_b), ("qkv_a", layer.qkv_a), ("wq_b", layer.q_b),
                        *(("shared", w) for w in layer.shared)):
            # a projection alone (wq_b outside CSA layers) is a tuple of one weight, a stack has .weight
            for part in w if isinstance(w, tuple) else (w,):
                part = getattr(part, "weight", part)
                if isinstance(part, PackedFP8):
                    yield name, part


FP8_PLANS = {id(w): fp8_plan(w) for _, w in _fp8_weights()}


def apply(v: dict) -> None:
    for name, w in _fp8_weights():
        splits, unroll, prefetch = FP8_PLANS[id(w)]
        cps = w.k // 64 // splits
        if name in v.get("plans", {}):
            w.cache["plan"] = (*v["plans"][name], prefetch)
        elif v.get("half_splits") and splits >= 4 and (2 * cps) % 8 == 0:
            w.cache["plan"] = (splits // 2, 8, prefetch)
        elif v.get("shared_fewer") and name == "shared" and splits >= 4:
            w.cache["plan"] = (splits // 4, 8, prefetch)
        elif (v.get("qkv_u8") and name == "qkv_a" or v.get("short_u8")) and cps <= 8:
            w.cache["plan"] = (splits, cps, prefetch)
        else:
            w.cache["plan"] = (splits, unroll, prefetch)
    ops.side_streams = prio_sides if v.get("side_prio") else sides[:v["streams"]]
    for flag, (module, attr, value) in SETTINGS.items():
        setattr(module, attr, DEFAULTS[flag] if flag not in v else (v[flag] if value is None else value))
    for patches in PATCHES.values():
        for obj, name, _ in patches:
            obj.__dict__.pop(name, None)
    for flag, patches in PATCHES.items():
        if v.get(flag):
            for obj, name, fn in patches:
                setattr(obj, name, types.MethodType(fn, obj))


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
apply(VARIANTS["base"])


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
        if name != "base":
            print(f"B={B} base/{name}: step {out['base'][0] / out[name][0]:.3f}, "
                  f"per layer {out['base'][2] / out[name][2]:.3f}")
