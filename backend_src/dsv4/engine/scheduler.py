"""Continuous batching: which sequences run in the next step, and how many of their tokens.

One token budget per step (`max_num_batched_tokens`) is shared by decodes and prefill chunks, running sequences
first (oldest first), then waiting ones in arrival order (vLLM V1 style: a prefill is just a sequence with many
uncomputed tokens, so chunked prefill falls out). When the cache cannot grow, the youngest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed later (its generated
tokens are kept and become part of what it recomputes), so no request is lost or duplicated.

Admission can be deferred while others decode (TGI's `max_waiting_tokens` / `waiting_served_ratio`): a step with
prompt tokens cannot be a replayed CUDA graph, and on the GPU such an eager step costs several decode steps however
few prompts it carries, so letting waiting requests gather for up to `max_waiting_steps` decode steps (or until
they are `waiting_served_ratio` of the running ones) runs their prefills together. With nothing running, or
`max_waiting_steps` 0, a request is admitted at once; also when requests arrive too rarely for waiting to gather
any company (fewer than `min_expected_arrivals` expected during the wait, from a moving average of arrivals per
step), since then waiting would only add to the time to first token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsv4.engine.kv_cache import KVCache
from dsv4.engine.request import Sequence, Status


@dataclass
class ScheduledStep:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)   # tokens computed this step, per sequence
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, cache: KVCache, max_num_seqs: int, max_num_batched_tokens: int, max_waiting_steps: int = 0,
                 waiting_served_ratio: float = 0.25, min_expected_arrivals: float = 1.5):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting_steps = max_waiting_steps
        self.waiting_served_ratio = waiting_served_ratio
        self.min_expected_arrivals = min_expected_arrivals
        self.arrivals_per_step = 0.0             # moving average (weight 0.1 per step)
        self._arrived = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_deferred_steps = 0              # steps that left waiting requests out to gather more
        self._steps = 0
        self._queued_at: dict[Sequence, int] = {}  # step count when a waiting sequence (re)joined the queue

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._queued_at[seq] = self._steps
        self._arrived += 1

    def admission_due(self) -> bool:
        """Whether the next schedule() may admit waiting requests (see the module docstring)."""
        if not self.waiting:
            return False
        if not self.running or self.max_waiting_steps <= 0:
            return True
        if self.arrivals_per_step * self.max_waiting_steps < self.min_expected_arrivals:
            return True
        if len(self.waiting) >= self.waiting_served_ratio * len(self.running):
            return True
        return self._steps - self._queued_at.get(self.waiting[0], self._steps) >= self.max_waiting_steps

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (finished or aborted) and free its cache."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._queued_at.pop(seq, None)
        if seq.request_id in self.cache:
            self.cache.free(seq.request_id)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.running.remove(seq)
        self.cache.free(seq.request_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self._queued_at[seq] = self._steps - self.max_waiting_steps     # due at once: it was running
        step.preempted.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        # decided on the state admission_due() saw before this call (the engine asks it to know whether the step
        # can run ahead of the host: a decision that changed in between would hand a prefill the pending tokens)
        admit = self.admission_due()
        self.arrivals_per_step = 0.9 * self.arrivals_per_step + 0.1 * self._arrived
        self._arrived = 0
        if self.waiting and not admit:
            self.num_deferred_steps += 1
        self._steps += 1
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            # preempted below to make room for an older one (this step's preemptions are few: scanning `running`
            # instead made the step O(batch^2))
            if seq in step.preempted:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.cache.try_grow(seq.request_id, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is seq:
                    break
            else:                                # it grew (it was not preempted itself)
                step.seqs.append(seq)
                step.num_tokens.append(n)
                budget -= n
        admitted: list[int] = []
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not step.preempted:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.cache.can_grow(None, n):
                break
            self.waiting.popleft()
            self._queued_at.pop(seq, None)
            admitted.append(self.cache.add(seq.request_id, clear_state=False))
            self.cache.grow(seq.request_id, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.seqs.append(seq)
            step.num_tokens.append(n)
            budget -= n
        self.cache.clear_state(admitted)       # one launch per state tensor for all of them
        return step
