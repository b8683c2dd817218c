"""BlockManager: paged KV block accounting, slot mapping, ref-counted sharing, errors."""

import random

import pytest

from dsv4.engine.block_manager import BlockManager
from dsv4.errors import DSV4Error, OutOfBlocksError, UnknownSequenceError


def test_allocate_rounds_up_and_slot_mapping():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert (bm.num_free, bm.num_used, bm.usage) == (10, 0, 0.0)
    table = bm.allocate("a", 6)  # 2 blocks
    assert len(table) == 2 and bm.block_table("a") == table
    assert (bm.num_free, bm.num_used) == (8, 2) and bm.usage == pytest.approx(0.2)
    b0, b1 = table
    assert bm.slot_mapping("a", 0, 6) == [b0 * 4 + 0, b0 * 4 + 1, b0 * 4 + 2, b0 * 4 + 3, b1 * 4 + 0, b1 * 4 + 1]
    assert bm.slot_mapping("a", 5, 6) == [b1 * 4 + 1]
    assert bm.slot_mapping("a", 3, 3) == []
    with pytest.raises(ValueError):
        bm.slot_mapping("a", 0, 7)  # beyond the allocated length
    assert bm.num_tokens("a") == 6 and "a" in bm


def test_append_slots_grows_only_at_block_boundaries():
    bm = BlockManager(8, 4)
    bm.allocate(1, 3)
    assert bm.can_append(1, 4)
    assert bm.append_slots(1, 4) == [] and bm.num_used == 1  # fills block 0
    bm.append_slots(1, 5)
    assert bm.num_used == 2 and len(bm.block_table(1)) == 2
    bm.append_slots(1, 5)  # no-op
    assert bm.num_used == 2
    bm.append_slots(1, 13)  # several blocks at once (e.g. chunked prefill)
    assert len(bm.block_table(1)) == 4
    assert bm.slot_mapping(1, 12, 13) == [bm.block_table(1)[3] * 4]
    with pytest.raises(ValueError):
        bm.append_slots(1, 12)  # shrinking is not allowed


def test_zero_token_sequence():
    bm = BlockManager(2, 4)
    assert bm.allocate("z", 0) == []
    bm.append_slots("z", 1)
    assert bm.num_used == 1
    bm.free("z")
    assert bm.num_free == 2


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(3, 2)
    bm.allocate("a", 4)
    assert not bm.can_allocate(3) and bm.can_allocate(2)
    with pytest.raises(OutOfBlocksError):
        bm.allocate("b", 3)
    assert "b" not in bm and bm.num_free == 1
    bm.allocate("b", 1)
    assert not bm.can_append("b", 3)
    with pytest.raises(OutOfBlocksError):
        bm.append_slots("b", 3)
    assert bm.num_tokens("b") == 1 and bm.num_free == 0
    bm.check_invariants()
    assert isinstance(OutOfBlocksError("x"), DSV4Error)


def test_double_free_and_unknown_sequence():
    bm = BlockManager(4, 2)
    bm.allocate("a", 3)
    bm.free("a")
    with pytest.raises(UnknownSequenceError):
        bm.free("a")
    for call in (lambda: bm.block_table("nope"), lambda: bm.append_slots("nope", 1),
                 lambda: bm.slot_mapping("nope", 0, 0), lambda: bm.can_append("nope", 1)):
        with pytest.raises(UnknownSequenceError):
            call()
    bm.allocate("a", 1)
    with pytest.raises(ValueError):
        bm.allocate("a", 1)  # duplicate id
    assert bm.num_used == 1


def test_bad_constructor_args():
    for args in ((-1, 4), (4, 0), (4, True), (2.0, 4)):
        with pytest.raises(ValueError):
            BlockManager(*args)


def test_fork_shares_blocks_and_copy_on_write():
    bm = BlockManager(10, 4)
    bm.allocate("p", 6)  # blocks [x, y], y half full
    parent = bm.block_table("p")
    assert bm.fork("p", "c") == parent
    assert bm.num_used == 2  # shared, not copied
    # child grows into the shared, partially filled last block -> private copy
    assert bm.can_append("c", 7)
    copies = bm.append_slots("c", 7)
    child = bm.block_table("c")
    assert copies == [(parent[1], child[1])] and child[0] == parent[0] and child[1] != parent[1]
    assert bm.num_used == 3
    # parent's last block is now exclusively its own: no copy needed
    assert bm.append_slots("p", 8) == []
    bm.free("p")
    assert bm.num_used == 2  # first block still held by the child
    bm.free("c")
    assert bm.num_free == 10
    bm.check_invariants()


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(10, 4)
    bm.allocate("p", 8)
    bm.fork("p", "c")
    assert bm.append_slots("c", 9) == []
    assert bm.num_used == 3


def test_random_operations_return_to_all_free():
    rng = random.Random(7)
    for trial in range(20):
        nb, bs = rng.randint(1, 64), rng.choice([1, 2, 4, 16])
        bm = BlockManager(nb, bs)
        live: list[int] = []
        next_id = 0
        for _ in range(400):
            op = rng.random()
            if op < 0.35:
                n = rng.randint(0, 3 * bs + 1)
                if bm.can_allocate(n):
                    bm.allocate(next_id, n)
                    live.append(next_id)
                else:
                    with pytest.raises(OutOfBlocksError):
                        bm.allocate(next_id, n)
                next_id += 1
            elif op < 0.7 and live:
                sid = rng.choice(live)
                new_len = bm.num_tokens(sid) + rng.randint(0, 2 * bs)
                if bm.can_append(sid, new_len):
                    bm.append_slots(sid, new_len)
                else:
                    with pytest.raises(OutOfBlocksError):
                        bm.append_slots(sid, new_len)
            elif op < 0.8 and live:
                child = next_id
                next_id += 1
                bm.fork(rng.choice(live), child)
                live.append(child)
            elif live:
                sid = live.pop(rng.randrange(len(live)))
                bm.free(sid)
            bm.check_invariants()
            # slots of live sequences never collide unless their blocks are shared
            owners = {}
            for sid in live:
                for b in bm.block_table(sid):
                    owners.setdefault(b, []).append(sid)
            assert bm.num_used == len(owners)
        for sid in live:
            bm.free(sid)
        assert bm.num_free == nb and bm.num_used == 0 and bm.usage == 0.0
        bm.check_invariants()


def test_a_sliding_window_releases_each_block_once_as_it_falls_behind():
    bm = BlockManager(16, 4)
    bm.allocate("s", 10)                              # blocks of positions 0-3, 4-7, 8-9
    assert bm.release_blocks_before("s", 3) == 0      # the first block still holds position 3
    assert bm.release_blocks_before("s", 4) == 1
    assert bm.release_blocks_before("s", 7) == 0      # nothing more fell behind
    assert bm.release_blocks_before("s", 2) == 0      # an earlier position releases nothing again
    bm.append_slots("s", 20)
    assert bm.release_blocks_before("s", 17) == 3     # positions 4-7, 8-11, 12-15
    table = bm.block_table("s")
    assert table[:4] == [-1] * 4 and min(table[4:]) >= 0
    assert bm.num_used == 1 and bm.num_tokens("s") == 20   # positions 16-19
    bm.check_invariants()


def test_release_after_growth_forks_and_earlier_releases_is_what_a_full_rescan_releases():
    rng = random.Random(11)
    for trial in range(30):
        bs = rng.choice([1, 2, 4])
        bm = BlockManager(64, bs)
        live: list[int] = []
        for _ in range(300):
            op = rng.random()
            unused = [i for i in range(12) if i not in live]      # freed ids come back
            if op < 0.2 and unused and bm.can_allocate(8 * bs):
                new_id = rng.choice(unused)
                bm.allocate(new_id, rng.randint(0, 8 * bs))
                live.append(new_id)
            elif op < 0.45 and live:
                sid = rng.choice(live)
                new_len = bm.num_tokens(sid) + rng.randint(0, 2 * bs)
                if bm.can_append(sid, new_len):
                    bm.append_slots(sid, new_len)
            elif op < 0.55 and live and unused:
                new_id = rng.choice(unused)
                bm.fork(rng.choice(live), new_id)
                live.append(new_id)
            elif op < 0.9 and live:
                sid = rng.choice(live)
                position = rng.randint(0, bm.num_tokens(sid))   # up to the length, as a sliding window does
                before = bm.block_table(sid)
                behind = min(position // bs, len(before))
                assert bm.release_blocks_before(sid, position) == sum(b >= 0 for b in before[:behind])
                assert bm.block_table(sid) == [-1] * behind + before[behind:]
            elif live:
                bm.free(live.pop(rng.randrange(len(live))))
            bm.check_invariants()


def test_flat_block_tables_are_the_tables_end_to_end_with_their_lengths():
    bm = BlockManager(16, 4)
    bm.allocate("a", 9)
    bm.allocate("b", 1)
    bm.allocate("c", 0)
    bm.release_blocks_before("a", 4)
    lens, flat = bm.flat_block_tables(["b", "a", "c"])
    assert lens == [1, 3, 0]
    assert flat == bm.block_table("b") + bm.block_table("a") and flat[1] == -1
    with pytest.raises(UnknownSequenceError):
        bm.flat_block_tables(["a", "gone"])
