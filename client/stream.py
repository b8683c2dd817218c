"""Stream tokens from the deepseek_v4 Triton model over gRPC.

    python -m client.stream "Explain CSA attention" [--max-tokens 64] [--temperature 0.7] [--top-p 0.9]
        [--top-k 50] [--seed 1] [--no-stream] [--url localhost:8001] [--model deepseek_v4]

Prints text as it arrives; the last line reports TTFT (ms), tokens/s and the finish reason.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import uuid
from dataclasses import dataclass, field


@dataclass
class StreamResult:
    text: str = ""
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    responses: int = 0
    chunks: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token (tokens 2..N over the time since the first token); for a single
        (non-streaming) response, all tokens over the whole request."""
        if self.responses <= 1 or self.ttft_s is None or self.total_s <= self.ttft_s:
            return self.num_output_tokens / self.total_s if self.total_s > 0 else 0.0
        return (self.num_output_tokens - 1) / (self.total_s - self.ttft_s) if self.num_output_tokens > 1 else 0.0


def build_inputs(prompt: str, sampling: dict, stream: bool, exclude_input: bool = True):
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name, arr, dtype):
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    return [
        tensor("text_input", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES"),
        tensor("stream", np.array([stream], dtype=bool), "BOOL"),
        tensor("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=np.object_), "BYTES"),
        tensor("exclude_input_in_output", np.array([exclude_input], dtype=bool), "BOOL"),
        tensor("return_finish_reason", np.array([True], dtype=bool), "BOOL"),
        tensor("return_num_input_tokens", np.array([True], dtype=bool), "BOOL"),
        tensor("return_num_output_tokens", np.array([True], dtype=bool), "BOOL"),
    ]


def generate(prompt: str, sampling: dict, *, url: str = "localhost:8001", model: str = "deepseek_v4",
             stream: bool = True, on_text=None, timeout_s: float = 600.0) -> StreamResult:
    """One request over a gRPC bidirectional stream; ``on_text(chunk)`` is called per response.

    Raises tritonclient.utils.InferenceServerException with the server's message on a per-request error."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    q: queue.Queue = queue.Queue()
    res = StreamResult()
    client = grpcclient.InferenceServerClient(url)
    t0 = time.perf_counter()
    try:
        client.start_stream(callback=lambda result, error: q.put((time.perf_counter(), result, error)))
        client.async_stream_infer(model, build_inputs(prompt, sampling, stream), request_id=uuid.uuid4().hex,
                                  enable_empty_final_response=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                t, result, error = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise InferenceServerException(f"no final response within {timeout_s:.0f} s") from None
            if error is not None:
                raise error
            resp = result.get_response()
            final = resp.parameters["triton_final_response"].bool_param if "triton_final_response" in \
                resp.parameters else True
            if resp.outputs:
                res.responses += 1
                chunk = "".join(x.decode("utf-8", "replace") for x in result.as_numpy("text_output"))
                n = result.as_numpy("num_output_tokens")
                n_new = int(n.reshape(-1)[0]) if n is not None else 0
                if (chunk or n_new) and res.ttft_s is None:
                    res.ttft_s = t - t0
                res.num_output_tokens = res.num_output_tokens + n_new if stream else n_new
                ni = result.as_numpy("num_input_tokens")
                if ni is not None:
                    res.num_input_tokens = int(ni.reshape(-1)[0])
                fr = result.as_numpy("finish_reason")
                if fr is not None and fr.size:
                    v = fr.reshape(-1)[0].decode()
                    res.finish_reason = None if v == "None" else v
                res.chunks.append(chunk)
                res.text += chunk
                if on_text is not None:
                    on_text(chunk)
            if final:
                res.total_s = t - t0
                return res
    finally:
        try:
            client.stop_stream()
        finally:
            client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=None, help="0 => greedy (server default 1.0)")
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ap.add_argument("--no-stream", action="store_true", help="one response at the end")
    ap.add_argument("--url", default="localhost:8001", help="gRPC endpoint host:port")
    ap.add_argument("--model", default="deepseek_v4")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)

    sampling = {"max_tokens": args.max_tokens}
    for key in ("temperature", "top_p", "top_k", "seed", "stop"):
        v = getattr(args, key)
        if v is not None:
            sampling[key] = v

    from tritonclient.utils import InferenceServerException

    def show(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        res = generate(args.prompt, sampling, url=args.url, model=args.model, stream=not args.no_stream,
                       on_text=show, timeout_s=args.timeout)
    except InferenceServerException as e:
        print(f"\nerror: {e.message() if hasattr(e, 'message') else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    ttft = f"{res.ttft_s * 1000:.1f} ms" if res.ttft_s is not None else "n/a"
    print(f"\n[TTFT {ttft} | {res.num_output_tokens} tokens in {res.total_s:.2f} s | "
          f"{res.tokens_per_s:.1f} tokens/s | finish_reason={res.finish_reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
