#!/usr/bin/env python3
"""Accuracy of a demo checkpoint on fresh instances of its tasks (`dsv4.demo_tasks`), greedy decoding.

    PYTHONPATH=backend_src python scripts/eval_demo.py --checkpoint checkpoints/demo --n 200 --backend reference
    PYTHONPATH=backend_src python scripts/eval_demo.py --checkpoint checkpoints/demo --n 200 --backend torch
    PYTHONPATH=backend_src python scripts/eval_demo.py --checkpoint checkpoints/demo --n 200 --backend cute  # GPU
    python scripts/eval_demo.py --url localhost:8001 --n 20          # a running tritonserver, over gRPC

Backends: `reference` = the FP32 oracle (`dsv4.reference`) on the checkpoint's weights dequantised (a BF16
checkpoint gives its BF16 weights, an NVFP4 one its NVFP4/FP8 values); `torch` / `cute` = the engine
(`dsv4.engine`) with those ops (`--device`, default cpu for torch and cuda for cute); `--url` = tritonserver's
deepseek_v4 model through tritonclient (the checkpoint is whatever the server serves). Instances come from
`--seed` (default 12345; training used other streams), half recall and half addition (`--task` for one only).
Prints the accuracy per task and overall, a few examples, and with `--json FILE` writes every answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backend_src"))
sys.path.insert(0, str(ROOT))

from dsv4 import demo_tasks  # noqa: E402

MAX_NEW_TOKENS = 8   # answers are at most 4 tokens + EOS


def run_reference(checkpoint: str, prompts: list[str], threads: int) -> list[str]:
    import torch
    from tokenizers import Tokenizer

    from dsv4.checkpoint.loader import load_checkpoint
    from dsv4.reference import ReferenceModel

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint, progress=False)
    cfg = ckpt.config
    tok = Tokenizer.from_file(str(ckpt.tokenizer_path))
    model = ReferenceModel(cfg, ckpt.dequantized(torch.float32))
    outs = []
    for p in prompts:
        ids = [cfg.bos_token_id] + tok.encode(p, add_special_tokens=False).ids
        gen = model.generate_greedy(ids, MAX_NEW_TOKENS, eos_token_id=cfg.eos_token_id)
        if gen and gen[-1] == cfg.eos_token_id:
            gen = gen[:-1]
        outs.append(tok.decode(gen))
    return outs


def run_engine(checkpoint: str, prompts: list[str], backend: str, device: str, threads: int,
               kv_cache_dtype: str = "auto") -> list[str]:
    import torch

    from dsv4.config import EngineConfig
    from dsv4.engine.engine import Engine
    from dsv4.engine.params import SamplingParams

    torch.set_num_threads(threads)
    engine = Engine(EngineConfig(checkpoint=checkpoint, device=device, ops_backend=backend, max_num_seqs=16,
                                 max_model_len=1024, max_num_batched_tokens=2048, num_kv_blocks=16 * 8 + 8,
                                 kv_cache_dtype=kv_cache_dtype))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
        streams = [engine.add_request(f"demo-{i}", prompt=p, params=params) for i, p in enumerate(prompts)]
        outs = []
        for s in streams:
            text = []
            for out in s:
                if out.error:
                    raise RuntimeError(out.error)
                text.append(out.text)
            outs.append("".join(text))
        return outs
    finally:
        engine.shutdown()


def run_server(url: str, model: str, prompts: list[str], concurrency: int) -> list[str]:
    from client.stream import generate

    sampling = {"temperature": 0.0, "max_tokens": MAX_NEW_TOKENS}
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: generate(p, sampling, url=url, model=model, stream=False).text, prompts))


def evaluate(outputs: list[str], instances: list[demo_tasks.Instance]) -> dict:
    per: dict[str, list[bool]] = {}
    for inst, out in zip(instances, outputs):
        per.setdefault(inst.task, []).append(demo_tasks.check(inst, out))
    allv = [v for vs in per.values() for v in vs]
    return {"accuracy": sum(allv) / len(allv), "n": len(allv),
            "per_task": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in per.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "demo"))
    ap.add_argument("--backend", choices=("reference", "torch", "cute"), default="reference")
    ap.add_argument("--device", default=None, help="engine device (default: cpu for torch, cuda for cute)")
    ap.add_argument("--url", default=None, help="tritonserver gRPC address (host:port); overrides --backend")
    ap.add_argument("--model", default="deepseek_v4")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--task", choices=demo_tasks.TASKS, default=None)
    ap.add_argument("--pairs", type=int, nargs=2, default=list(demo_tasks.EVAL_PAIRS), metavar=("MIN", "MAX"),
                    help="key-value pairs per recall prompt (default %(default)s, what the acceptance uses)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8_e4m3"), help="engine backends")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel requests to the server")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--json", default=None, help="write every prompt / answer / output here")
    ap.add_argument("--min-accuracy", type=float, default=None, help="exit 1 below this accuracy (0-1)")
    args = ap.parse_args(argv)

    instances = demo_tasks.make_instances(args.n, args.seed, args.task, tuple(args.pairs))
    prompts = [i.prompt for i in instances]
    t0 = time.monotonic()
    if args.url:
        where = f"tritonserver {args.url} (model {args.model})"
        outputs = run_server(args.url, args.model, prompts, args.concurrency)
    elif args.backend == "reference":
        where = f"reference on {args.checkpoint}"
        outputs = run_reference(args.checkpoint, prompts, args.threads)
    else:
        device = args.device or ("cpu" if args.backend == "torch" else "cuda")
        where = f"engine ops={args.backend} device={device} on {args.checkpoint}"
        outputs = run_engine(args.checkpoint, prompts, args.backend, device, args.threads, args.kv_cache_dtype)
    dt = time.monotonic() - t0
    res = evaluate(outputs, instances)
    print(f"{where}: {res['n']} instances (seed {args.seed}, {args.pairs[0]}-{args.pairs[1]} pairs) in {dt:.0f}s")
    for t, r in res["per_task"].items():
        print(f"  {t:7s} {r['accuracy'] * 100:6.1f}%  ({round(r['accuracy'] * r['n'])}/{r['n']})")
    print(f"  overall {res['accuracy'] * 100:6.1f}%")
    shown: dict[str, int] = {}
    for inst, out in zip(instances, outputs):
        if shown.get(inst.task, 0) >= max(1, args.examples // 2):
            continue
        shown[inst.task] = shown.get(inst.task, 0) + 1
        p = inst.prompt if len(inst.prompt) < 70 else inst.prompt[:30] + " ... " + inst.prompt[-30:]
        print(f"  [{inst.task}] {p!r} -> {out!r} (expected {inst.answer!r}) "
              f"{'ok' if demo_tasks.check(inst, out) else 'WRONG'}")
    wrong = [(i, o) for i, o in zip(instances, outputs) if not demo_tasks.check(i, o)]
    for inst, out in wrong[:args.examples]:
        p = inst.prompt if len(inst.prompt) < 70 else inst.prompt[:30] + " ... " + inst.prompt[-30:]
        print(f"  wrong: [{inst.task}] {p!r} -> {out!r} (expected {inst.answer!r})")
    if args.json:
        Path(args.json).write_text(json.dumps({"where": where, "seed": args.seed, **res, "items": [
            {"task": i.task, "prompt": i.prompt, "answer": i.answer, "output": o, "correct": demo_tasks.check(i, o)}
            for i, o in zip(instances, outputs)]}, indent=1))
    if args.min_accuracy is not None and res["accuracy"] < args.min_accuracy:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
