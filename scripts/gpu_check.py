#!/usr/bin/env python3
"""One command for a bare GPU machine (after the gpu-bundle parts are applied): everything a user would measure.

1. the GPU unit tests (`pytest -m gpu tests/gpu`);
2. direct-engine throughput at each concurrency (closed loop, greedy, fixed prompt and max_tokens);
3. a real tritonserver with the model repository (ops backend `cute` by default) on the checkpoint;
4. a streaming smoke test whose tokens must equal the direct engine's greedy output;
5. the same closed-loop workload through Triton's gRPC streaming API, and a perf_analyzer sweep (latencies, errors);
6. one summary JSON and one PNG in the output folder;
7. with --paired-rounds N: N back-to-back rounds of direct / Triton / perf_analyzer at one concurrency, and the
   median of the per-round ratios (the run-to-run drift of a machine is larger than the effect to measure).

    bash scripts/gpu_check.sh OUT_DIR [--checkpoint DIR] [--backend cute] [--concurrency 1 8 32 64]

On the CPU it runs too (`--backend torch --device cpu`), which is how the script itself is tested.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "backend_src"), str(REPO / "kernels"), str(REPO), str(REPO / "scripts")]

PROMPT = ("Paged attention keeps the key and value cache in fixed-size blocks, so that many requests of "
          "different lengths can share one pool of memory without fragmentation. ") * 3


def bundle_layout(tmp: Path) -> Path:
    """A .triton-style layout file for the gpu-bundle's tritonserver (what scripts/triton_setup.py writes locally)."""
    home = Path(os.environ["DSV4_TRITON_HOME"])
    libs = os.environ["DSV4_TRITON_LIBS"]
    import torch
    torch_site = str(Path(torch.__file__).resolve().parents[1])
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    stub_path = [str(Path(libs).parent)]  # numpy 1.26 + tritonclient of the bundle: the 2.51 stub needs numpy < 2
    stub_path += [p for p in extra if p not in stub_path] + [torch_site]
    stub_path += [str(REPO / "backend_src"), str(REPO / "kernels"), str(REPO)]
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    layout = {"schema": 2, "repo": str(REPO), "python": sys.executable, "python_version": pyver,
              "tritonserver": str(home / "bin" / "tritonserver"),
              "perf_analyzer": str(Path(libs).parent / "bin" / "perf_analyzer"),
              "backend_directory": str(home / "backends"),
              "ld_library_path": [libs, str(Path(sys.base_prefix) / "lib")],
              "stub_sys_path": list(dict.fromkeys(stub_path))}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "triton_env.json").write_text(json.dumps(layout, indent=1))
    return tmp


def run_gpu_tests(out: Path) -> dict:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
                       cwd=REPO, text=True, capture_output=True, timeout=900)
    (out / "pytest_gpu.log").write_text(r.stdout + r.stderr)
    last = [l for l in r.stdout.splitlines() if l.strip()][-1:] or ["(no output)"]
    return {"rc": r.returncode, "summary": last[0], "seconds": round(time.time() - t0, 1)}


def loop_result(concurrency: int, tokens: int, wall: float, ttfts: list[float], itls: list[float],
                errors: list[str]) -> dict:
    def avg(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")
    return {"concurrency": concurrency, "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_ms_avg": round(1e3 * avg(ttfts), 2),
            "itl_ms_avg": round(1e3 * avg(itls), 3), "errors": len(errors), "first_error": errors[0] if errors else None}


def closed_loop(submit, concurrency: int, requests_per_worker: int) -> dict:
    """`submit()` runs one request and returns (tokens, ttft_s, itl_list). Returns throughput and latencies."""
    lock = threading.Lock()
    tokens, ttfts, itls, errors = [0], [], [], []

    def worker() -> None:
        for _ in range(requests_per_worker):
            try:
                n, ttft, itl = submit()
            except Exception as e:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                tokens[0] += n
                ttfts.append(ttft)
                itls.extend(itl)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    return loop_result(concurrency, tokens[0], wall, ttfts, itls, errors)


def direct_closed_loop(eng, concurrency: int, requests_per_worker: int, sampling: dict) -> dict:
    """The closed loop of `closed_loop`, driven the way a server drives the engine: every request's deltas go to
    one queue (on_output) that one thread drains, resubmitting as requests finish. (A consumer thread per request
    in the engine's own process would compete with the engine thread for the GIL and understate it.)"""
    from dsv4.engine.params import SamplingParams

    q: queue.Queue = queue.Queue()
    total = concurrency * requests_per_worker
    state: dict[str, list] = {}
    ttfts, itls, errors, tokens, submitted, finished = [], [], [], 0, 0, 0

    def submit() -> None:
        nonlocal submitted
        rid = f"d{concurrency}-{submitted}-{time.monotonic_ns()}"
        submitted += 1
        state[rid] = [time.perf_counter(), None, 0]          # start, last token time, tokens
        eng.add_request(rid, prompt=PROMPT, params=SamplingParams(**sampling),
                        on_output=lambda o, rid=rid: q.put((rid, o, time.perf_counter())))

    t0 = time.perf_counter()
    for _ in range(concurrency):
        submit()
    while finished < total:
        rid, o, now = q.get()
        st = state[rid]
        if o.error:
            errors.append(o.error)
        if o.token_ids:
            if st[1] is None:
                ttfts.append(now - st[0])
            else:
                itls.append(now - st[1])
            st[1] = now
            st[2] += len(o.token_ids)
        if o.finished:
            finished += 1
            tokens += st[2]
            del state[rid]
            if submitted < total:
                submit()
    wall = time.perf_counter() - t0

    return loop_result(concurrency, tokens, wall, ttfts, itls, errors)


def engine_config(args):
    from dsv4.config import EngineConfig

    return EngineConfig(checkpoint=args.checkpoint, device=args.device, ops_backend=args.backend,
                        max_num_seqs=max(args.concurrency), max_model_len=args.max_model_len,
                        async_scheduling=not args.sync_scheduling)


def closed_loops(eng, args, sampling: dict, label: str) -> list[dict]:
    """direct_closed_loop at each concurrency (after a warm-up at that batch size), with how the steps ran:
    graphs, launched ahead of the host."""
    rows = []
    for c in args.concurrency:
        direct_closed_loop(eng, c, 1, sampling)
        before = eng.stats()
        row = direct_closed_loop(eng, c, args.requests_per_worker, sampling)
        after = eng.stats()
        row.update(steps=after.steps - before.steps, graph_steps=after.graph_steps - before.graph_steps,
                   overlapped_steps=after.overlapped_steps - before.overlapped_steps)
        rows.append(row)
        print(label, rows[-1], flush=True)
    return rows


def direct_engine(args, sampling: dict) -> tuple[dict, list[dict]]:
    from dsv4.engine.engine import Engine
    from dsv4.engine.params import SamplingParams

    eng = Engine(engine_config(args))
    try:
        greedy = eng.generate(prompt=PROMPT, params=SamplingParams(**sampling))
        rows = closed_loops(eng, args, sampling, "direct")
        return {"text": greedy.text, "token_ids": greedy.token_ids,
                "deferred_admission_steps": eng.scheduler.num_deferred_steps}, rows
    finally:
        eng.shutdown()


def direct_engine_process(args, sampling: dict) -> list[dict]:
    """The same closed loops through EngineProcess (the engine in a child process, as model.py runs it): what the
    process boundary costs, apart from Triton."""
    from dsv4.engine.process import EngineProcess

    eng = EngineProcess(engine_config(args))
    try:
        return closed_loops(eng, args, sampling, "direct (engine process)")
    finally:
        eng.shutdown()


class TritonStream:
    """One gRPC client with one open stream, for requests one at a time: -> (tokens, ttft, itls, text) per request.
    Closed-loop workers keep theirs across requests, as perf_analyzer and any real client keep their connection
    (a channel and stream opened per request added ~5 ms to every TTFT, measured at c = 1)."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=self._cb)
        self.done = threading.Event()
        self.times: list[float] = []
        self.texts: list[str] = []
        self.counts: list[int] = []
        self.errors: list[str] = []
        self.seq = 0

    def _cb(self, result, error) -> None:
        if error is not None:
            self.errors.append(str(error))
            self.done.set()
            return
        resp = result.get_response()
        now = time.perf_counter()
        t = result.as_numpy("text_output")
        if t is not None and t.size:
            self.texts.append(b"".join(x if isinstance(x, bytes) else bytes(x) for x in t.reshape(-1))
                              .decode("utf-8", "replace"))
            self.times.append(now)
        n = result.as_numpy("num_output_tokens")
        if n is not None and n.size:
            self.counts.append(int(n.reshape(-1)[0]))
        if resp.parameters.get("triton_final_response") and resp.parameters["triton_final_response"].bool_param:
            self.done.set()

    def run(self, sampling: dict) -> tuple[int, float, list[float], str]:
        import numpy as np
        import tritonclient.grpc as grpcclient

        self.done.clear()
        self.times, self.texts, self.counts, self.errors = [], [], [], []
        inputs = []
        for name, val, dt in (("text_input", np.array([PROMPT.encode()], dtype=object), "BYTES"),
                              ("stream", np.array([True]), "BOOL"),
                              ("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=object), "BYTES"),
                              ("return_num_output_tokens", np.array([True]), "BOOL")):
            x = grpcclient.InferInput(name, list(val.shape), dt)
            x.set_data_from_numpy(val)
            inputs.append(x)
        self.seq += 1
        t0 = time.perf_counter()
        self.client.async_stream_infer("deepseek_v4", inputs, request_id=str(self.seq),
                                       enable_empty_final_response=True)
        if not self.done.wait(600):
            raise TimeoutError("no final response in 600 s")
        if self.errors:
            raise RuntimeError(self.errors[0])
        ttft = self.times[0] - t0 if self.times else 0.0
        itl = [b - a for a, b in zip(self.times, self.times[1:])]
        return sum(self.counts), ttft, itl, "".join(self.texts)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def triton_stream(url: str, sampling: dict) -> tuple[int, float, list[float], str]:
    """One request on a stream of its own."""
    s = TritonStream(url)
    try:
        return s.run(sampling)
    finally:
        s.close()


def triton_closed_loop(url: str, concurrency: int, requests_per_worker: int, sampling: dict) -> dict:
    """closed_loop through Triton, each worker on its own TritonStream (a stream that saw an error is replaced)."""
    local = threading.local()
    opened: list[TritonStream] = []
    lock = threading.Lock()

    def submit():
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = TritonStream(url)
            with lock:
                opened.append(s)
        try:
            return s.run(sampling)[:3]
        except Exception:
            local.s = None
            raise

    try:
        return closed_loop(submit, concurrency, requests_per_worker)
    finally:
        for s in opened:
            s.close()


def perf_analyzer(server, root: Path | None, out: Path, concurrency: list[int], args, log: Path,
                  interval_ms: int | None = None) -> tuple[dict, list[dict] | None]:
    """client.loadtest (perf_analyzer, streaming) at `concurrency` -> (rc and log tail, its summary rows)."""
    cmd = [sys.executable, "-m", "client.loadtest", "--url", server.grpc_url, "--out", str(out), "--prompt", PROMPT,
           "--concurrency", ",".join(map(str, concurrency)), "--max-tokens", str(args.max_tokens),
           "--measurement-interval", str(interval_ms or args.pa_interval_ms), "--max-trials", "3", "--stability", "999"]
    if root is not None:
        cmd += ["--perf-analyzer", json.loads((root / "triton_env.json").read_text())["perf_analyzer"]]
    r = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=1200,
                       env={**os.environ, "LD_LIBRARY_PATH": os.environ.get("DSV4_TRITON_LIBS", "") + ":" +
                            os.environ.get("LD_LIBRARY_PATH", "")})
    log.write_text(r.stdout + r.stderr)
    status = {"rc": r.returncode, "tail": (r.stdout + r.stderr).splitlines()[-6:]}
    csv_path = out / "summary.csv"
    if r.returncode != 0 or not csv_path.exists():
        return status, None
    import csv
    with open(csv_path, newline="") as f:
        return status, [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def paired_rounds(server, root: Path | None, out: Path, args, sampling: dict) -> dict:
    """Rounds of direct engine / Triton (Python closed loop, then perf_analyzer) at one concurrency, back to back,
    with a second engine in this process next to the server's: whatever drifts on the machine between runs (the
    direct loop alone varied 5.7-7.7k tok/s at c=32 between runs of one code, docs/PERF.md) hits both sides of a
    round alike, and the median of the per-round ratios is the number to quote."""
    from statistics import median

    from dsv4.engine.engine import Engine

    c = args.paired_concurrency
    out.mkdir(parents=True, exist_ok=True)
    eng = Engine(engine_config(args))
    rounds = []
    try:
        direct_closed_loop(eng, c, 1, sampling)                        # warm-up at this batch size
        n = args.paired_requests_per_worker or 3 * args.requests_per_worker
        for k in range(args.paired_rounds):
            d = direct_closed_loop(eng, c, n, sampling)
            t = triton_closed_loop(server.grpc_url, c, n, sampling)
            status, pa = perf_analyzer(server, root, out / f"perf_{k}", [c], args, out / f"perf_analyzer_{k}.log",
                                       interval_ms=args.paired_pa_interval_ms)
            row = {"direct": d["tokens_per_s"], "triton": t["tokens_per_s"],
                   "perf_analyzer": pa[0]["tokens_per_s"] if pa else None, "perf_analyzer_rc": status["rc"],
                   "errors": d["errors"] + t["errors"] + (status["rc"] != 0)}
            row["triton_over_direct"] = round(row["triton"] / row["direct"], 3)
            row["pa_over_direct"] = round(row["perf_analyzer"] / row["direct"], 3) if pa else None
            rounds.append(row)
            print(f"paired round {k} at c={c}:", row, flush=True)
    finally:
        eng.shutdown()
    pa_ratios = [r["pa_over_direct"] for r in rounds if r["pa_over_direct"] is not None]
    return {"concurrency": c, "rounds": rounds,
            "median_triton_over_direct": round(median(r["triton_over_direct"] for r in rounds), 3) if rounds else None,
            "median_pa_over_direct": round(median(pa_ratios), 3) if pa_ratios else None}


def plot(summary: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in (("direct engine", summary["direct"]), ("tritonserver (gRPC streaming)", summary["triton"])):
        c = [r["concurrency"] for r in rows]
        ax[0].plot(c, [r["tokens_per_s"] for r in rows], "o-", label=name)
        ax[1].plot(c, [r["itl_ms_avg"] for r in rows], "o-", label=name + " ITL")
        ax[1].plot(c, [r["ttft_ms_avg"] for r in rows], "s--", label=name + " TTFT")
    if summary.get("perf_analyzer_rows"):
        pa = summary["perf_analyzer_rows"]
        ax[0].plot([r["concurrency"] for r in pa], [r["tokens_per_s"] for r in pa], "^-",
                   label="tritonserver, perf_analyzer (C++ client)")
    ax[0].set(xlabel="concurrency", ylabel="generated tokens/s", xscale="log", title="throughput")
    ax[1].set(xlabel="concurrency", ylabel="ms", xscale="log", yscale="log", title="latency")
    for a in ax:
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{summary['device']} | {summary['checkpoint']} | ops {summary['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--checkpoint", default=None, help="default: generate the `small` preset in a temp dir")
    ap.add_argument("--backend", default="cute")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--requests-per-worker", type=int, default=6)
    ap.add_argument("--pa-interval-ms", type=int, default=30000,
                    help="perf_analyzer measurement window: it must hold several whole requests")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--sync-scheduling", action="store_true",
                    help="engine and server without async scheduling (read every step's tokens before the next)")
    ap.add_argument("--skip-perf-analyzer", action="store_true")
    ap.add_argument("--paired-rounds", type=int, default=0,
                    help="then this many rounds of direct / Triton / perf_analyzer at --paired-concurrency, back to "
                         "back, and the median ratio (see paired_rounds)")
    ap.add_argument("--paired-concurrency", type=int, default=32)
    ap.add_argument("--paired-requests-per-worker", type=int, default=0,
                    help="requests per worker in each paired round (default 3x --requests-per-worker): a closed "
                         "loop of 2-second rounds spread 6.5-8.9k tok/s at c=32 on one engine (docs/PERF.md, "
                         "session 21), so the rounds must be longer than the main run's")
    ap.add_argument("--paired-pa-interval-ms", type=int, default=4000)
    ap.add_argument("--direct-process", action="store_true",
                    help="also run the direct closed loops through EngineProcess (the engine in its own process)")
    ap.add_argument("--local-triton", action="store_true", help="use .triton/ (make setup) instead of the gpu-bundle")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    summary: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "backend": args.backend, "max_tokens": args.max_tokens}
    if not args.skip_tests:
        summary["gpu_tests"] = run_gpu_tests(out)
        print("gpu tests:", summary["gpu_tests"], flush=True)
    if args.checkpoint is None:
        args.checkpoint = str(Path(tempfile.gettempdir()) / "dsv4-small")
        if not Path(args.checkpoint, "config.json").exists():
            subprocess.run([sys.executable, "-m", "dsv4.cli", "make-checkpoint", "--preset", "small", "--out",
                            args.checkpoint, "--quiet"], check=True, cwd=REPO)
    summary["checkpoint"] = args.checkpoint
    # model.py's engine placement (the environment reaches the server): its own process unless set false
    summary["engine_process"] = os.environ.get("DSV4_ENGINE_PROCESS", "true")
    sampling = {"temperature": 0, "max_tokens": args.max_tokens, "ignore_eos": True}

    reference, summary["direct"] = direct_engine(args, sampling)
    summary["direct_deferred_admission_steps"] = reference["deferred_admission_steps"]
    if args.direct_process:
        summary["direct_process"] = direct_engine_process(args, sampling)
        summary["direct_process_over_direct"] = {
            r["concurrency"]: round(r["tokens_per_s"] / d["tokens_per_s"], 3)
            for r, d in zip(summary["direct_process"], summary["direct"])}

    from triton_local import start_server
    root = None if args.local_triton else bundle_layout(out / "triton_layout")
    env = {"DSV4_DEVICE": args.device, "DSV4_MAX_NUM_SEQS": str(max(args.concurrency)),
           "DSV4_MAX_MODEL_LEN": str(args.max_model_len),
           "DSV4_ASYNC_SCHEDULING": "false" if args.sync_scheduling else "true"}
    server = start_server(REPO / "model_repository", checkpoint=args.checkpoint, ops_backend=args.backend, env=env,
                          triton_root=root, log_path=out / "tritonserver.log", startup_timeout=600)
    try:
        n, _, _, text = triton_stream(server.grpc_url, sampling)
        summary["smoke"] = {"tokens": n, "equal_to_direct_engine": text == reference["text"],
                            "triton_text": text[:200], "direct_text": reference["text"][:200]}
        print("smoke:", summary["smoke"], flush=True)
        rows = []
        for c in args.concurrency:
            triton_closed_loop(server.grpc_url, c, 1, sampling)
            rows.append(triton_closed_loop(server.grpc_url, c, args.requests_per_worker, sampling))
            print("triton", rows[-1], flush=True)
        summary["triton"] = rows
        summary["triton_over_direct"] = {r["concurrency"]: round(r["tokens_per_s"] / d["tokens_per_s"], 3)
                                         for r, d in zip(rows, summary["direct"])}
        if not args.skip_perf_analyzer:
            summary["perf_analyzer"], pa_rows = perf_analyzer(server, root, out / "perf", args.concurrency, args,
                                                              out / "perf_analyzer.log")
            if pa_rows is not None:
                summary["perf_analyzer_rows"] = pa_rows
                # the served throughput as a C++ client sees it: the Python closed loop above is bounded by its
                # own GIL at high concurrency (one client thread per stream), perf_analyzer is not
                summary["triton_pa_over_direct"] = {
                    int(p["concurrency"]): round(p["tokens_per_s"] / d["tokens_per_s"], 3)
                    for p in pa_rows for d in summary["direct"] if d["concurrency"] == int(p["concurrency"])}
        if args.paired_rounds:
            summary["paired"] = paired_rounds(server, root, out / "paired", args, sampling)
        # requests a client abandoned (perf_analyzer exits with streams open when it cannot stabilise) are
        # cancelled within a poll period: give the server a moment before calling blocks leaked
        deadline = time.monotonic() + 15
        while True:
            metrics = server.metrics()
            in_use = next((float(l.split()[-1]) for l in metrics.splitlines()
                           if l.startswith("dsv4_kv_blocks_in_use")), None)
            if not in_use or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        summary["kv_blocks_in_use_after"] = in_use
    finally:
        server.stop()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "summary.png")
    print(json.dumps({k: summary.get(k) for k in ("device", "triton_over_direct", "triton_pa_over_direct",
                                                  "direct_process_over_direct", "paired")},
                     indent=1))
    paired_ok = all(r["errors"] == 0 for r in summary.get("paired", {}).get("rounds", []))
    ok = (summary["smoke"]["equal_to_direct_engine"] and all(r["errors"] == 0 for r in summary["triton"])
          and paired_ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
