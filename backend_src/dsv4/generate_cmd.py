"""`dsv4 generate`: one prompt through the oracle (`--backend reference`) or the engine (`torch`, `cute`, `auto`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (greedy by default)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (DeepSeek-V4 layout)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--backend", choices=("reference", "torch", "cute", "auto"), default="torch")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (launch every op of every step)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3", "fp8"],
                   help="engine KV cache: the model dtype, or FP8 rows (the reference backend then models them too)")
    p.add_argument("--json", action="store_true", help="print prompt ids, generated ids and text as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.backend == "reference":
        result = _reference(args)
    else:
        result = _engine(args)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["text"])
        print(f"[{len(result['generated_ids'])} tokens, {result['seconds']} s, backend {args.backend}]", file=sys.stderr)
    return 0


def _reference(args: argparse.Namespace) -> dict:
    from tokenizers import Tokenizer

    from dsv4.checkpoint.loader import load_checkpoint
    from dsv4.reference import ReferenceModel

    if args.temperature != 0:
        raise SystemExit("--backend reference decodes greedily only (temperature 0)")
    ckpt = load_checkpoint(args.checkpoint, progress=True)
    tok = Tokenizer.from_file(str(ckpt.tokenizer_path))
    cfg = ckpt.config
    ids = ([cfg.bos_token_id] if cfg.bos_token_id is not None else []) + tok.encode(args.prompt, add_special_tokens=False).ids
    model = ReferenceModel(cfg, ckpt.dequantized(torch.float32), kv_cache_dtype=args.kv_cache_dtype)
    out = model.generate_greedy(ids, args.max_tokens, None if args.ignore_eos else cfg.eos_token_id)
    finish = "stop" if out and out[-1] == cfg.eos_token_id and not args.ignore_eos else "length"
    if finish == "stop":
        out_text_ids = out[:-1]
    else:
        out_text_ids = out
    return {"prompt_ids": ids, "generated_ids": out, "text": tok.decode(out_text_ids), "finish_reason": finish}


def _engine(args: argparse.Namespace) -> dict:
    from dsv4.config import EngineConfig
    from dsv4.engine.engine import Engine
    from dsv4.engine.params import SamplingParams

    engine = Engine(EngineConfig(checkpoint=args.checkpoint, device=args.device, ops_backend=args.backend,
                                 enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype))
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)
        stream = engine.add_request("cli", prompt=args.prompt, params=params)
        ids, text, last = [], [], None
        for out in stream:
            if not args.json:
                print(out.text, end="", flush=True)
            ids += out.token_ids
            text.append(out.text)
            last = out
        if not args.json:
            print()
        if last is not None and last.error:
            raise SystemExit(f"error: {last.error}")
        seq_prompt = engine.tokenizer.encode(args.prompt, add_special_tokens=False).ids
        bos = engine.model_config.bos_token_id
        return {"prompt_ids": ([bos] if bos is not None else []) + seq_prompt, "generated_ids": ids,
                "text": "".join(text), "finish_reason": last.finish_reason if last else None}
    finally:
        engine.shutdown()
