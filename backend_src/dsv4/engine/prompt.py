"""A request's prompt as token ids, checked against the vocabulary and the context length.

Shared by the in-process engine and the engine process's front end (`dsv4.engine.process`), which tokenises in the
serving process so that a bad prompt is refused synchronously and the engine process spends no time on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from dsv4.config import ModelConfig
from dsv4.engine.params import SamplingParams, check_fits_context
from dsv4.errors import ConfigError, InvalidRequestError


@dataclass(frozen=True)
class PromptProcessor:
    tokenizer: Tokenizer
    vocab_size: int
    bos_token_id: int | None
    max_model_len: int

    @classmethod
    def for_checkpoint(cls, checkpoint: str | Path, max_model_len: int) -> "PromptProcessor":
        """From the checkpoint's config.json and tokenizer.json alone (no weights are read)."""
        path = Path(checkpoint)
        cfg = ModelConfig.from_file(path / "config.json")
        tok = path / "tokenizer.json"
        if not tok.is_file():
            raise ConfigError(f"checkpoint {path} has no tokenizer.json")
        return cls(Tokenizer.from_file(str(tok)), cfg.vocab_size, cfg.bos_token_id, max_model_len)

    def token_ids(self, prompt: str | None, prompt_token_ids: list[int] | None,
                  params: SamplingParams) -> list[int]:
        """The ids the model sees (a text prompt gets the BOS token in front); InvalidRequestError says why not."""
        if (prompt is None) == (prompt_token_ids is None):
            raise InvalidRequestError("give exactly one of 'prompt' (text) and 'prompt_token_ids'")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidRequestError(f"'prompt' must be a string, got {type(prompt).__name__}")
            if prompt == "":
                raise InvalidRequestError("invalid prompt: the prompt is empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            if self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
        else:
            ids = list(prompt_token_ids)
            vocab = self.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"'input_ids' has {len(bad)} id(s) outside [0, {vocab}), e.g. {bad[0]!r}")
        check_fits_context(len(ids), self.max_model_len, params.max_tokens)
        return ids
