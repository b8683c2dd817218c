"""Which request's streamed deltas a server sends next, when sending is what limits it.

Triton's Python backend answers every response with one synchronous IPC round trip from one thread (0.15-0.4 ms on
the H100 hosts, docs/PERF.md). At concurrency 32 a pass over every request with new tokens is ~32 sends, ~10 ms,
while the engine runs four or five steps. A request's final delta that arrived during such a pass used to wait for
the pass to end; in a closed loop the client's next request waits on that final response, so the batch ran one
request short for those steps, every time a request finished. (Measured against the old order at c = 32 on the
H100: no difference beyond the run-to-run spread, docs/PERF.md session 23; the order stays because no response
now waits behind more than one send.)

`Backlog` keeps the deltas not sent yet, per request, and hands out one request at a time:
* a request whose newest delta is final, first (its response frees a client), oldest such first;
* then the others, in the order their oldest unsent delta arrived: round-robin, so no stream starves;
* deltas that arrive for a request already waiting join its entry and go out in the same response, so a saturated
  sender sends fewer, larger responses instead of falling further behind.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Backlog(Generic[K, V]):
    """Unsent deltas per request key, in arrival order; `pop()` picks the request to answer next."""

    def __init__(self, is_final: Callable[[V], bool]):
        self._is_final = is_final
        self._entries: dict[K, list[V]] = {}     # insertion order = arrival of each key's oldest unsent delta
        self._finals: dict[K, None] = {}         # keys whose newest delta is final, in the order they became so

    def add(self, key: K, delta: V) -> None:
        self._entries.setdefault(key, []).append(delta)
        if self._is_final(delta):
            self._finals[key] = None

    def pop(self) -> tuple[K, list[V]]:
        """The next request to answer and all of its unsent deltas, oldest first. Raises KeyError when empty."""
        if self._finals:
            key = next(iter(self._finals))
            del self._finals[key]
        elif self._entries:
            key = next(iter(self._entries))
        else:
            raise KeyError("the backlog is empty")
        return key, self._entries.pop(key)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)
