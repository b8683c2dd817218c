"""Decode step with and without side streams (CuteOps.concurrently), interleaved in one process.

flash-layers (real V4-Flash dims, 4 layers, random FP8/NVFP4 weights drawn on the GPU), context 1024: decode graphs for
batch 1 and 32 captured with every kernel on one stream ("serial") and with two side streams ("two"), each with all 4
layers and with none (embedding + head); the graphs' replays are timed in alternating rounds, so that the machine's
drift hits every variant alike. Per layer = (step - head) / 4, against the layers' mean HBM floor.
Run on the GPU machine (bundle applied): python3 scripts/streams_ab.py
"""
import statistics

import torch

from dsv4.bench_decode_cmd import _random_tensors, build_decode_setup, layer_floor_bytes
from dsv4.bench_cmd import hbm_bandwidth
from dsv4.checkpoint.presets import PRESETS
from dsv4.engine.cuda_graphs import DecodeGraphs
from dsv4.engine.decode_inputs import DecodeInputs
dev = torch.device("cuda")
L = 4
cfg = PRESETS["flash-layers"](L)
ctx = 1024
setup = build_decode_setup(cfg, _random_tensors(cfg, dev), ctx, 32)
ops, model, cache, seqs = setup.ops, setup.model, setup.cache, setup.seqs
max_len, bs, per_seq = setup.max_len, setup.block_size, setup.width
bw = hbm_bandwidth()
floor = sum(layer_floor_bytes(model, i, ctx)["total"] for i in range(L)) / bw * 1e6 / L
sides = list(ops.side_streams)
MODES = {"serial": [], "two": sides[:2]}
all_layers = list(model.layers)
graphs = {}
for B in (1, 32):
    for mode in MODES:
        ops.side_streams = MODES[mode]
        for nl in (0, L):
            model.layers = all_layers[:nl]
            g = DecodeGraphs(model, cache.layers, dev, [B], max_len, bs); g.capture()
            graphs[(B, mode, nl)] = (g, DecodeInputs.build(seqs[:B], cache, B, per_seq))
model.layers = all_layers
def t(key, n=20):
    g, inp = graphs[key]
    for _ in range(3): g.run(inp)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n): g.run(inp)
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n * 1e3
res = {k: [] for k in graphs}
for r in range(15):
    for k in graphs:
        res[k].append(t(k))
print(f"avg layer floor {floor:.1f} us")
for B in (1, 32):
    out = {}
    for mode in MODES:
        full = statistics.median(res[(B, mode, L)]); head = statistics.median(res[(B, mode, 0)])
        out[mode] = (full, head, (full - head) / L)
        per = (full - head) / L
        print(f"B={B} {mode}: step {full:.1f} us, head {head:.1f}, per layer {per:.1f} us ({per / floor:.2f}x floor); "
              f"step spread {min(res[(B, mode, L)]):.1f}-{max(res[(B, mode, L)]):.1f}")
    for m in ("two",):
        print(f"B={B} {m}/serial step {out[m][0]/out['serial'][0]:.3f}, per layer {out[m][2]/out['serial'][2]:.3f}")
