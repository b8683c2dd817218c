#!/usr/bin/env python3
"""The engine in this process (`Engine`) against the engine in its own process (`EngineProcess`, as model.py runs
it), in alternating rounds of the same closed loop, so that whatever drifts on the machine between runs hits every
side of a round alike. On a GPU machine (bundle applied, `small` checkpoint generated):

    python3 scripts/engine_process_ab.py --checkpoint /tmp/small [--concurrency 1 32] [--rounds 3]
        [--switch-ms 0.5 5] [--json OUT.json]

Each EngineProcess variant runs with DSV4_ENGINE_SWITCH_INTERVAL_MS set to one of --switch-ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "backend_src"), str(REPO / "kernels"), str(REPO)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--backend", default="cute")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests-per-worker", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--switch-ms", type=float, nargs="+", default=[0.5, 5.0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from gpu_check import direct_closed_loop

    from dsv4.config import EngineConfig
    from dsv4.engine.engine import Engine
    from dsv4.engine.process import EngineProcess

    cfg = EngineConfig(checkpoint=args.checkpoint, device=args.device, ops_backend=args.backend,
                       max_num_seqs=max(args.concurrency), max_model_len=2048, async_scheduling=True)
    sampling = {"temperature": 0, "max_tokens": args.max_tokens, "ignore_eos": True}
    engines = {"in-process": Engine(cfg)}
    for ms in args.switch_ms:
        os.environ["DSV4_ENGINE_SWITCH_INTERVAL_MS"] = str(ms)     # EngineProcess hands its environment on
        engines[f"process, switch {ms} ms"] = EngineProcess(cfg)
    rows = []
    try:
        for c in args.concurrency:
            for eng in engines.values():
                direct_closed_loop(eng, c, 1, sampling)                 # warm-up at this batch size
        names = list(engines)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for c in args.concurrency:
                for name in order:
                    eng = engines[name]
                    before = eng.stats()
                    r = direct_closed_loop(eng, c, args.requests_per_worker, sampling)
                    after = eng.stats()
                    steps = after.steps - before.steps
                    row = {"round": rnd, "engine": name, "concurrency": c, "tokens_per_s": r["tokens_per_s"],
                           "ms_per_step": round(1000 * r["seconds"] / max(steps, 1), 3), "steps": steps,
                           "graph_steps": after.graph_steps - before.graph_steps,
                           "mixed_graph_steps": after.mixed_graph_steps - before.mixed_graph_steps,
                           "errors": r["errors"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for eng in engines.values():
            eng.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
