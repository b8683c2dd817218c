"""The embedded demo checkpoint, served the way `make serve` serves it (config.pbtxt's default checkpoint), answers
fresh task instances correctly through tritonserver: a broken server cannot pass this, whatever its unit tests say."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ENGINE_ENV, REPO, require_triton

N_INSTANCES = 24
MIN_ACCURACY = 0.9


@pytest.fixture(scope="module")
def demo_server():
    require_triton()
    pytest.importorskip("tritonclient.grpc")
    import triton_local
    from _triton import wait_metrics_up
    # no checkpoint argument: the model repository's default, checkpoints/demo
    srv = triton_local.start_server(REPO / "model_repository", model="deepseek_v4",
                                    env={**ENGINE_ENV, "DSV4_REPO_ROOT": str(REPO)}, startup_timeout=180)
    try:
        wait_metrics_up(srv, "dsv4_kv_blocks_in_use")
        yield srv
    finally:
        srv.stop()


def test_served_demo_model_answers_fresh_recall_questions(demo_server):
    from _triton import infer, request

    from dsv4 import demo_tasks

    instances = demo_tasks.make_instances(N_INSTANCES, seed=20261123)

    def ask(inst):
        rep = infer(demo_server.grpc_url, request(inst.prompt, stream=True, exclude=True, returns=False,
                                                   sampling={"temperature": 0, "max_tokens": 8}), timeout=120)
        assert rep.error is None, rep.error
        return rep.text

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(ask, instances))
    correct = [demo_tasks.check(i, o) for i, o in zip(instances, outputs)]
    wrong = [(i.prompt[-12:], i.answer, o) for i, o, c in zip(instances, outputs, correct) if not c]
    assert sum(correct) / len(correct) >= MIN_ACCURACY, f"{sum(correct)}/{len(correct)} correct; wrong: {wrong}"
