"""The local Triton infrastructure, without the engine: launcher, Python-backend stub, the stub's numpy<2,
BYTES round trip (non-ASCII included) over gRPC streaming, decoupled responses, custom histogram metric.
The deepseek_v4 model itself: test_streaming.py, test_bad_requests.py, test_cancellation.py, test_perf_analyzer.py.

Uses tests/e2e/echo_repository and a real tritonserver (scripts/triton_local.py) on loopback, free ports.
Skipped when .triton/ was never built (`make setup`), unless DSV4_REQUIRE_E2E=1.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import triton_local  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

grpcclient = pytest.importorskip("tritonclient.grpc")
np = pytest.importorskip("numpy")

from _triton import wait_metrics_up  # noqa: E402


@pytest.fixture(scope="module")
def echo_server():
    try:
        triton_local.load_layout()
    except triton_local.SetupMissing as e:
        if os.environ.get("DSV4_REQUIRE_E2E") == "1":
            raise
        pytest.skip(str(e))
    srv = triton_local.start_server(REPO / "tests" / "e2e" / "echo_repository", model="echo",
                                    startup_timeout=60)
    try:
        wait_metrics_up(srv, "nv_inference_count")  # the metrics service starts after HTTP reports READY
    except BaseException:
        srv.stop()
        raise
    yield srv
    rc = srv.stop()
    assert rc == 0, f"tritonserver exit code {rc}:\n{srv.log_tail()}"


def _stream(url: str, text: str, stream: bool) -> list:
    """Send one request over a gRPC stream; return [(texts, infos)] per response, until the final flag."""
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        inp = grpcclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([text.encode("utf-8")], dtype=np.object_))
        st = grpcclient.InferInput("stream", [1], "BOOL")
        st.set_data_from_numpy(np.array([stream], dtype=bool))
        client.async_stream_infer("echo", [inp, st], request_id=str(uuid.uuid4()),
                                  enable_empty_final_response=True)
        out = []
        while True:
            result, error = q.get(timeout=30)
            assert error is None, error
            resp = result.get_response()
            final = resp.parameters["triton_final_response"].bool_param
            if resp.outputs:
                texts = [t.decode("utf-8") for t in result.as_numpy("text_output")]
                info = result.as_numpy("stub_info")
                out.append((texts, json.loads(info[0]) if info is not None else None))
            if final:
                return out
    finally:
        client.stop_stream()
        client.close()


TEXT = "Grüße, 世界! naïve café — ✓ 🚀"


def test_streaming_bytes_roundtrip_non_ascii(echo_server):
    out = _stream(echo_server.grpc_url, TEXT, stream=True)
    assert "".join(t for texts, _ in out for t in texts) == TEXT
    assert len(out) == len(TEXT)  # one response per character: decoupled streaming really streams
    info = out[0][1]
    # the stub must see numpy<2 first (2.51's Python backend mis-reads BYTES under numpy 2)
    assert int(info["numpy"].split(".")[0]) < 2, info
    assert info["python"].startswith(f"{sys.version_info[0]}.{sys.version_info[1]}"), info


def test_non_streaming_single_response(echo_server):
    out = _stream(echo_server.grpc_url, TEXT, stream=False)
    assert [texts for texts, _ in out] == [[TEXT]]


def test_histogram_metric_exported(echo_server):
    _stream(echo_server.grpc_url, "abc", stream=False)
    metrics = echo_server.metrics()
    if "echo_chars_per_request" not in metrics:
        pytest.fail("custom metric missing:\n" + metrics[-2000:])
    assert "echo_chars_per_request_bucket" in metrics  # HISTOGRAM kind works in this backend


def test_start_failure_reports_log_tail(tmp_path):
    try:
        triton_local.load_layout()
    except triton_local.SetupMissing as e:
        pytest.skip(str(e))
    bad = tmp_path / "repo" / "broken" / "1"
    bad.mkdir(parents=True)
    (bad.parent / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\n'
                                             'input [{name: "x" data_type: TYPE_FP32 dims: [1]}]\n'
                                             'output [{name: "y" data_type: TYPE_FP32 dims: [1]}]\n')
    (bad / "model.py").write_text("raise RuntimeError('boom-from-broken-model')\n")
    with pytest.raises(triton_local.ServerStartError) as ei:
        triton_local.start_server(tmp_path / "repo", model="broken", startup_timeout=60)
    assert "boom-from-broken-model" in str(ei.value)


def test_picked_ports_are_distinct():
    """HTTP, gRPC and metrics ports are picked together: one at a time, the OS once handed HTTP and metrics the same
    port and tritonserver refused to start."""
    for _ in range(50):
        ports = triton_local.free_ports(3)
        assert len(set(ports)) == 3 and all(p > 0 for p in ports)
