"""Shared e2e fixtures: ONE tritonserver serving model_repository/deepseek_v4 on the session's tiny checkpoint
(CPU, torch ops, free loopback ports), and the same checkpoint's Engine in-process as the reference output.

Skipped when the local Triton toolchain (.triton/, `make setup`) is missing, unless DSV4_REQUIRE_E2E=1.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
E2E = Path(__file__).resolve().parent
for p in (REPO / "scripts", E2E):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import triton_local  # noqa: E402

# the engine settings both the server and the in-process reference use (model.py reads DSV4_* overrides)
ENGINE_ENV = {"DSV4_DEVICE": "cpu", "DSV4_DTYPE": "float32", "DSV4_OPS_BACKEND": "torch"}


def require_triton() -> dict:
    try:
        return triton_local.load_layout()
    except triton_local.SetupMissing as e:
        if os.environ.get("DSV4_REQUIRE_E2E") == "1":
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def dsv4_server(tiny_checkpoint):
    """tritonserver with deepseek_v4 on the tiny checkpoint; shared by every e2e module. Its exit code is checked
    at the end: a stub crash or an unclean shutdown fails the session's last test."""
    require_triton()
    pytest.importorskip("tritonclient.grpc")
    from _triton import wait_metrics_up
    # DSV4_E2E_MODEL_REPOSITORY: serve a copy (e.g. a deliberately broken model.py, to check that the tests fail)
    repository = Path(os.environ.get("DSV4_E2E_MODEL_REPOSITORY") or REPO / "model_repository")
    srv = triton_local.start_server(repository, model="deepseek_v4", checkpoint=str(tiny_checkpoint),
                                    ops_backend="torch", env={**ENGINE_ENV, "DSV4_REPO_ROOT": str(REPO)},
                                    startup_timeout=180)
    try:
        wait_metrics_up(srv, "dsv4_kv_blocks_in_use")
    except BaseException:
        srv.stop()
        raise
    yield srv
    alive = srv.alive()
    rc = srv.stop()
    assert alive, f"tritonserver died during the session (rc={rc}):\n{srv.log_tail()}"
    assert rc == 0, f"tritonserver exit code {rc}:\n{srv.log_tail()}"


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    """The dsv4 Engine in this process on the same checkpoint and settings as the server: the reference output."""
    from dsv4.config import EngineConfig
    from dsv4.engine.engine import Engine

    eng = Engine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cpu", dtype="float32", ops_backend="torch"))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def direct(engine):
    """direct(prompt, **sampling) -> RequestOutput of Engine.generate (memoized per request)."""
    from dsv4.engine.params import SamplingParams

    cache: dict = {}

    def run(prompt: str, **sampling):
        key = (prompt, tuple(sorted((k, repr(v)) for k, v in sampling.items())))
        if key not in cache:
            cache[key] = engine.generate(prompt, params=SamplingParams.from_dict(sampling))
        return cache[key]

    return run
