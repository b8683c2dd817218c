#!/usr/bin/env python3
"""The engine under the load shape a server sees: a closed loop of `--concurrency` clients whose requests are
desynchronised (started `--stagger-ms` apart, each resubmitted `--think-ms` after it finishes), so new requests
arrive one or two at a time instead of in one wave as in gpu_check's direct loop. Prints tokens/s and where the
engine's steps went: decode-only steps vs steps with prompt tokens (count, ms each, requests admitted per step);
`--profile`: cProfile of the engine thread's steps with prompt tokens; `--host-split`: host time per step kind of
the engine's stages (scheduling, batch building, plans, graph replays, attention cores, logits, sampling), timed
without a profiler and without synchronising, so it is what the host spends; `--trace-steps N`: the torch profiler (CPU and
CUDA activity) over the first N measured steps, then, for the steps with prompt tokens among them, the host span
against the GPU time of the kernels they launched (host-bound or GPU-bound?) and the host calls that took the span.

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


class StepTracer:
    """The torch profiler over the first `steps` engine steps it is handed (started and stopped on the engine
    thread), each step inside a record_function range named by its index, and the kind schedule() gave it."""

    def __init__(self, steps: int, cuda: bool):
        self.left = steps
        self.cuda = cuda
        self.prof = None
        self.kinds: dict[int, str] = {}
        self.n = 0

    def kind(self, kind: str) -> None:
        if self.prof is not None:
            self.kinds[self.n] = kind

    def step(self, step) -> None:
        if self.left <= 0:
            step()
            return
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function

        if self.prof is None:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=acts)
            self.prof.start()
        with record_function(f"dsv4_step_{self.n}"):
            step()
        self.n += 1
        self.left -= 1
        if self.left == 0:
            if self.cuda:
                torch.cuda.synchronize()
            self.prof.stop()

    def report(self, trace_out: str | None) -> None:
        if self.prof is None or self.left > 0:
            return
        if trace_out:
            self.prof.export_chrome_trace(trace_out)
        rows: dict[str, list[tuple[float, float]]] = {"prompt": [], "decode": []}
        calls: dict[str, float] = {}
        for e in self.prof.events():
            # CUPTI also reports each range on the GPU side (one event per stream it touched): host ranges only
            if not e.name.startswith("dsv4_step_") or "CUDA" in str(getattr(e, "device_type", "CPU")):
                continue
            kind = self.kinds.get(int(e.name.rsplit("_", 1)[1]), "decode")
            gpu = getattr(e, "device_time_total", None)
            gpu = getattr(e, "cuda_time_total", 0.0) if gpu is None else gpu
            rows[kind].append((e.cpu_time_total / 1e3, gpu / 1e3))
            if kind == "prompt":
                stack = list(e.cpu_children)
                while stack:
                    c = stack.pop()
                    calls[c.name] = calls.get(c.name, 0.0) + c.self_cpu_time_total / 1e3
                    stack.extend(c.cpu_children)
        print(f"torch profiler over {self.n} steps (host spans inflated by the profiler):")
        for kind, xs in rows.items():
            if xs:
                host = sum(h for h, _ in xs) / len(xs)
                gpu = sum(g for _, g in xs) / len(xs)
                print(f"  {kind} steps: {len(xs)}, host span {host:.2f} ms, GPU time of their kernels {gpu:.2f} ms")
        n_prompt = max(len(rows["prompt"]), 1)
        print("  host time of the steps with prompt tokens, by call (self time, ms per step):")
        for name, ms in sorted(calls.items(), key=lambda kv: -kv[1])[:20]:
            print(f"    {ms / n_prompt:8.3f}  {name[:100]}")


class HostSplit:
    """Wall time on the engine thread inside named callables, summed per step kind (inclusive: nested stages count
    in both). No synchronisation: a stage that waits for the GPU shows the wait."""

    def __init__(self):
        self.kind = "decode"
        self.on = False
        self.ms: dict[tuple[str, str], float] = {}
        self.calls: dict[tuple[str, str], int] = {}

    def wrap(self, obj, attr: str, label: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                key = (self.kind, label)
                self.ms[key] = self.ms.get(key, 0.0) + 1e3 * (time.perf_counter() - t)
                self.calls[key] = self.calls.get(key, 0) + 1
        setattr(obj, attr, timed)

    def report(self, steps: dict[str, list]) -> None:
        print("host time per step, by stage (inclusive, ms per step; calls per step):")
        for kind, (n, _) in steps.items():
            if not n:
                continue
            for (k, label), ms in sorted(self.ms.items(), key=lambda kv: -kv[1]):
                if k == kind:
                    print(f"  {kind:7s} {ms / n:7.3f}  {self.calls[(k, label)] / n:5.1f}  {label}")


def closed_loop(engine, args, params, total: int, tag: str) -> tuple[float, int]:
    """`total` requests from args.concurrency clients started args.stagger_ms apart, each resubmitting
    args.think_ms after its request finishes -> (wall seconds, tokens streamed)."""
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


def describe(args, wall: float, tokens: int, before, after) -> str:
    return (f"concurrency {args.concurrency}, {args.requests} requests x {args.max_tokens} tokens, stagger "
            f"{args.stagger_ms} ms, think {args.think_ms} ms: {tokens / wall:.0f} tokens/s, "
            f"{(after.steps - before.steps) / wall:.0f} steps/s, graph steps {after.graph_steps - before.graph_steps}, "
            f"mixed-step graph steps {after.mixed_graph_steps - before.mixed_graph_steps} (whole-step "
            f"{after.whole_graph_steps - before.whole_graph_steps}), steps with prompt tokens run ahead "
            f"{after.overlapped_prompt_steps - before.overlapped_prompt_steps}")


def engine_process_load(config, args, params) -> int:
    """The same load against the engine in its own process, as model.py serves it: the prompts are tokenised and
    the clients woken in this process, so the engine's thread shares its interpreter with nothing else. Only the
    engine's counters cross the process boundary, so this reports throughput and step counts, not step times."""
    from dsv4.engine.process import EngineProcess

    engine = EngineProcess(config)
    try:
        closed_loop(engine, args, params, args.concurrency, "w")
        before = engine.stats()
        wall, tokens = closed_loop(engine, args, params, args.requests, "m")
        after = engine.stats()
    finally:
        engine.shutdown()
    print("engine process:", describe(args, wall, tokens, before, after))
    return 0


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
    ap.add_argument("--cuda-graph-full-max-tokens", type=int, default=None,
                    help="steps with prompt tokens up to this many replay one whole-step graph (0: pieces only)")
    ap.add_argument("--sync-prefill", action="store_true",
                    help="steps with prompt tokens wait for the previous step's tokens (async_prefill off)")
    ap.add_argument("--engine-process", action="store_true",
                    help="run the engine in its own process, as the Triton model does (throughput and step counts "
                         "only)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--host-split", action="store_true")
    ap.add_argument("--trace-steps", type=int, default=0)
    ap.add_argument("--trace-out", default=None, help="also write the chrome trace here")
    args = ap.parse_args()

    from dsv4.config import EngineConfig
    from dsv4.engine.engine import Engine
    from dsv4.engine.params import SamplingParams

    config = EngineConfig(checkpoint=args.checkpoint, device=args.device, ops_backend=args.backend,
                          max_num_seqs=args.concurrency, max_waiting_steps=args.max_waiting_steps,
                          cuda_graph_max_tokens=args.cuda_graph_max_tokens, async_prefill=not args.sync_prefill,
                          **({} if args.cuda_graph_full_max_tokens is None else
                             {"cuda_graph_full_max_tokens": args.cuda_graph_full_max_tokens}))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    if args.engine_process:
        return engine_process_load(config, args, params)
    engine = Engine(config)

    split = HostSplit()
    if args.host_split:
        runner, model = engine.runner, engine.runner.model
        stages = [(engine, "_drain", "drain (reads the previous step's tokens)"),
                  (engine.scheduler, "schedule", "scheduler.schedule"),
                  (engine.cache, "clear_state", "cache.clear_state"),
                  (runner, "execute", "runner.execute"),
                  (runner, "build_batch", "runner.build_batch"),
                  (runner, "decode_logits", "runner.decode_logits"),
                  (model, "attn_core", "model.attn_core"),
                  (model, "logits", "model.logits"),
                  (model.ops, "store_window_kv", "ops.store_window_kv"),
                  (model.ops, "indexer_topk", "ops.indexer_topk"),
                  (model.ops, "sparse_attention", "ops.sparse_attention"),
                  (model.ops, "compress_and_store", "ops.compress_and_store"),
                  (engine.sampler, "sample", "sampler.sample")]
        if runner.mixed is not None:
            import dsv4.engine.mixed_graphs as mixed_graphs
            from dsv4.engine.decode_inputs import MixedInputs
            stages += [(runner.mixed, "forward", "mixed.forward"), (runner.mixed, "_load_plans", "mixed._load_plans"),
                       (runner.mixed, "forward_whole", "mixed.forward_whole"),
                       (MixedInputs, "build", "MixedInputs.build"),
                       (mixed_graphs, "compress_plan", "compress_plan"), (mixed_graphs, "padded_flat", "padded_flat"),
                       (mixed_graphs, "upload", "mixed_graphs.upload")]
        for obj, attr, label in stages:
            split.wrap(obj, attr, label)
    kinds = {"decode": [0, 0.0], "prompt": [0, 0.0]}
    admitted = [0]
    profiles: list[cProfile.Profile] = []       # one per step with prompt tokens
    schedule, step = engine.scheduler.schedule, engine._step
    last_kind = ["decode"]
    measuring = [False]
    tracer = StepTracer(args.trace_steps, engine.config.device != "cpu")

    def tracked_schedule(*a, **k):
        s = schedule(*a, **k)
        last_kind[0] = "prompt" if any(seq.num_computed < len(seq.prompt_ids) for seq in s.seqs) else "decode"
        tracer.kind(last_kind[0])
        split.kind = last_kind[0]
        if measuring[0]:
            admitted[0] += sum(1 for seq in s.seqs if seq.num_computed == 0)
        return s

    def timed_step():
        t = time.perf_counter()
        prof = cProfile.Profile() if args.profile and measuring[0] else None
        if prof is not None:
            prof.enable()
        if measuring[0]:
            tracer.step(step)
        else:
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

    run = lambda total, tag: closed_loop(engine, args, params, total, tag)      # noqa: E731
    run(args.concurrency, "w")                                  # compile, capture, warm caches
    measuring[0] = True
    split.on = args.host_split
    before = engine.stats()
    wall, tokens = run(args.requests, "m")
    after = engine.stats()
    measuring[0] = False
    engine.shutdown()
    print(describe(args, wall, tokens, before, after))
    for name, (n, s) in kinds.items():
        if n:
            print(f"  {name} steps: {n}, {1e3 * s / n:.2f} ms each, {100 * s / wall:.0f} % of the wall time")
    if kinds["prompt"][0]:
        print(f"  requests admitted per step with prompt tokens: {admitted[0] / kinds['prompt'][0]:.2f}")
    if profiles:
        print(f"cProfile of the {len(profiles)} steps with prompt tokens (inflated by the profiler):")
        pstats.Stats(*profiles).sort_stats("tottime").print_stats(35)
        pstats.Stats(*profiles).sort_stats("cumulative").print_stats(40)
    if args.host_split:
        split.report(kinds)
    tracer.report(args.trace_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
