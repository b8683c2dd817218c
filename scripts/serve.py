#!/usr/bin/env python3
"""Local launcher (`make serve`): start tritonserver on loopback with model_repository/, wait for deepseek_v4.

    python scripts/serve.py [--checkpoint DIR] [--backend auto|torch|cute] [--http-port 8000] [--grpc-port 8001]
                            [--metrics-port 8002] [--model-repository model_repository] [--quiet]

Needs the toolchain built by `make setup` (scripts/triton_setup.py). Ctrl-C / SIGTERM stop the server cleanly.
Exits non-zero with the server log tail when startup fails.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_local  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Start a local tritonserver serving DeepSeek-V4.")
    ap.add_argument("--model-repository", default=str(triton_local.DEFAULT_REPOSITORY))
    ap.add_argument("--model", default=triton_local.DEFAULT_MODEL, help="model whose readiness is awaited")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint dir (default: config.pbtxt's, i.e. checkpoints/demo); exported as DSV4_CHECKPOINT")
    ap.add_argument("--backend", choices=("auto", "torch", "cute"), default=None,
                    help="ops backend (default: config.pbtxt's); exported as DSV4_OPS_BACKEND")
    ap.add_argument("--host", default="127.0.0.1", help="bind address for all three endpoints (default loopback)")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for READY")
    ap.add_argument("--log-file", default=None, help="server log (default .triton/logs/tritonserver-<port>.log)")
    ap.add_argument("--quiet", action="store_true", help="do not copy the server log to stdout")
    ap.add_argument("--verbose", action="store_true", help="tritonserver --log-verbose=1")
    ap.add_argument("server_args", nargs="*", help="extra tritonserver flags after --")
    args = ap.parse_args(argv)

    extra = list(args.server_args) + (["--log-verbose=1"] if args.verbose else [])
    if args.checkpoint and not Path(args.checkpoint).exists():
        print(f"serve: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2

    # forward SIGINT/SIGTERM (the server runs in its own session so that Ctrl-C reaches it only through us)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    print(f"serve: starting tritonserver ({args.model_repository}) on {args.host} "
          f"http:{args.http_port} grpc:{args.grpc_port} metrics:{args.metrics_port} ...", flush=True)
    try:
        handle = triton_local.start_server(
            args.model_repository, model=args.model, host=args.host,
            http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            checkpoint=args.checkpoint, ops_backend=args.backend, extra_args=extra,
            log_path=args.log_file, echo=not args.quiet, startup_timeout=args.startup_timeout)
    except triton_local.SetupMissing as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    except triton_local.ServerStartError as e:
        print(f"\nserve: startup FAILED: {e}", file=sys.stderr)
        return 1

    if stop.is_set():  # signal arrived while waiting for READY
        handle.stop()
        return 130
    grpc = handle.grpc_url
    print(f"""
serve: model '{args.model}' is READY
  HTTP     http://{handle.http_url}   (e.g. curl http://{handle.http_url}/v2/models/{args.model})
  gRPC     {grpc}
  metrics  {handle.metrics_url}
  log      {handle.log_path}
try:
  .venv/bin/python -m client.stream "Explain CSA attention" --url {grpc} --max-tokens 32
  curl -s -X POST http://{handle.http_url}/v2/models/{args.model}/generate \\
       -d '{{"text_input": "Hello", "parameters": {{"max_tokens": 16, "temperature": 0}}}}'
Ctrl-C stops the server.""", flush=True)

    while not stop.wait(0.5):
        if not handle.alive():
            rc = handle.wait()
            print(f"serve: tritonserver exited unexpectedly with code {rc}; log tail:\n{handle.log_tail()}",
                  file=sys.stderr)
            return rc or 1
    print(f"serve: received {signal.Signals(received[0]).name}, stopping tritonserver ...", flush=True)
    rc = handle.stop()
    print(f"serve: tritonserver exited with code {rc}", flush=True)
    return 0 if rc in (0, -signal.SIGTERM) else rc


if __name__ == "__main__":
    sys.exit(main())
