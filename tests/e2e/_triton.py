"""Client helpers shared by the e2e tests (gRPC streaming, HTTP generate/SSE, metrics). Not a test module."""
from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "deepseek_v4"
RETURN_FLAGS = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")

_NP = {"BYTES": np.object_, "BOOL": bool, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


def tensor(name: str, value, dtype: str) -> grpcclient.InferInput:
    arr = np.array(value, dtype=_NP[dtype])
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def request(prompt: str | bytes | None = "Hello world", *, stream: bool = True, sampling: dict | str | None = None,
            returns: bool = True, exclude: bool | None = None) -> list[grpcclient.InferInput]:
    """The vLLM-backend style inputs; ``sampling`` dict is JSON-encoded, a str is sent verbatim."""
    inputs = []
    if prompt is not None:
        inputs.append(tensor("text_input", [prompt if isinstance(prompt, bytes) else prompt.encode()], "BYTES"))
    inputs.append(tensor("stream", [stream], "BOOL"))
    if sampling is not None:
        raw = sampling if isinstance(sampling, (str, bytes)) else json.dumps(sampling)
        inputs.append(tensor("sampling_parameters", [raw if isinstance(raw, bytes) else raw.encode()], "BYTES"))
    if exclude is not None:
        inputs.append(tensor("exclude_input_in_output", [exclude], "BOOL"))
    if returns:
        inputs += [tensor(flag, [True], "BOOL") for flag in RETURN_FLAGS]
    return inputs


def greedy(max_tokens: int, **kw) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


@dataclass
class Reply:
    responses: list = field(default_factory=list)  # dicts of output name -> numpy array, responses with outputs
    finals: list = field(default_factory=list)     # triton_final_response flag of every response (empty ones too)
    times: list = field(default_factory=list)      # arrival time (monotonic) of every response with outputs
    error: Exception | None = None
    t_sent: float = 0.0
    t_done: float = 0.0

    @property
    def text(self) -> str:
        return "".join(r["text_output"][0].decode("utf-8") for r in self.responses)

    def ints(self, name: str) -> list[int]:
        return [int(r[name][0]) for r in self.responses]

    def strs(self, name: str) -> list[str]:
        return [r[name][0].decode() for r in self.responses]


def infer(url: str, inputs, *, outputs=None, cancel_after: int | None = None, cancel_when=None,
          timeout: float = 60.0, barrier=None) -> Reply:
    """One request on its own gRPC bidirectional stream, read until the final flag (or an error).

    ``cancel_after=N``: after N responses with outputs, ``stop_stream(cancel_requests=True)``.
    ``cancel_when(reply) -> bool``: polled every 50 ms (also before any response); True cancels likewise."""
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    rep = Reply()
    try:
        client.start_stream(callback=lambda result, error: q.put((time.monotonic(), result, error)))
        if barrier is not None:
            barrier.wait(timeout=30)
        rep.t_sent = time.monotonic()
        client.async_stream_infer(MODEL, inputs, outputs=outputs, request_id=uuid.uuid4().hex,
                                  enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while True:
            if cancel_when is not None and cancel_when(rep):
                client.stop_stream(cancel_requests=True)
                break
            try:
                t, result, error = q.get(timeout=0.05 if cancel_when is not None else
                                         max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no final response within {timeout} s; got {len(rep.responses)} responses")
                continue
            if error is not None:
                rep.error = error
                break
            resp = result.get_response()
            final = resp.parameters["triton_final_response"].bool_param
            rep.finals.append(final)
            if resp.outputs:
                rep.responses.append({o.name: result.as_numpy(o.name) for o in resp.outputs})
                rep.times.append(t)
            if cancel_after is not None and len(rep.responses) >= cancel_after and not final:
                client.stop_stream(cancel_requests=True)
                break
            if final:
                break
        rep.t_done = time.monotonic()
    finally:
        client.stop_stream()
        client.close()
    return rep


# ------------------------------------------------------------------------------------------------ HTTP
def http_post(base: str, path: str, body, timeout: float = 60.0) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{base}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def http_get_status(base: str, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{base}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def sse_events(body: str) -> list[dict]:
    """The JSON payloads of a text/event-stream body ("data: {...}" lines)."""
    return [json.loads(line[len("data:"):]) for line in body.splitlines() if line.startswith("data:")]


# ------------------------------------------------------------------------------------------------ metrics
def metric(text: str, name: str, **labels) -> float | None:
    """The value of the first sample ``name{...}`` whose labels include ``labels``; None if absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_metrics_up(server, needle: str, timeout: float = 60.0) -> str:
    """Block until the metrics endpoint answers and shows ``needle``. start_server() returns once HTTP says READY,
    but tritonserver starts its metrics service after the HTTP one: a test reading metrics right away can get
    "connection refused" (seen on this loaded 2-core machine)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = server.metrics()
            if needle in text:
                return text
        except OSError:
            pass
        if time.monotonic() > deadline or not server.alive():
            raise AssertionError(f"metrics endpoint {server.metrics_url} not serving {needle!r} after {timeout} s "
                                 f"(server alive: {server.alive()}):\n{server.log_tail()}")
        time.sleep(0.1)


def wait_for(server, cond, timeout: float = 15.0, period: float = 0.1) -> str:
    """Poll the metrics endpoint until ``cond(metrics_text)``; returns that text or raises AssertionError."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = server.metrics()
        if cond(text):
            return text
        time.sleep(period)
    lines = [ln for ln in text.splitlines() if ln.startswith("dsv4_") and "_bucket" not in ln]
    raise AssertionError(f"metrics condition not met within {timeout} s:\n" + "\n".join(lines))


def kv_blocks_in_use(text: str) -> float | None:
    return metric(text, "dsv4_kv_blocks_in_use", model=MODEL)


def requests_total(text: str, outcome: str) -> float:
    return metric(text, "dsv4_requests_total", model=MODEL, outcome=outcome) or 0.0
