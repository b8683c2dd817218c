#!/usr/bin/env python3
"""What one call from a Python-backend model into Triton costs: response send, metric observe/increment,
is_cancelled, alone and while another thread of the stub runs Python (as our engine thread does between GPU waits),
at several GIL switch intervals. The numbers behind model.py's dispatcher design (docs/PERF.md, "Serving path").

    .venv/bin/python scripts/stub_ipc_bench.py [--calls 2000]      (needs `make setup`: the local tritonserver)

It writes a throw-away one-model repository to a temp dir, starts tritonserver on free loopback ports, sends one
request and prints the model's measurements.
"""

from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

CONFIG = """
name: "ipc_bench"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "N", data_type: TYPE_INT32, dims: [1] } ]
output [
  { name: "text_output", data_type: TYPE_STRING, dims: [-1] },
  { name: "finish_reason", data_type: TYPE_STRING, dims: [-1] },
  { name: "num_input_tokens", data_type: TYPE_UINT32, dims: [-1] },
  { name: "num_output_tokens", data_type: TYPE_UINT32, dims: [-1] },
  { name: "logprobs", data_type: TYPE_FP32, dims: [-1] }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

MODEL = '''
import os, sys, threading, time
# the local 2.51 stub needs numpy < 2 (.triton/stub_site) ahead of everything for BYTES tensors, as model.py does
for p in reversed([p for p in os.environ.get("DSV4_STUB_SYSPATH", "").split(os.pathsep) if p]):
    sys.path.insert(0, p)
import numpy as np
import triton_python_backend_utils as pb_utils

INTERVALS_MS = (5.0, 1.0, 0.5, 0.2)


class TritonPythonModel:
    def initialize(self, args):
        MF = pb_utils.MetricFamily
        self.families = [MF(name="ipc_bench_h", description="h", kind=MF.HISTOGRAM),
                         MF(name="ipc_bench_c", description="c", kind=MF.COUNTER)]
        self.hist = self.families[0].Metric(labels={"m": "x"}, buckets=[0.001, 0.01, 0.1])
        self.counter = self.families[1].Metric(labels={"m": "x"})

    def execute(self, requests):
        for r in requests:
            n = int(pb_utils.get_input_tensor_by_name(r, "N").as_numpy()[0])
            threading.Thread(target=self.measure, args=(r.get_response_sender(), n)).start()
        return None

    @staticmethod
    def response(text):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))])

    @staticmethod
    def response5(text):
        """What a request with every return_* flag gets (client.loadtest's perf_analyzer input asks for them all)."""
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([b"None"], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([190], dtype=np.uint32)),
            pb_utils.Tensor("num_output_tokens", np.array([5], dtype=np.uint32)),
            pb_utils.Tensor("logprobs", np.zeros(5, dtype=np.float32))])

    @staticmethod
    def per_call_us(fn, n):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e6

    def measure(self, sender, n):
        rows = []
        for name, fn in (("build a response", lambda: self.response("tok")),
                         ("metric observe", lambda: self.hist.observe(0.002)),
                         ("metric increment", lambda: self.counter.increment(1)),
                         ("is_cancelled", sender.is_cancelled),
                         ("response send", lambda: sender.send(self.response("tok"))),
                         ("build a 5-output response", lambda: self.response5("tok")),
                         ("5-output send", lambda: sender.send(self.response5("tok")))):
            rows.append(f"{name:<25} alone: {self.per_call_us(fn, n):8.1f} us/call")
        stop = threading.Event()

        def busy(count):
            x = 0
            while not stop.is_set():
                for i in range(1000):
                    x += i
                count[0] += 1

        count = [0]
        b = threading.Thread(target=busy, args=(count,))
        b.start()
        time.sleep(1.0)
        stop.set()
        b.join()
        alone = count[0]
        for ms in INTERVALS_MS:
            sys.setswitchinterval(ms / 1000.0)
            stop.clear()
            count = [0]
            b = threading.Thread(target=busy, args=(count,))
            b.start()
            t = time.perf_counter()
            us = self.per_call_us(lambda: sender.send(self.response("tok")), max(n // 10, 50))
            dt = time.perf_counter() - t
            stop.set()
            b.join()
            rows.append(f"response send, a Python thread busy, GIL switch interval {ms:3.1f} ms: {us:8.1f} us/call "
                        f"(busy thread at {count[0] / dt / alone:.2f} of its speed alone)")
        sys.setswitchinterval(0.005)
        sender.send(self.response("\\n".join(rows)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    import numpy as np
    import tritonclient.grpc as grpc
    from triton_local import start_server

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "ipc_bench" / "1"
        model_dir.mkdir(parents=True)
        (model_dir.parent / "config.pbtxt").write_text(CONFIG)
        (model_dir / "model.py").write_text(textwrap.dedent(MODEL))
        server = start_server(tmp, model="ipc_bench", log_path=Path(tmp) / "server.log")
        try:
            results: queue.Queue = queue.Queue()
            client = grpc.InferenceServerClient(server.grpc_url)
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            n = grpc.InferInput("N", [1], "INT32")
            n.set_data_from_numpy(np.array([args.calls], dtype=np.int32))
            client.async_stream_infer("ipc_bench", [n])
            while True:
                result, error = results.get(timeout=600)
                if error is not None:
                    raise SystemExit(f"ipc_bench failed: {error}")
                text = result.as_numpy("text_output")[0].decode()
                if text != "tok":
                    print(text)
                    break
            client.stop_stream()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
