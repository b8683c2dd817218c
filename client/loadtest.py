"""Concurrency sweep with perf_analyzer against the streaming deepseek_v4 model; CSV + PNG plot.

    python -m client.loadtest --out out/loadtest [--url 127.0.0.1:8001] [--concurrency 1:8:1]
        [--prompt "..."] [--max-tokens 32] [--measurement-interval 10000] [--start-server]

Writes into --out:
  input_data.json      perf_analyzer --input-data (text_input + sampling_parameters + stream=true)
  perf_c<N>.csv        perf_analyzer -f output per concurrency (request latency percentiles, infer/s)
  profile_c<N>.json    perf_analyzer --profile-export-file (per-request response timestamps)
  summary.csv          one row per concurrency: req/s, output tokens/s (req/s x max_tokens: ignore_eos), responses/s,
                       latency p50/p99, TTFT, ITL (between responses)
  loadtest.png         throughput and latency vs concurrency

perf_analyzer comes from the tritonclient 2.50 wheel via `make setup` (.triton/bin/perf_analyzer sets its
LD_LIBRARY_PATH); --perf-analyzer overrides. Each response of the streaming model carries one engine delta
(usually one token), so responses/s is the output-token rate.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_input_data(path: Path, prompts: list[str], sampling: dict) -> Path:
    """perf_analyzer --input-data. Every return_* flag is set: perf_analyzer 2.50 records each model output of
    every response in --profile-export-file and reads garbage for outputs a response lacks; a garbage FP32
    ``logprobs`` that is NaN/inf makes its JSON writer stop, leaving an EMPTY profile file (seen in ~1 of 4
    runs). With the flags only ``output_ids`` (INT32, always valid JSON) stays absent."""
    data = {"data": [{
        "text_input": [p],
        "stream": [True],
        "exclude_input_in_output": [True],
        "sampling_parameters": [json.dumps(sampling)],
        "return_finish_reason": [True],
        "return_num_input_tokens": [True],
        "return_num_output_tokens": [True],
        "return_logprobs": [True],
    } for p in prompts]}
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    return path


def find_perf_analyzer(explicit: str | None) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if explicit:
        return [explicit], env
    layout_file = REPO / ".triton" / "triton_env.json"
    if layout_file.exists():
        layout = json.loads(layout_file.read_text())
        env["LD_LIBRARY_PATH"] = os.pathsep.join(layout["ld_library_path"] + [env.get("LD_LIBRARY_PATH", "")])
        return [layout["perf_analyzer"]], env
    found = shutil.which("perf_analyzer")
    if found:
        return [found], env
    raise SystemExit("perf_analyzer not found: run `make setup` (or pass --perf-analyzer)")


def parse_range(spec: str) -> list[int]:
    """`start:end:step` (inclusive) or a comma-separated list such as `1,8,32,64`."""
    if "," in spec:
        return [int(x) for x in spec.split(",")]
    parts = [int(x) for x in spec.split(":")]
    start, end, step = (parts + [parts[0], 1])[:3] if len(parts) < 3 else parts
    return list(range(start, end + 1, step))


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[k]


def summarize_profile(profile: Path) -> dict:
    """TTFT / ITL / token rate from perf_analyzer's profile export (timestamps in ns)."""
    doc = json.loads(profile.read_text())
    exps = doc.get("experiments", [])
    ttft, itl, n_resp = [], [], 0
    window = []
    for exp in exps[-1:]:  # the last (stable) measurement of this run
        for req in exp.get("requests", []):
            ts = req.get("timestamp")
            rts = req.get("response_timestamps", [])
            if ts is None or not rts:
                continue
            ttft.append((rts[0] - ts) / 1e6)
            itl.extend((b - a) / 1e6 for a, b in zip(rts, rts[1:]))
            n_resp += len(rts)
            window += [ts, rts[-1]]
    span_s = (max(window) - min(window)) / 1e9 if window else 0.0
    return {
        "ttft_ms_avg": statistics.fmean(ttft) if ttft else float("nan"),
        "ttft_ms_p99": _pct(ttft, 0.99),
        "itl_ms_avg": statistics.fmean(itl) if itl else float("nan"),
        "itl_ms_p99": _pct(itl, 0.99),
        "responses_per_s": n_resp / span_s if span_s > 0 else float("nan"),
        "requests_profiled": len(ttft),
    }


# the components of perf_analyzer's average client latency, as columns of its -f CSV
_LATENCY_PARTS = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                  "Server Compute Infer", "Server Compute Output", "Client Recv")


def read_perf_csv(path: Path) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise RuntimeError(f"{path} has no rows")
    r = rows[-1]
    us = lambda k: float(r.get(k, "nan") or "nan") / 1000.0  # noqa: E731  (perf_analyzer reports usec)
    avg = us("Avg latency")
    if avg != avg and all(k in r for k in _LATENCY_PARTS):  # 2.50's -f CSV has no "Avg latency": sum its parts
        avg = sum(us(k) for k in _LATENCY_PARTS)
    return {"requests_per_s": float(r.get("Inferences/Second", "nan") or "nan"),
            "latency_ms_avg": avg, "latency_ms_p50": us("p50 latency"),
            "latency_ms_p90": us("p90 latency"), "latency_ms_p99": us("p99 latency")}


def plot(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(c, [r["tokens_per_s"] for r in rows], "o-", label="output tokens/s")
    ax1.plot(c, [r["responses_per_s"] for r in rows], "x:", label="responses/s")
    ax1.set_xlabel("concurrency")
    ax1.set_ylabel("tokens/s")
    ax1b = ax1.twinx()
    ax1b.plot(c, [r["requests_per_s"] for r in rows], "s--", color="tab:orange", label="requests/s")
    ax1b.set_ylabel("requests/s")
    ax1.set_title("throughput")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax2.plot(c, [r["latency_ms_p50"] for r in rows], "o-", label="request p50")
    ax2.plot(c, [r["latency_ms_p99"] for r in rows], "o--", label="request p99")
    ax2.plot(c, [r["ttft_ms_avg"] for r in rows], "^-", label="TTFT avg")
    ax2.plot(c, [r["itl_ms_avg"] for r in rows], "v-", label="inter-token avg")
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("ms")
    ax2.set_title("latency")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_xticks(c)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_sweep(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "ignore_eos": True}
    prompts = args.prompt or ["Explain CSA attention in one paragraph."]
    data = write_input_data(out / "input_data.json", prompts, sampling)
    pa, env = find_perf_analyzer(args.perf_analyzer)
    rows = []
    for conc in parse_range(args.concurrency):
        csv_path, prof = out / f"perf_c{conc}.csv", out / f"profile_c{conc}.json"
        cmd = pa + ["-m", args.model, "-u", args.url, "-i", "grpc", "--streaming",
                    "--input-data", str(data), "--concurrency-range", f"{conc}:{conc}:1",
                    "--measurement-interval", str(args.measurement_interval),
                    "--stability-percentage", str(args.stability), "--max-trials", str(args.max_trials),
                    "-f", str(csv_path), "--profile-export-file", str(prof)] + args.pa_args
        print("$ " + " ".join(cmd), flush=True)
        r = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=args.timeout)
        (out / f"perf_c{conc}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0 or not csv_path.exists():
            tail = "\n".join((r.stdout + r.stderr).splitlines()[-25:])
            raise SystemExit(f"perf_analyzer failed at concurrency {conc} (rc={r.returncode}):\n{tail}")
        row = {"concurrency": conc, **read_perf_csv(csv_path), **summarize_profile(prof)}
        # ignore_eos: every request yields exactly max_tokens tokens. Responses/s undercounts them once the server
        # merges deltas that queued up while it was busy (one response then carries several tokens).
        row["tokens_per_s"] = row["requests_per_s"] * args.max_tokens
        rows.append(row)
        print(f"  c={conc}: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} tok/s "
              f"({row['responses_per_s']:.1f} responses/s), "
              f"p50 {row['latency_ms_p50']:.0f} ms, TTFT {row['ttft_ms_avg']:.0f} ms, ITL {row['itl_ms_avg']:.1f} ms",
              flush=True)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "loadtest.png",
         f"{args.model} @ {args.url}: max_tokens={args.max_tokens}, streaming gRPC, perf_analyzer")
    print(f"wrote {out / 'summary.csv'} and {out / 'loadtest.png'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.loadtest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "out" / "loadtest"))
    ap.add_argument("--url", default="127.0.0.1:8001", help="gRPC endpoint")
    ap.add_argument("--model", default="deepseek_v4")
    ap.add_argument("--concurrency", default="1:4:1", help="start:end:step (inclusive)")
    ap.add_argument("--prompt", action="append", help="prompt (repeatable; perf_analyzer cycles through them)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--measurement-interval", type=int, default=10000, help="ms per measurement window")
    ap.add_argument("--stability", type=int, default=999,
                    help="perf_analyzer --stability-percentage (999, as GenAI-Perf passes: streamed LLM requests last "
                         "seconds, so a window's throughput swings with how many requests end in it, and the "
                         "default 10 %% check never passes at high concurrency; the numbers are the mean of the "
                         "last 3 windows either way)")
    ap.add_argument("--max-trials", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per perf_analyzer run")
    ap.add_argument("--perf-analyzer", default=None, help="perf_analyzer binary (default: .triton's)")
    ap.add_argument("--start-server", action="store_true",
                    help="start a local tritonserver on free loopback ports for the sweep (scripts/triton_local.py)")
    ap.add_argument("--checkpoint", default=None, help="with --start-server: checkpoint dir")
    ap.add_argument("--backend", default=None, help="with --start-server: ops backend")
    ap.add_argument("--model-repository", default=str(REPO / "model_repository"))
    ap.add_argument("pa_args", nargs="*", help="extra perf_analyzer flags after --")
    args = ap.parse_args(argv)
    if not args.start_server:
        run_sweep(args)
        return 0
    sys.path.insert(0, str(REPO / "scripts"))
    import triton_local

    with triton_local.start_server(args.model_repository, model=args.model, checkpoint=args.checkpoint,
                                   ops_backend=args.backend) as srv:
        args.url = srv.grpc_url
        run_sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
