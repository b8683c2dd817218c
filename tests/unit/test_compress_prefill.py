"""The prefill compressor pools every sequence of a batch at once (ops/compress_plan.py) and must write exactly what
pooling each sequence on its own writes: the same cache entries in the same slots, the same carry afterwards.

Sequences start at every kind of position: a fresh one, one in the middle of a window (part of the window in the
carry), one at a window boundary, one whose chunk closes no window at all, and one that closes many.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.config import RopeConfig
from dsv4.ops.base import ForwardBatch
from dsv4.ops.compress_plan import compress_plan
from dsv4.ops.torch_ops import TorchOps

BLOCK = 128
D = 32            # compressed entry width
ROPE = 8
# (tokens already in the cache, new tokens) per sequence
SEQS = [(0, 9), (5, 6), (128, 130), (6, 1), (257, 300)]


def make_batch(seqs: list[tuple[int, int]], slots: list[int], tables: list[list[int]]) -> ForwardBatch:
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    positions = torch.cat([torch.arange(c, c + n) for c, n in seqs])
    return ForwardBatch(token_ids=torch.zeros(starts[-1], dtype=torch.long), positions=positions,
                        query_start=starts, context_lens=[c for c, _ in seqs], state_slots=slots,
                        swa_block_tables=tables, comp_block_tables=tables,
                        swa_slot_mapping=torch.zeros(starts[-1], dtype=torch.long),
                        logits_indices=torch.zeros(len(seqs), dtype=torch.long))


@pytest.mark.parametrize("ratio", [4, 128])
def test_batched_prefill_compression_equals_one_sequence_at_a_time(ratio):
    g = torch.Generator().manual_seed(ratio)
    coff = 2 if ratio == 4 else 1
    rows = coff * ratio
    ops = TorchOps("cpu", torch.float32)
    ops.reserve_positions(1024)
    slots = [3, 0, 5, 1, 2]                                       # state slots in no particular order
    tables = [[10 + 5 * b + j for j in range(5)] for b in range(len(SEQS))]
    T = sum(n for _, n in SEQS)
    kv = torch.randn(T, coff * D, generator=g)
    score = torch.randn(T, coff * D, generator=g)
    ape = torch.randn(ratio, coff * D, generator=g)
    norm = torch.rand(D, generator=g) + 0.5
    rope = RopeConfig(theta=160000.0)
    carry_kv0 = torch.randn(6, rows, coff * D, generator=g)       # what earlier chunks left behind
    carry_sc0 = torch.randn(6, rows, coff * D, generator=g)
    pool0 = torch.full((40, BLOCK // ratio, D), float("nan"))       # never-written slots stay NaN

    def run(which: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ck, cs, out = carry_kv0.clone(), carry_sc0.clone(), pool0.clone()
        starts = [0]
        for _, n in SEQS:
            starts.append(starts[-1] + n)
        sel = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in which])
        batch = make_batch([SEQS[b] for b in which], [slots[b] for b in which], [tables[b] for b in which])
        ops.compress_and_store(kv[sel], score[sel], ape, norm, 1e-6, ratio, rope, ROPE, ck, cs, out, BLOCK, batch)
        return ck, cs, out

    together = run(list(range(len(SEQS))))
    one_by_one = [carry_kv0.clone(), carry_sc0.clone(), pool0.clone()]
    for b in range(len(SEQS)):
        ck, cs, out = run([b])
        one_by_one[0][slots[b]], one_by_one[1][slots[b]] = ck[slots[b]], cs[slots[b]]
        written = ~out.isnan().all(-1)
        one_by_one[2][written] = out[written]
    for got, want, what in zip(together, one_by_one, ("carry kv", "carry score", "compressed entries")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=what)
    entries = (~together[2].isnan().all(-1)).sum().item()
    assert entries == sum((c + n) // ratio - c // ratio for c, n in SEQS)   # every closed window, nothing else


def plan_of(seqs: list[tuple[int, int]], ratio: int, carry_rows: int):
    tables = [[40 + 10 * b + j for j in range(10)] for b in range(len(seqs))]
    return compress_plan(make_batch(seqs, list(range(len(seqs))), tables), ratio, BLOCK, carry_rows)


def test_a_token_in_the_middle_of_a_window_only_joins_the_carry():
    # ratio 128, 100 rows of the open window already in the carry: no entry closes, and the one new row (source
    # row 0) is the only carry write, at window row 100 (the carry's rows 0..99 stay where they are)
    plan = plan_of([(100, 1)], 128, 128)
    assert plan.num_entries == 0
    assert plan.carry_dst.tolist() == [100] and plan.carry_src.tolist() == [0]
    assert plan.carry_gather.size == 0 and plan.new_rows.tolist() == [100]


def test_the_token_that_closes_an_overlapping_window_pools_it_with_its_predecessor():
    # ratio 4 (overlap): carry rows 0-3 = the previous window (positions 0-3), rows 4-6 = positions 4-6; the new
    # token (position 7) closes window 1. Source rows: 0 = the token, 1.. = the carry rows read, in carry order.
    plan = plan_of([(7, 1)], 4, 8)
    assert plan.cur_rows.tolist() == [[5, 6, 7, 0]] and plan.prev_rows.tolist() == [[1, 2, 3, 4]]
    assert plan.carry_gather.tolist() == list(range(7))
    assert plan.entry_pos.tolist() == [4] and plan.entry_index.tolist() == [1] and plan.entry_block.tolist() == [40]
    # window 1 becomes the previous window; the open window (window 2) has no rows yet
    assert sorted(zip(plan.carry_dst.tolist(), plan.carry_src.tolist())) == [(0, 5), (1, 6), (2, 7), (3, 0)]


# (sequences as (tokens in the cache, new tokens)) covering: windows closing, none closing (E = 0), chunks ending on
# a window boundary so that no carry row is written (R = 0 at ratio 128), carry row 0 read or not
PADDED_CASES = {
    "closing windows": [(0, 9), (5, 6), (128, 130), (6, 1)],
    "no window closes": [(129, 2), (1, 1)],
    "no carry write": [(0, 128), (128, 128)],
    "no carry write, carry read": [(0, 128), (64, 64)],    # ratio 128: carry row 0 (slot 0) not among those read
    "decode rows only": [(7, 1), (255, 1), (40, 1)],
}


@pytest.mark.parametrize("ratio", [4, 128])
@pytest.mark.parametrize("case", list(PADDED_CASES))
def test_a_padded_plan_writes_what_the_plan_writes_and_nothing_else(ratio, case):
    """engine.mixed_graphs runs the compressor on a bucket's padded token rows with a fixed-size plan: its padding
    entries and carry writes must leave every slot as the plain plan leaves it (slots hold earlier data: no NaN
    guard here, a padding write of anything but the slot's own value fails)."""
    from dsv4.ops.compress_plan import PlanBounds, padded_plan

    seqs = PADDED_CASES[case]
    g = torch.Generator().manual_seed(len(case) + ratio)
    coff = 2 if ratio == 4 else 1
    rows = coff * ratio
    ops = TorchOps("cpu", torch.float32)
    ops.reserve_positions(1024)
    slots = [0, 3, 1, 2][:len(seqs)]                       # state slot 0 (padding's write-back row) in use
    tables = [[0] + [10 + 5 * b + j for j in range(5)] if b == 0 else [10 + 5 * b + j for j in range(6)]
              for b in range(len(seqs))]                    # block 0 (padding's write-back slot) in use
    T = sum(n for _, n in seqs)
    S = T + 37
    kv, score = torch.randn(S, coff * D, generator=g), torch.randn(S, coff * D, generator=g)
    ape = torch.randn(ratio, coff * D, generator=g)
    norm = torch.rand(D, generator=g) + 0.5
    rope = RopeConfig(theta=160000.0)
    carry_kv0, carry_sc0 = torch.randn(4, rows, coff * D, generator=g), torch.randn(4, rows, coff * D, generator=g)
    pool0 = torch.randn(40, BLOCK // ratio, D, generator=g)
    batch = make_batch(seqs, slots, tables)
    plan = compress_plan(batch, ratio, BLOCK, rows)
    if case == "no window closes":
        assert plan.num_entries == 0
    if case.startswith("no carry write") and ratio == 128:
        assert plan.carry_dst.size == 0

    want = [carry_kv0.clone(), carry_sc0.clone(), pool0.clone()]
    ops.compress_and_store(kv[:T], score[:T], ape, norm, 1e-6, ratio, rope, ROPE, *want, BLOCK, batch)

    bounds = PlanBounds(tokens=S, seqs=4, ratio=ratio, carry_pool_rows=4 * rows)
    padded = padded_plan(plan, T, bounds)
    assert padded.num_entries == bounds.entries and padded.carry_dst.shape[0] == bounds.carry_writes
    batch.memo[("compress_plan", ratio, BLOCK, rows, kv.device)] = padded.on(kv.device)
    got = [carry_kv0.clone(), carry_sc0.clone(), pool0.clone()]
    ops.compress_and_store(kv, score, ape, norm, 1e-6, ratio, rope, ROPE, *got, BLOCK, batch)
    for a, b, what in zip(got, want, ("carry kv", "carry score", "compressed entries")):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)


def test_a_plan_beyond_its_bounds_is_refused():
    from dsv4.ops.compress_plan import PlanBounds, padded_plan

    plan = plan_of([(0, 300)], 4, 8)
    with pytest.raises(ValueError, match="exceeds its padded bounds"):
        padded_plan(plan, 300, PlanBounds(tokens=256, seqs=4, ratio=4, carry_pool_rows=32))
