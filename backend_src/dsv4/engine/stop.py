"""Per-request stop conditions and stop-string-safe streaming of the output text.

One ``StopChecker`` per request.  After each sampled token the engine calls
``update(token_id, detokenizer)``; it returns a ``StopUpdate`` with the text that is safe to
stream now and whether the request finished.  Semantics (vLLM defaults):

* ``min_tokens``: the first ``min_tokens`` output tokens can never finish the request: EOS
  and ``stop_token_ids`` are ignored for them (and should be suppressed in the sampler via
  ``suppressed_token_ids()``), and a stop string only counts if it *ends* in the text of a
  later token.
* EOS (any of ``eos_token_ids``, unless ``ignore_eos``) and ``stop_token_ids`` finish with
  reason ``"stop"``.  The stop token is counted in ``num_output_tokens`` (and belongs in the
  returned token ids) but its text is not added to the output.  ``stop_reason`` is the token
  id for ``stop_token_ids`` and ``None`` for EOS.
* Stop strings are matched on the detokenized output text, across token boundaries.  The
  output is truncated *before* the stop string (not included).  With several stop strings the
  one completed first (smallest end position; then longest) wins.  ``stop_reason`` is the string.
* While the tail of the text could still be the beginning of a stop string it is held back, so
  the concatenation of streamed deltas is always a prefix of the final output and never
  contains a partial (or complete) stop string.
* ``max_tokens``: when ``num_output_tokens`` reaches it the request finishes with ``"length"``
  (unless the same token also completed a stop condition -> ``"stop"``).
* On a non-stop-string finish all held-back text plus ``detokenizer.flush()`` is released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from dsv4.engine.params import SamplingParams

__all__ = ["StopChecker", "StopUpdate"]


@dataclass
class StopUpdate:
    text: str  # newly releasable text (may be "")
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None
    stop_reason: int | str | None = None  # stop token id, stop string, or None (EOS / length)


class StopChecker:
    def __init__(self, params: SamplingParams, eos_token_ids: int | Iterable[int] | None = None) -> None:
        self.params = params
        if eos_token_ids is None:
            eos: frozenset[int] = frozenset()
        elif isinstance(eos_token_ids, int):
            eos = frozenset([eos_token_ids])
        else:
            eos = frozenset(int(t) for t in eos_token_ids)
        self.eos_token_ids = eos
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stops = list(dict.fromkeys(params.stop))  # dedupe, keep order
        self._max_stop_len = max((len(s) for s in self._stops), default=0)

        self.num_output_tokens = 0
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

        self._text = ""  # detokenized output text (truncated at a stop string)
        self._emitted = 0  # chars of _text already released
        self._checked = 0  # stop strings ending at or before this index were already searched
        self._active_from = 0 if params.min_tokens == 0 else None  # matches must end after this

    # ------------------------------------------------------------------ queries
    @property
    def output_text(self) -> str:
        """Text released so far (concatenation of all StopUpdate.text)."""
        return self._text[: self._emitted]

    def suppressed_token_ids(self, pending: int = 0) -> list[int]:
        """Token ids the sampler must not produce for the *next* token (min_tokens not reached); `pending`: tokens
        already sampled but not yet passed to update() (the engine runs a step ahead)."""
        if self.num_output_tokens + pending >= self.params.min_tokens:
            return []
        ids = set(self._stop_ids)
        if not self.params.ignore_eos:
            ids |= self.eos_token_ids
        return sorted(ids)

    # ------------------------------------------------------------------ update
    def update(self, token_id: int, detokenizer: Any) -> StopUpdate:
        """Account for one newly sampled token.  ``detokenizer`` has ``step([id]) -> str`` and
        ``flush() -> str`` (an IncrementalDetokenizer)."""
        if self.finished:
            raise RuntimeError("StopChecker.update() called after the request finished")
        self.num_output_tokens += 1
        n = self.num_output_tokens
        p = self.params
        past_min = n > p.min_tokens

        # 1) Token-level stops: the stop token's text is not added.
        if past_min:
            if token_id in self._stop_ids:
                return self._finish("stop", token_id, self._release_all(detokenizer.flush()))
            if not p.ignore_eos and token_id in self.eos_token_ids:
                return self._finish("stop", None, self._release_all(detokenizer.flush()))

        # 2) Text + stop strings.
        new_text = detokenizer.step([token_id])
        if past_min and self._active_from is None:
            # First token that may end a stop string: matches must end in its text or later.
            self._active_from = len(self._text)
            self._checked = len(self._text)
        text, hit = self._append_text(new_text)
        if hit is not None:
            return self._finish("stop", hit, text)

        # 3) Length.
        if n >= p.max_tokens:
            return self._finish("length", None, text + self._release_all(detokenizer.flush()))
        return StopUpdate(text, False, None)

    # ------------------------------------------------------------------ text handling
    def _append_text(self, new_text: str) -> tuple[str, str | None]:
        """Append detokenized text; return (releasable delta, matched stop string or None)."""
        if new_text:
            self._text += new_text
        if not self._stops:
            return self._release(len(self._text)), None

        if self._active_from is not None and len(self._text) > self._checked:
            best: tuple[int, int, str] | None = None  # (end, -len, stop)
            floor = max(self._checked, self._active_from)
            for s in self._stops:
                start = self._text.find(s, max(floor - len(s) + 1, 0))
                if start >= 0:
                    key = (start + len(s), -len(s), s)
                    if best is None or key < best:
                        best = key
            self._checked = len(self._text)
            if best is not None:
                end, neg_len, s = best
                cut = end + neg_len  # start of the stop string
                self._text = self._text[:cut]
                return self._release(cut), s

        # Hold back the longest suffix that is a proper prefix of some stop string.
        return self._release(len(self._text) - self._held_len()), None

    def _held_len(self) -> int:
        text = self._text
        tail_start = max(self._emitted, len(text) - self._max_stop_len + 1)
        tail = text[tail_start:]
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self._text[self._emitted : upto]
        self._emitted = upto
        return delta

    def _release_all(self, tail: str = "") -> str:
        """Final flush on a non-stop-string finish: release held text plus ``tail``
        (still checked for stop strings, e.g. a tail containing U+FFFD)."""
        delta, hit = self._append_text(tail)
        if hit is not None:
            self.stop_reason = hit
            return delta
        return delta + self._release(len(self._text))

    def _finish(self, reason: str, stop_reason: int | str | None, text: str) -> StopUpdate:
        self.finished = True
        self.finish_reason = reason
        # _release_all may have set stop_reason if the flushed tail completed a stop string.
        if self.stop_reason is None:
            self.stop_reason = stop_reason
        if isinstance(self.stop_reason, str):
            self.finish_reason = "stop"
        return StopUpdate(text, True, self.finish_reason, self.stop_reason)

    def release_pending(self) -> str:
        """Release any held-back text without finishing checks (e.g. on abort). Does not flush
        the detokenizer."""
        return self._release(len(self._text))
