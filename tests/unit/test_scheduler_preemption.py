"""Preemption: when the cache cannot grow a running sequence, the youngest running sequence gives its blocks back
and goes to the front of the queue; the older ones keep decoding in the same step."""

from __future__ import annotations

import torch

from dsv4.checkpoint.presets import PRESETS
from dsv4.engine.kv_cache import KVCache
from dsv4.engine.request import Sequence, Status
from dsv4.engine.scheduler import Scheduler


def _seq(i: int, prompt_len: int) -> Sequence:
    return Sequence(request_id=f"s{i}", prompt_ids=list(range(2, 2 + prompt_len)), params=None, stream=None,
                    detokenizer=None, stop=None, generator=None)


def _run(sch: Scheduler) -> tuple[list[Sequence], list[Sequence]]:
    """schedule() and pretend the model ran: every scheduled sequence computed its tokens and sampled one more."""
    step = sch.schedule()
    for seq, n in zip(step.seqs, step.num_tokens):
        seq.num_computed += n
        seq.output_ids.append(5)
    return step.seqs, step.preempted


def test_a_full_cache_preempts_the_youngest_and_the_others_decode_in_the_same_step():
    cache = KVCache(PRESETS["tiny"](None), num_blocks=3, block_size=128, max_seqs=4, device=torch.device("cpu"),
                    dtype=torch.float32)
    sch = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=512)
    # one block each; the first two need a second block for their next token, the third does not
    old, middle, young = _seq(0, 128), _seq(1, 128), _seq(2, 100)
    for s in (old, middle, young):
        sch.add(s)
    assert _run(sch) == ([old, middle, young], [])
    assert cache.window.num_free == cache.compressed.num_free == 0

    # `old` grows into the block `young` gives back; `middle` then preempts itself, the youngest left
    seqs, preempted = _run(sch)
    assert seqs == [old] and preempted == [young, middle]
    assert list(sch.waiting) == [middle, young] and sch.running == [old]
    assert middle.status is young.status is Status.WAITING and middle.num_computed == young.num_computed == 0
    assert sch.num_preemptions == 2
    assert middle.request_id not in cache and young.request_id not in cache
    assert cache.window.num_free == cache.compressed.num_free == 1
    cache.window.check_invariants()
    cache.compressed.check_invariants()
