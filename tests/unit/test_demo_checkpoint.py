"""The embedded demo checkpoint (`checkpoints/demo`, made by scripts/train_demo.py) loads and answers its tasks.

The engine (torch ops, CPU) must answer fresh instances of `dsv4.demo_tasks` (a seed that neither training nor
docs/DEMO.md's evaluation used) at least as well as THRESHOLD, a bound the trained checkpoint meets with margin
(docs/DEMO.md has the measured accuracies) and a random-weights checkpoint of the same shape cannot (it answers
none: a three-digit answer guessed at random is right once in 10^3).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dsv4 import demo_tasks
from dsv4.checkpoint.loader import load_checkpoint
from dsv4.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.params import SamplingParams

DEMO = Path(os.environ.get("DSV4_DEMO_CHECKPOINT") or Path(__file__).resolve().parents[2] / "checkpoints" / "demo")
N = 50
SEED = 777
THRESHOLD = 0.9

pytestmark = pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="checkpoints/demo is not present")


def answers(checkpoint: Path, instances: list[demo_tasks.Instance]) -> list[str]:
    engine = Engine(EngineConfig(checkpoint=str(checkpoint), device="cpu", ops_backend="torch", max_num_seqs=N,
                                 max_model_len=1024, max_num_batched_tokens=4096, num_kv_blocks=4 * N + 8))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8)
        streams = [engine.add_request(f"demo-{i}", prompt=inst.prompt, params=params)
                   for i, inst in enumerate(instances)]
        outs = []
        for s in streams:
            text = []
            for out in s:
                assert out.error is None, out.error
                text.append(out.text)
            outs.append("".join(text))
        return outs
    finally:
        engine.shutdown()


def accuracy(checkpoint: Path, instances: list[demo_tasks.Instance]) -> float:
    outs = answers(checkpoint, instances)
    return sum(demo_tasks.check(i, o) for i, o in zip(instances, outs)) / len(instances)


def test_demo_checkpoint_loads_in_the_release_layout():
    ckpt = load_checkpoint(DEMO, progress=False)
    cfg = ckpt.config
    assert set(cfg.compress_ratios[: cfg.n_layers]) == {0, 4, 128}    # window-only, CSA, HCA
    assert 0 < cfg.n_hash_layers < cfg.n_layers and cfg.n_mtp_layers == 1 and cfg.hc_mult > 1
    assert ckpt.formats["layers.0.ffn.experts.0.w1.weight"] == "nvfp4"
    assert ckpt.formats["layers.1.attn.wq_a.weight"] == "fp8"
    assert ckpt.tokenizer_path is not None
    assert sum(p.stat().st_size for p in DEMO.iterdir()) < 16 * 1024 * 1024


def test_demo_checkpoint_answers_fresh_instances():
    instances = demo_tasks.make_instances(N, SEED)
    outs = answers(DEMO, instances)
    acc = sum(demo_tasks.check(i, o) for i, o in zip(instances, outs)) / N
    wrong = [(i.prompt[-12:], i.answer, o) for i, o in zip(instances, outs) if not demo_tasks.check(i, o)]
    assert acc >= THRESHOLD, f"accuracy {acc:.2f} < {THRESHOLD}; wrong (prompt tail, answer, output): {wrong}"


def test_random_weights_fail_the_same_bar(tmp_path):
    """The bar means something: the same architecture with random weights stays far below it."""
    from dsv4.checkpoint.writer import make_checkpoint

    cfg = load_checkpoint(DEMO, progress=False).config
    rand = make_checkpoint(cfg, tmp_path / "random", fmt="nvfp4", seed=1)
    instances = demo_tasks.make_instances(8, SEED)
    assert accuracy(rand, instances) < THRESHOLD / 2
