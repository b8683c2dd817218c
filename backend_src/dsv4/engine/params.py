"""Per-request sampling parameters (vLLM-compatible subset) and their validation.

Every invalid value raises :class:`dsv4.errors.InvalidRequestError` (a ``ValueError``) whose
message names the parameter and the allowed range/type.  Type rules are strict, like a JSON
schema: ``bool`` is not accepted where a number is expected, strings are never numbers,
floats are not accepted where an integer is expected, and NaN / +-inf are rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from dsv4.errors import InvalidRequestError

__all__ = ["SamplingParams", "SAMPLING_EPS", "check_fits_context"]

# Temperatures below this are treated as greedy (same threshold as vLLM).
SAMPLING_EPS = 1e-5

# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1

# Keys accepted by from_dict that are not dataclass fields: accepted only at neutral values.
_NEUTRAL_ONLY = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}


def _err(param: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"invalid '{param}': {msg}")


def _typename(v: Any) -> str:
    return type(v).__name__


def _check_number(param: str, v: Any, allowed: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(param, f"must be a number ({allowed}), got {_typename(v)} {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise _err(param, f"must be a finite number ({allowed}), got {v!r}")
    return f


def _check_int(param: str, v: Any, allowed: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(param, f"must be an integer ({allowed}), got {_typename(v)} {v!r}")
    return int(v)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy; >= 0
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1 => disabled; else >= 1
    max_tokens: int = 16  # >= 1; prompt_len + max_tokens <= max_model_len (engine)
    min_tokens: int = 0  # 0 <= min_tokens <= max_tokens
    stop: list[str] = field(default_factory=list)  # stop strings (excluded from output)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # per-request torch.Generator seed
    logprobs: int | None = None  # None => off; 0/1 => logprob of the chosen token

    def __post_init__(self) -> None:
        # Normalise: a single stop string is accepted; lists are copied (no aliasing).
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise InvalidRequestError naming the first invalid parameter."""
        t = _check_number("temperature", self.temperature, ">= 0")
        if t < 0:
            raise _err("temperature", f"must be >= 0, got {self.temperature!r}")

        p = _check_number("top_p", self.top_p, "0 < top_p <= 1")
        if not (0.0 < p <= 1.0):
            raise _err("top_p", f"must be in (0, 1], got {self.top_p!r}")

        k = _check_int("top_k", self.top_k, "-1 or 0 to disable, else >= 1")
        if k < -1:
            raise _err("top_k", f"must be -1 or 0 (disabled) or >= 1, got {self.top_k!r}")

        mt = _check_int("max_tokens", self.max_tokens, ">= 1")
        if mt < 1:
            raise _err("max_tokens", f"must be >= 1, got {self.max_tokens!r}")

        mn = _check_int("min_tokens", self.min_tokens, "0 <= min_tokens <= max_tokens")
        if mn < 0:
            raise _err("min_tokens", f"must be >= 0, got {self.min_tokens!r}")
        if mn > mt:
            raise _err("min_tokens", f"must be <= max_tokens ({mt}), got {self.min_tokens!r}")

        if not isinstance(self.stop, list):
            raise _err("stop", f"must be a string or a list of strings, got {_typename(self.stop)}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str):
                raise _err("stop", f"element {i} must be a string, got {_typename(s)} {s!r}")
            if s == "":
                raise _err("stop", f"element {i} must be a non-empty string")

        if not isinstance(self.stop_token_ids, list):
            raise _err(
                "stop_token_ids",
                f"must be a list of integers >= 0, got {_typename(self.stop_token_ids)}",
            )
        for i, tid in enumerate(self.stop_token_ids):
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise _err("stop_token_ids", f"element {i} must be an integer >= 0, got {tid!r}")

        if not isinstance(self.ignore_eos, bool):
            raise _err("ignore_eos", f"must be a boolean, got {_typename(self.ignore_eos)} {self.ignore_eos!r}")

        if self.seed is not None:
            s = _check_int("seed", self.seed, f"null or an integer in [{_SEED_MIN}, {_SEED_MAX}]")
            if not (_SEED_MIN <= s <= _SEED_MAX):
                raise _err("seed", f"must be in [{_SEED_MIN}, {_SEED_MAX}], got {self.seed!r}")

        if self.logprobs is not None:
            lp = _check_int("logprobs", self.logprobs, "null, 0 or 1")
            if lp not in (0, 1):
                raise _err(
                    "logprobs",
                    f"must be null, 0 or 1 (only the chosen token's logprob is supported; "
                    f"top-N alternatives are not supported), got {self.logprobs!r}",
                )

    # ------------------------------------------------------------------ helpers
    @property
    def is_greedy(self) -> bool:
        """Greedy argmax: temperature ~ 0 or top_k == 1."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def check_fits_context(self, prompt_len: int, max_model_len: int) -> None:
        """Raise InvalidRequestError unless prompt_len + max_tokens <= max_model_len."""
        check_fits_context(prompt_len, max_model_len, self.max_tokens)

    @classmethod
    def allowed_keys(cls) -> list[str]:
        return sorted(set(cls.__dataclass_fields__) | set(_NEUTRAL_ONLY))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SamplingParams":
        """Build from a vLLM/OpenAI-style dict.

        * ``None`` values mean "use the default" (JSON clients often send ``null``), except for
          ``seed`` / ``logprobs`` where ``None`` is the default anyway.
        * ``stop`` may be a string or a list of strings.
        * ``n`` is accepted only as 1; ``presence_penalty``/``frequency_penalty`` only as 0 and
          ``repetition_penalty`` only as 1 (anything else: "not supported").
        * Any other key is an error naming the key and listing the allowed keys.
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise InvalidRequestError(f"sampling parameters must be an object/dict, got {_typename(d)}")
        fields = cls.__dataclass_fields__
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if not isinstance(key, str):
                raise InvalidRequestError(f"sampling parameter names must be strings, got {key!r}")
            if key in _NEUTRAL_ONLY:
                if value is None:
                    continue
                neutral = _NEUTRAL_ONLY[key]
                if key == "n":
                    n = _check_int("n", value, "only n=1 is supported")
                    if n != 1:
                        raise _err("n", f"only n=1 is supported (got {value!r}); parallel sampling is not supported")
                else:
                    f = _check_number(key, value, f"only {neutral:g} is supported")
                    if f != neutral:
                        raise _err(key, f"{key} is not supported: only the neutral value {neutral:g} is accepted, got {value!r}")
                continue
            if key not in fields:
                raise InvalidRequestError(
                    f"unknown sampling parameter '{key}'; allowed keys: {', '.join(cls.allowed_keys())}"
                )
            if value is None:
                continue  # default
            if key == "stop" and not isinstance(value, (str, list, tuple)):
                raise _err("stop", f"must be a string or a list of strings, got {_typename(value)}")
            if key == "stop_token_ids" and not isinstance(value, (list, tuple)):
                raise _err("stop_token_ids", f"must be a list of integers >= 0, got {_typename(value)}")
            kwargs[key] = value
        return cls(**kwargs)  # __post_init__ validates


def check_fits_context(prompt_len: int, max_model_len: int, max_tokens: int) -> None:
    """Raise InvalidRequestError unless a prompt of ``prompt_len`` tokens plus ``max_tokens``
    generated tokens fits into ``max_model_len``.  The message names the prompt length or
    ``max_tokens`` (whichever is at fault) and the allowed maximum."""
    if prompt_len < 1:
        raise InvalidRequestError("invalid prompt: the prompt must contain at least 1 token")
    if prompt_len >= max_model_len:
        raise InvalidRequestError(
            f"invalid prompt: prompt length {prompt_len} tokens leaves no room to generate "
            f"(max_model_len is {max_model_len}, so the prompt must be <= {max_model_len - 1} tokens)"
        )
    if prompt_len + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"invalid 'max_tokens': {max_tokens} is too large: prompt length {prompt_len} + max_tokens "
            f"exceeds max_model_len {max_model_len}; max_tokens must be <= {max_model_len - prompt_len}"
        )
