"""Deferred admission: while requests decode, a new one waits up to `max_waiting_steps` decode steps (or until the
waiting are `waiting_served_ratio` of the running) so that prefills share an eager step; nothing is ever starved,
and an engine that defers still decodes exactly what the oracle decodes."""

from __future__ import annotations

import pytest
import torch

from dsv4.checkpoint.loader import load_checkpoint
from dsv4.checkpoint.presets import PRESETS
from dsv4.config import EngineConfig
from dsv4.engine.engine import Engine
from dsv4.engine.kv_cache import KVCache
from dsv4.engine.params import SamplingParams
from dsv4.engine.request import Sequence
from dsv4.engine.scheduler import Scheduler
from dsv4.reference import ReferenceModel


def _seq(i: int, prompt_len: int = 8) -> Sequence:
    return Sequence(request_id=f"s{i}", prompt_ids=list(range(2, 2 + prompt_len)), params=SamplingParams(),
                    stream=None, detokenizer=None, stop=None, generator=None)


def _scheduler(max_waiting_steps: int, ratio: float = 0.25, min_expected_arrivals: float = 0.0) -> Scheduler:
    cache = KVCache(PRESETS["tiny"](None), num_blocks=64, block_size=128, max_seqs=16, device=torch.device("cpu"),
                    dtype=torch.float32)
    return Scheduler(cache, max_num_seqs=16, max_num_batched_tokens=512, max_waiting_steps=max_waiting_steps,
                     waiting_served_ratio=ratio, min_expected_arrivals=min_expected_arrivals)


def _decode_step(sch: Scheduler) -> list[Sequence]:
    """schedule() and pretend the model ran: every scheduled sequence computed its tokens and sampled one more."""
    step = sch.schedule()
    for seq, n in zip(step.seqs, step.num_tokens):
        seq.num_computed += n
        seq.output_ids.append(5)
    return step.seqs


def test_nothing_running_admits_at_once():
    sch = _scheduler(max_waiting_steps=8)
    a = _seq(0)
    sch.add(a)
    assert _decode_step(sch) == [a]


def test_a_new_request_waits_for_the_decode_steps_then_joins():
    sch = _scheduler(max_waiting_steps=3, ratio=10.0)
    running = [_seq(i) for i in range(4)]
    for s in running:
        sch.add(s)
    _decode_step(sch)                                    # all four admitted together (nothing was running)
    late = _seq(9)
    sch.add(late)
    steps = [_decode_step(sch) for _ in range(4)]
    assert [late in s for s in steps] == [False, False, False, True]
    assert all(set(running) <= set(s) for s in steps)   # the running ones decode meanwhile


def test_enough_waiting_requests_are_admitted_without_waiting():
    sch = _scheduler(max_waiting_steps=100, ratio=0.5)
    for i in range(4):
        sch.add(_seq(i))
    _decode_step(sch)
    sch.add(_seq(10))
    assert len(_decode_step(sch)) == 4                   # 1 waiting < 0.5 x 4 running: it waits
    sch.add(_seq(11))
    assert len(_decode_step(sch)) == 6                   # 2 waiting >= 0.5 x 4: both join


def test_rare_arrivals_are_admitted_at_once():
    """Waiting only pays when others are likely to arrive meanwhile: one request per many steps goes in at once."""
    sch = _scheduler(max_waiting_steps=8, ratio=10.0, min_expected_arrivals=1.5)
    for i in range(4):
        sch.add(_seq(i))
    for _ in range(40):
        _decode_step(sch)                                # no arrivals for a while: the average decays
    late = _seq(9)
    sch.add(late)
    assert late in _decode_step(sch)


def test_frequent_arrivals_wait_to_share_a_prefill():
    sch = _scheduler(max_waiting_steps=8, ratio=10.0, min_expected_arrivals=1.5)
    for i in range(4):
        sch.add(_seq(i))
    _decode_step(sch)
    admitted_together = []
    for k in range(24):                                  # one arrival every step: ~8 expected during a wait
        sch.add(_seq(100 + k))
        step = sch.schedule()
        admitted_together.append(sum(1 for s, n in zip(step.seqs, step.num_tokens) if n > 1))
        for seq, n in zip(step.seqs, step.num_tokens):
            seq.num_computed += n
            seq.output_ids.append(5)
    assert sch.arrivals_per_step > 0.5
    assert max(admitted_together) >= 4                   # prompts went in together, several per prefill step
    assert admitted_together.count(0) > 12               # and most steps were decode-only


def test_admission_due_before_a_step_is_the_decision_the_step_takes():
    """The engine asks admission_due() to know whether the next step may run ahead of the host (decode only, input
    tokens still on the GPU); schedule() must then decide the same, even while the arrival average decays."""
    sch = _scheduler(max_waiting_steps=8, ratio=10.0, min_expected_arrivals=1.5)
    for i in range(4):
        sch.add(_seq(i))
    _decode_step(sch)
    for k in range(60):
        if k % 5 == 0:                                   # the average hovers around the threshold
            sch.add(_seq(100 + k))
        due = sch.admission_due()
        step = sch.schedule()
        admitted = any(n > 1 for n in step.num_tokens)
        assert admitted == due, f"step {k}: admission_due() said {due}"
        for seq, n in zip(step.seqs, step.num_tokens):
            seq.num_computed += n
            seq.output_ids.append(5)


def test_zero_steps_admits_at_once():
    sch = _scheduler(max_waiting_steps=0)
    for i in range(2):
        sch.add(_seq(i))
    _decode_step(sch)
    late = _seq(5)
    sch.add(late)
    assert late in _decode_step(sch)


@pytest.mark.parametrize("wait", [5])
def test_engine_that_defers_admission_matches_reference(tiny_checkpoint, wait):
    ckpt = load_checkpoint(tiny_checkpoint, progress=False)
    ref = ReferenceModel(ckpt.config, ckpt.dequantized(torch.float32))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, ckpt.config.vocab_size, (n,), generator=g).tolist() for n in (3, 40, 130, 9)]
    expected = [ref.generate_greedy(p, 24) for p in prompts]
    engine = Engine(EngineConfig(checkpoint=str(tiny_checkpoint), device="cpu", ops_backend="torch", max_num_seqs=8,
                                 max_model_len=512, num_kv_blocks=32, max_waiting_steps=wait,
                                 waiting_served_ratio=10.0))
    engine.scheduler.min_expected_arrivals = 0.0       # defer even these few arrivals: the point is correctness
    try:
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        first = engine.add_request("a", prompt_token_ids=prompts[0], params=params)
        it = iter(first)
        got0 = next(it).token_ids                       # "a" decodes: the others arrive while it runs
        streams = [engine.add_request(f"r{i}", prompt_token_ids=p, params=params) for i, p in enumerate(prompts[1:])]
        got0 += [t for out in it for t in out.token_ids]
        got = [got0] + [[t for out in s for t in out.token_ids] for s in streams]
        assert got == expected
        assert engine.scheduler.num_deferred_steps > 0      # the late ones did wait, and still decode exactly
    finally:
        engine.shutdown()
