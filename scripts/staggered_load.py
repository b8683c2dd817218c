#!/usr/bin/env python3
"""The engine under the load shape a server sees: a closed loop of `--concurrency` clients whose requests are
desynchronised (started `--stagger-ms` apart, each resubmitted `--think-ms` after it finishes), so new requests
arrive one or two at a time instead of in one wave as in gpu_check's direct loop. Prints tokens/s and where the
engine's steps went: decode-only steps vs steps with prompt tokens (count, ms each, requests admitted per step);
`--profile`: cProfile of the engine thread's steps with prompt tokens.

    python3 scripts/staggered_load.py --checkpoint /tmp/dsv4-small --device cuda --backend cute --concurrency 32
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "backend_src"), str(REPO / "kernels")]

PROMPT = "k73=635,k19=847,k28=519;k19?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "demo"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256, help="measured requests (after one warm-up wave)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stagger-ms", type=float, default=5.0)
    ap.add_argument("--think-ms", type=float, default=1.0)
    ap.add_argument("--max-waiting-steps", type=int, default=None)
    ap.add_argument("--cuda-graph-max-tokens", type=int, default=None, help="0: steps with prompt tokens eager")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    from dsv4.config import EngineConfig
    from dsv4.engine.engine import Engine
    from dsv4.engine.params import SamplingParams

    engine = Engine(EngineConfig(checkpoint=args.checkpoint, device=args.device, ops_backend=args.backend,
                                 max_num_seqs=args.concurrency, max_waiting_steps=args.max_waiting_steps,
                                 cuda_graph_max_tokens=args.cuda_graph_max_tokens))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    kinds = {"decode": [0, 0.0], "prompt": [0, 0.0]}
    admitted = [0]
    profiles: list[cProfile.Profile] = []       # one per step with prompt tokens
    schedule, step = engine.scheduler.schedule, engine._step
    last_kind = ["decode"]
    measuring = [False]

    def tracked_schedule(*a, **k):
        s = schedule(*a, **k)
        last_kind[0] = "prompt" if any(seq.num_computed < len(seq.prompt_ids) for seq in s.seqs) else "decode"
        if measuring[0]:
            admitted[0] += sum(1 for seq in s.seqs if seq.num_computed == 0)
        return s

    def timed_step():
        t = time.perf_counter()
        prof = cProfile.Profile() if args.profile and measuring[0] else None
        if prof is not None:
            prof.enable()
        step()
        if prof is not None:
            prof.disable()
            if last_kind[0] == "prompt":
                profiles.append(prof)
        if measuring[0]:
            k = kinds[last_kind[0]]
            k[0] += 1
            k[1] += time.perf_counter() - t

    engine.scheduler.schedule = tracked_schedule
    engine._step = timed_step

    def run(total: int, tag: str) -> tuple[float, int]:
        lock = threading.Lock()
        state = {"submitted": 0, "finished": 0, "tokens": 0}
        done = threading.Event()

        def submit() -> None:
            with lock:
                if state["submitted"] >= total:
                    return
                i = state["submitted"]
                state["submitted"] += 1
            engine.add_request(f"{tag}{i}", prompt=PROMPT, params=params, on_output=on_output)

        def on_output(out):
            if out.token_ids:
                with lock:
                    state["tokens"] += len(out.token_ids)
            if out.finished:
                with lock:
                    state["finished"] += 1
                    if state["finished"] == total:
                        done.set()
                threading.Timer(args.think_ms / 1e3, submit).start()

        t0 = time.perf_counter()
        for c in range(args.concurrency):
            threading.Timer(c * args.stagger_ms / 1e3, submit).start()
        done.wait(1800)
        return time.perf_counter() - t0, state["tokens"]

    run(args.concurrency, "w")                                  # compile, capture, warm caches
    measuring[0] = True
    before = engine.stats()
    wall, tokens = run(args.requests, "m")
    after = engine.stats()
    measuring[0] = False
    engine.shutdown()
    print(f"concurrency {args.concurrency}, {args.requests} requests x {args.max_tokens} tokens, stagger "
          f"{args.stagger_ms} ms, think {args.think_ms} ms: {tokens / wall:.0f} tokens/s, "
          f"{(after.steps - before.steps) / wall:.0f} steps/s, graph steps {after.graph_steps - before.graph_steps}, "
          f"mixed-step graph steps {after.mixed_graph_steps - before.mixed_graph_steps}")
    for name, (n, s) in kinds.items():
        if n:
            print(f"  {name} steps: {n}, {1e3 * s / n:.2f} ms each, {100 * s / wall:.0f} % of the wall time")
    if kinds["prompt"][0]:
        print(f"  requests admitted per step with prompt tokens: {admitted[0] / kinds['prompt'][0]:.2f}")
    if profiles:
        print(f"cProfile of the {len(profiles)} steps with prompt tokens (inflated by the profiler):")
        pstats.Stats(*profiles).sort_stats("tottime").print_stats(35)
        pstats.Stats(*profiles).sort_stats("cumulative").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
