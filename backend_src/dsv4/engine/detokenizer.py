"""Incremental (streaming) detokenization that never emits a partial UTF-8 character.

Technique (as in TGI / vLLM): keep two offsets into ``prompt_ids + output_ids``:
``prefix_offset`` .. ``read_offset`` is a window of already-emitted tokens used as left
context, ``read_offset`` .. end are tokens whose text has not been emitted.  Each step
decodes ``ids[prefix_offset:read_offset]`` and ``ids[prefix_offset:]`` and emits the
difference -- but only when the longer decode does not end with U+FFFD (which is what a
byte-level BPE decode produces for an incomplete UTF-8 sequence).  On emission the window
slides forward.  The left context keeps tokenizers whose decode depends on neighbours
(e.g. leading-space handling) correct; for byte-level BPE it is just a few bytes.

``flush()`` (at finish) emits whatever is still pending; an incomplete trailing sequence is
then rendered as U+FFFD -- exactly what ``tokenizer.decode(all_output_ids)`` returns.
Invariant: ``"".join(step outputs) + flush() == tokenizer.decode(output_ids)`` whenever the
prompt ends on a character boundary.

Note: a decode that *legitimately* ends with U+FFFD (invalid bytes or a literal U+FFFD token)
is held back until more text arrives or ``flush()``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# Number of already-emitted tokens decoded as left context.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        """tokenizer: a ``tokenizers.Tokenizer`` (or anything with
        ``decode(ids, skip_special_tokens=...) -> str``)."""
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or [])
        self._num_prompt = len(self._ids)
        self.read_offset = len(self._ids)
        self.prefix_offset = max(len(self._ids) - _CONTEXT_TOKENS, 0)
        if self.prefix_offset < self.read_offset and self._decode(self.prefix_offset, self.read_offset).endswith(
            _REPLACEMENT
        ):
            # The prompt ends mid-character (or with U+FFFD): use no left context rather than
            # let a completed character be mis-attributed.
            self.prefix_offset = self.read_offset
        self._text_parts: list[str] = []
        self._finished = False

    # ------------------------------------------------------------------ public
    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_prompt :]

    @property
    def text(self) -> str:
        """All output text emitted so far (by step() and flush())."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    def step(self, new_ids: Iterable[int] | int) -> str:
        """Append generated token id(s); return the newly decodable text ('' if none yet)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.step() called after flush()")
        if isinstance(new_ids, int):
            self._ids.append(new_ids)
        else:
            self._ids.extend(map(int, new_ids))
        if len(self._ids) == self.read_offset:
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset, len(self._ids))
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self._ids)
            self._text_parts.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """Emit everything still pending (incomplete trailing UTF-8 becomes U+FFFD). Idempotent."""
        if self._finished:
            return ""
        self._finished = True
        if len(self._ids) == self.read_offset:
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset, len(self._ids))
        delta = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        if delta:
            self._text_parts.append(delta)
        return delta

    # ------------------------------------------------------------------ internals
    def _decode(self, start: int, end: int) -> str:
        if end <= start:
            return ""
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)
