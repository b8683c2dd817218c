"""The server's send order: a finished request's response goes out before any streaming delta, the others
round-robin by the arrival of their oldest unsent delta, and deltas that queue up for one request leave together."""

from __future__ import annotations

import pytest

from dsv4.engine.send_order import Backlog


def _backlog() -> Backlog[str, tuple[str, bool]]:
    return Backlog(is_final=lambda d: d[1])


def _drain(b: Backlog) -> list[tuple[str, list[str]]]:
    out = []
    while b:
        key, deltas = b.pop()
        out.append((key, [text for text, _ in deltas]))
    return out


def test_a_final_delta_jumps_ahead_of_every_streaming_delta():
    b = _backlog()
    for key in "abc":
        b.add(key, (f"{key}1", False))
    b.add("d", ("d-final", True))
    assert b.pop() == ("d", [("d-final", True)])
    assert [k for k, _ in _drain(b)] == ["a", "b", "c"]


def test_finals_leave_in_the_order_they_became_final():
    b = _backlog()
    b.add("a", ("a1", False))
    b.add("b", ("b1", False))
    b.add("b", ("b-end", True))
    b.add("a", ("a-end", True))
    assert _drain(b) == [("b", ["b1", "b-end"]), ("a", ["a1", "a-end"])]


def test_streams_take_turns_by_their_oldest_unsent_delta():
    b = _backlog()
    b.add("a", ("a1", False))
    b.add("b", ("b1", False))
    assert b.pop() == ("a", [("a1", False)])
    b.add("a", ("a2", False))          # after b1: a waits its turn behind b
    b.add("b", ("b2", False))          # joins b's entry, which keeps its place
    assert _drain(b) == [("b", ["b1", "b2"]), ("a", ["a2"])]


def test_deltas_of_one_request_stay_in_order_and_leave_as_one_response():
    b = _backlog()
    for i in range(5):
        b.add("a", (f"a{i}", i == 4))
    assert len(b) == 1
    assert _drain(b) == [("a", ["a0", "a1", "a2", "a3", "a4"])]


def test_an_empty_backlog_says_so():
    b = _backlog()
    assert not b and len(b) == 0
    with pytest.raises(KeyError, match="empty"):
        b.pop()
    b.add("a", ("a-end", True))
    b.pop()
    with pytest.raises(KeyError):
        b.pop()                        # the final's mark left with its entry
