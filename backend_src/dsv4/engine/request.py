"""A request's state inside the engine, and the deltas it streams out."""

from __future__ import annotations

import enum
import queue
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsv4.engine.detokenizer import IncrementalDetokenizer
from dsv4.engine.params import SamplingParams
from dsv4.engine.stop import StopChecker


# An output slot whose token the GPU has sampled but the host has not read yet (the engine runs one decode step
# ahead); the step after it takes the real id from the device.
PENDING_TOKEN = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """One delta of a request's stream."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None          # "stop" | "length" | "abort" | "error" | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


_END = object()


class RequestStream:
    """The consumer side of a request: iterate to receive `RequestOutput` deltas until one is `finished`."""

    def __init__(self, request_id: str, sink: Callable[[RequestOutput], None] | None = None):
        self.request_id = request_id
        self._q: queue.Queue[RequestOutput] = queue.Queue()
        self._sink = sink
        self.finished = False

    def put(self, out: RequestOutput) -> None:
        """Called by the engine thread. With a sink (a server forwarding many requests to one queue) the delta goes
        straight to it, sparing a consumer thread per request; the stream itself then stays empty."""
        if self._sink is not None:
            self._sink(out)
        else:
            self._q.put(out)

    def get(self, timeout: float | None = None) -> RequestOutput:
        """Next delta; raises queue.Empty after `timeout` seconds."""
        return self._q.get(timeout=timeout)

    def __iter__(self):
        while not self.finished:
            out = self._q.get()
            if out.finished:
                self.finished = True
            yield out


@dataclass(eq=False)   # identity: the scheduler's `seq in running` must not compare every field of every entry
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)   # the last `num_pending` are PENDING_TOKEN
    num_pending: int = 0
    num_computed: int = 0               # tokens whose state is in the cache
    status: Status = Status.WAITING
    num_preemptions: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated and read back (pending ones not counted)."""
        return len(self.output_ids) - self.num_pending

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed
