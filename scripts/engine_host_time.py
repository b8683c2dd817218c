#!/usr/bin/env python3
"""Host time of the engine per step, model forward excluded: scheduling, inputs, sampling bookkeeping, stop checks,
detokenising, deltas. `batch` greedy requests decode `--tokens` tokens each on the CPU (torch ops); the time inside
DeepseekV4Model.forward is subtracted from each step's wall time.

    .venv/bin/python scripts/engine_host_time.py [--batch 32] [--tokens 64] [--profile]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "demo"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--backend", default="torch", help="ops backend: torch or cute")
    ap.add_argument("--prompt-repeat", type=int, default=1, help="repeat the prompt (longer prefill)")
    ap.add_argument("--warmup", type=int, default=0, help="batches run (not timed) before the measured one")
    ap.add_argument("--sync-scheduling", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile of the engine's own functions")
    args = ap.parse_args()

    from dsv4.config import EngineConfig
    from dsv4.engine.engine import Engine
    from dsv4.engine.params import SamplingParams
    from dsv4.model.deepseek_v4 import DeepseekV4Model

    forward = DeepseekV4Model.forward
    in_forward = [0.0]

    def timed_forward(self, *a, **k):
        t = time.perf_counter()
        try:
            return forward(self, *a, **k)
        finally:
            in_forward[0] += time.perf_counter() - t

    DeepseekV4Model.forward = timed_forward
    engine = Engine(EngineConfig(checkpoint=args.checkpoint, device=args.device, ops_backend=args.backend,
                                 max_num_seqs=args.batch, async_scheduling=not args.sync_scheduling))
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    prompt = "k73=635,k19=847,k28=519;k19?" * args.prompt_repeat

    def run_batch(tag: str) -> float:
        done, left = threading.Event(), [args.batch]

        def on_output(out):
            if out.finished:
                left[0] -= 1
                if not left[0]:
                    done.set()

        t0 = time.perf_counter()
        for i in range(args.batch):
            engine.add_request(f"{tag}{i}", prompt=prompt, params=params, on_output=on_output)
        done.wait(1800)
        return time.perf_counter() - t0

    for w in range(args.warmup):   # the first batches compile kernels and capture graphs
        run_batch(f"w{w}-")
    in_forward[0] = 0.0
    before = engine.stats()
    prof = cProfile.Profile()
    step = engine._step
    wall = [0, 0.0]

    def timed_step():
        t = time.perf_counter()
        if args.profile:
            prof.enable()
        step()
        if args.profile:
            prof.disable()
        wall[0] += 1
        wall[1] += time.perf_counter() - t

    engine._step = timed_step
    total = run_batch("r")
    stats = engine.stats()
    engine.shutdown()
    n = wall[0]
    print(f"{n} steps at batch {args.batch}: {1e3 * wall[1] / n:.2f} ms per step, of which forward "
          f"{1e3 * in_forward[0] / n:.2f} ms, host {1e3 * (wall[1] - in_forward[0]) / n:.2f} ms"
          + (" (cProfile on: inflated)" if args.profile else ""))
    print(f"whole batch {1e3 * total:.0f} ms; graph steps {stats.graph_steps - before.graph_steps}, "
          f"overlapped {stats.overlapped_steps - before.overlapped_steps}")
    if args.profile:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(
            r"engine|sampler|stop|detok|request|scheduler|block_manager|kv_cache|decode_inputs|runner", 30)
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
