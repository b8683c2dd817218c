"""The model's engine settings (config.pbtxt parameters / DSV4_* variables) reach the engine through tritonserver:
a server with an FP8 KV cache, synchronous scheduling and its own GIL switch interval streams what an in-process
engine with the same settings generates, and sizes its cache as that engine does; a bad setting fails the model's
load with a message that names it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import triton_local  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
pytest.importorskip("tritonclient.grpc")

from _triton import MODEL, greedy, infer, metric, request, wait_metrics_up  # noqa: E402
from conftest import ENGINE_ENV, require_triton  # noqa: E402

SETTINGS = {"DSV4_KV_CACHE_DTYPE": "fp8_e4m3", "DSV4_ASYNC_SCHEDULING": "false", "DSV4_GIL_SWITCH_INTERVAL_MS": "2",
            "DSV4_MAX_WAITING_STEPS": "0"}


def test_settings_reach_the_engine(tiny_checkpoint, dsv4_server):
    require_triton()
    from dsv4.config import EngineConfig
    from dsv4.engine.engine import Engine
    from dsv4.engine.params import SamplingParams

    srv = triton_local.start_server(REPO / "model_repository", model="deepseek_v4", checkpoint=str(tiny_checkpoint),
                                    ops_backend="torch", env={**ENGINE_ENV, **SETTINGS, "DSV4_REPO_ROOT": str(REPO)},
                                    startup_timeout=180)
    try:
        metrics = wait_metrics_up(srv, "dsv4_kv_blocks_total")
        rep = infer(srv.grpc_url, request("Paged attention", sampling=greedy(12)))
        assert rep.error is None, rep.error
    finally:
        assert srv.stop() == 0, srv.log_tail()
    eng = Engine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", ops_backend="torch",
                              kv_cache_dtype="fp8_e4m3", async_scheduling=False, max_waiting_steps=0))
    try:
        want = eng.generate("Paged attention", params=SamplingParams.from_dict(greedy(12)))
        assert rep.text == want.text
        fp8_blocks = eng.stats().kv_blocks_total
    finally:
        eng.shutdown()
    # the same memory budget holds more FP8 blocks than the default server's float32 ones
    assert metric(metrics, "dsv4_kv_blocks_total", model=MODEL) == fp8_blocks
    assert fp8_blocks > metric(wait_metrics_up(dsv4_server, "dsv4_kv_blocks_total"), "dsv4_kv_blocks_total",
                               model=MODEL)


def test_a_bad_setting_fails_the_load_naming_it(tiny_checkpoint):
    require_triton()
    with pytest.raises(triton_local.ServerStartError) as ei:
        triton_local.start_server(REPO / "model_repository", model="deepseek_v4", checkpoint=str(tiny_checkpoint),
                                  ops_backend="torch",
                                  env={**ENGINE_ENV, "DSV4_KV_CACHE_DTYPE": "int4", "DSV4_REPO_ROOT": str(REPO)},
                                  startup_timeout=120)
    assert "kv_cache_dtype" in str(ei.value)
