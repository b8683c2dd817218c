#!/usr/bin/env python3
"""Level 3 of the three levels of truth: the engine with CuTe DSL ops against the engine with torch ops (GPU).

For each prompt: (1) lockstep: both models see the same tokens (prefill, then the first run's greedy tokens) and the
logits of every step are compared (cosine, argmax); (2) free-running greedy decoding through two `Engine`s, whose
token lists must be identical. Prints a table and writes JSON. `--pair torch:2048,torch:61` is the control: the torch
engine against itself with another prefill chunking (other GEMM shapes, other summation orders).

    python scripts/compare_backends.py --checkpoint /tmp/small --steps 64 --prompt-lens 17 300 2100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dsv4.checkpoint.loader import load_checkpoint
from dsv4.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.kv_cache import KVCache
from dsv4.engine.params import SamplingParams
from dsv4.model.deepseek_v4 import DeepseekV4Model
from dsv4.ops import select_ops
from dsv4.ops.base import ForwardBatch


def lockstep(ckpt, prompt: list[int], steps: int, pair: list[tuple[str, int]]) -> dict:
    """pair = [(ops backend, prefill chunk)] x 2; the first run's greedy tokens drive both."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = ckpt.config
    runs = []
    for name, chunk in pair:
        ops = select_ops(name, dev, dt)
        model = DeepseekV4Model(cfg, ckpt.tensors, ops, dev, dt)
        cache = KVCache(cfg, num_blocks=-(-(len(prompt) + steps) // 128) + 2, block_size=128, max_seqs=1,
                        device=dev, dtype=dt)
        runs.append((model, cache, cache.add("s"), chunk))
    tokens = list(prompt)
    ctxs = [0, 0]
    cos, agree, flips, gaps = [], [], [], []
    t_step = [0.0, 0.0]
    while len(tokens) - len(prompt) < steps:
        logits = []
        for r, (model, cache, slot, chunk) in enumerate(runs):
            while ctxs[r] < len(tokens):
                ctx = ctxs[r]
                n = min(chunk, len(tokens) - ctx)
                cache.grow("s", ctx + n)
                batch = ForwardBatch(
                    token_ids=torch.tensor(tokens[ctx:ctx + n], device=dev),
                    positions=torch.arange(ctx, ctx + n, device=dev), query_start=[0, n], context_lens=[ctx],
                    state_slots=[slot], swa_block_tables=[cache.window.block_table("s")],
                    comp_block_tables=[cache.compressed.block_table("s")],
                    swa_slot_mapping=torch.tensor(cache.window_slots("s", ctx, ctx + n), device=dev),
                    logits_indices=torch.tensor([n - 1], device=dev))
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.forward(batch, cache.layers)[0].float()
                torch.cuda.synchronize()
                t_step[r] += time.perf_counter() - t0
                cache.release_window("s", ctx + n)
                ctxs[r] = ctx + n
            logits.append(out)
        a, b = logits
        cos.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
        agree.append(int(a.argmax()) == int(b.argmax()))
        top2 = a.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        if not agree[-1]:
            # how far apart the first run put the two tokens, against how far the runs' logits are apart anywhere
            flips.append({"step": len(agree) - 1, "torch_gap": float(a.max() - a[b.argmax()]),
                          "max_abs_logit_diff": float((a - b).abs().max())})
        tokens.append(int(a.argmax()))
    gaps.sort()
    return {"min_cosine": min(cos), "mean_cosine": sum(cos) / len(cos), "argmax_agree": sum(agree) / len(agree),
            "argmax_flips": flips, "median_top2_gap": gaps[len(gaps) // 2],
            "seconds_a": round(t_step[0], 2), "seconds_b": round(t_step[1], 2)}


def free_running(path: str, prompts: list[list[int]], steps: int, pair: list[tuple[str, int]]) -> dict:
    """Greedy decoding through two Engines (ops backend, max_num_batched_tokens = prefill chunk)."""
    out = []
    for name, chunk in pair:
        eng = Engine(EngineConfig(checkpoint=path, device="cuda", ops_backend=name, max_num_seqs=8,
                                  max_model_len=4096, max_num_batched_tokens=chunk))
        try:
            params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
            streams = [eng.add_request(f"p{i}", prompt_token_ids=p, params=params) for i, p in enumerate(prompts)]
            res = []
            for s in streams:
                ids = []
                for o in s:
                    if o.error:
                        raise RuntimeError(o.error)
                    ids += o.token_ids
                res.append(ids)
            out.append(res)
        finally:
            eng.shutdown()
    same = [a == b for a, b in zip(out[0], out[1])]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(out[0], out[1])]
    return {"identical": same, "first_divergence": first_diff}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[17, 300, 2100])
    ap.add_argument("--pair", default="torch:2048,cute:2048",
                    help="the two runs compared, backend:prefill-chunk each. A control for what any correct BF16 "
                         "implementation can promise: 'torch:2048,torch:61' (the torch engine against itself with "
                         "another prefill chunking, i.e. other GEMM shapes and summation orders)")
    ap.add_argument("--json")
    args = ap.parse_args()
    ckpt = load_checkpoint(args.checkpoint, progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, ckpt.config.vocab_size, (n,), generator=g).tolist() for n in args.prompt_lens]
    pair = [(b, int(c)) for b, c in (item.split(":") for item in args.pair.split(","))]
    if len(pair) != 2:
        ap.error("--pair takes two backend:chunk items")
    report = {"device": torch.cuda.get_device_name(), "checkpoint": args.checkpoint, "steps": args.steps,
              "pair": args.pair, "lockstep": {}, "free_running": None}
    for p in prompts:
        r = lockstep(ckpt, p, args.steps, pair)
        report["lockstep"][len(p)] = r
        print(f"prompt {len(p):5d}: min cosine {r['min_cosine']:.5f} mean {r['mean_cosine']:.5f} "
              f"argmax agree {r['argmax_agree']:.3f}  ({r['seconds_a']} s {pair[0][0]}, {r['seconds_b']} s "
              f"{pair[1][0]})",
              flush=True)
        print(f"    median top-2 logit gap {r['median_top2_gap']:.4f}; flips (step, torch gap, max |logit diff|): "
              + ", ".join(f"({f['step']}, {f['torch_gap']:.4f}, {f['max_abs_logit_diff']:.4f})"
                          for f in r["argmax_flips"]), flush=True)
    report["free_running"] = free_running(args.checkpoint, prompts, args.steps, pair)
    print("free-running greedy identical:", report["free_running"]["identical"],
          "first divergence:", report["free_running"]["first_divergence"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    ok = all(r["min_cosine"] >= 0.995 for r in report["lockstep"].values()) and all(report["free_running"]["identical"])
    print("LEVEL3", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
