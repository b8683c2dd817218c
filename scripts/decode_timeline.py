"""Kernel timeline of one decode-graph replay, split per layer: which kernels run when, on every stream.

flash-layers (real V4-Flash dims, 4 layers: window, window, CSA, HCA; random weights drawn on the GPU), batch 1
(--batch), context 1024: one replay under the torch profiler (CUDA activity), kernels sorted by start time and cut at
every second mHC post kernel (the end of a layer). Prints each layer's span, the sum of its kernels' times (more than
the span where side streams overlap them) and its HBM floor; writes $OUT/decode_timeline_$TAG.json.
Run on the GPU machine (bundle applied): TAG=x python3 scripts/decode_timeline.py --out DIR
"""
import argparse
import json
import os

import torch

from dsv4.bench_decode_cmd import _random_tensors, build_decode_setup, layer_floor_bytes
from dsv4.bench_cmd import hbm_bandwidth, time_ms
from dsv4.checkpoint.presets import PRESETS
from dsv4.engine.cuda_graphs import DecodeGraphs
from dsv4.engine.decode_inputs import DecodeInputs
from torch.profiler import ProfilerActivity, profile

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--context", type=int, default=1024)
ap.add_argument("--out", default=os.environ.get("OUT", "."))
ap.add_argument("--batch", type=int, default=1)
a = ap.parse_args()
dev = torch.device("cuda")
cfg = PRESETS["flash-layers"](a.layers)
B = a.batch
setup = build_decode_setup(cfg, _random_tensors(cfg, dev), a.context, B)
model, cache, seqs = setup.model, setup.cache, setup.seqs
max_len, bs, per_seq = setup.max_len, setup.block_size, setup.width
bw = hbm_bandwidth()
all_layers = list(model.layers)
inputs = DecodeInputs.build(seqs, cache, B, per_seq)
result = {"hbm_GBps": bw / 1e9, "layers": {}}

def timeline(layers):
    model.layers = layers
    g = DecodeGraphs(model, cache.layers, dev, [B], max_len, bs)
    g.capture()
    ms = time_ms(lambda: g.run(inputs), 30, graph=False)
    for _ in range(3):
        g.run(inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.run(inputs)
        torch.cuda.synchronize()
    path = f"/tmp/trace_{len(layers)}.json"
    prof.export_chrome_trace(path)
    ev = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"]
    ev.sort(key=lambda e: e["ts"])
    return ms, [(e["name"], e["ts"], e["dur"]) for e in ev]

ms0, ev0 = timeline([])
print(f"0 layers: {ms0*1e3:.1f} us, {len(ev0)} kernels")
ms, ev = timeline(all_layers)
print(f"{len(all_layers)} layers: {ms*1e3:.1f} us, {len(ev)} kernels; per layer {(ms-ms0)*1e3/len(all_layers):.1f}")
model.layers = all_layers
t0 = ev[0][1]
posts = [j for j, e in enumerate(ev) if "HcPost" in e[0]]
starts = [0] + [posts[2 * k + 1] + 1 for k in range(len(all_layers) - 1)]
ends = [posts[2 * k + 1] for k in range(len(all_layers))]
for i in range(len(all_layers)):
    body = ev[starts[i]:ends[i] + 1]
    fb = layer_floor_bytes(model, i, a.context)
    floor = fb["total"] / bw * 1e6
    b0 = body[0][1]
    span = max(ts + d for _, ts, d in body) - (ev[ends[i - 1]][1] + ev[ends[i - 1]][2] if i else b0)
    busy = sum(d for _, _, d in body)
    rows = []
    for n, ts, d in body:
        rows.append({"name": n[:100], "start": round(ts - b0, 2), "dur": round(d, 2)})
    print(f"\n=== layer {i} ratio {cfg.compress_ratio(i)}: span {span:.1f} us busy {busy:.1f}, floor {floor:.1f} us "
          f"(w {fb['weights']/1e6:.1f} MB, ex {fb['experts']/1e6:.1f}, kv {fb['kv']/1e6:.2f}); {len(body)} kernels")
    if i != 1:
        for r in rows:
            print(f"{r['start']:8.1f} {r['dur']:7.2f}  {r['name'][:80]}")
    result["layers"][i] = {"span_us": span, "floor_us": floor, "bytes": fb, "kernels": rows}
json.dump(result, open(f"{a.out}/decode_timeline_{os.environ.get('TAG', 'x')}.json", "w"), indent=1)
