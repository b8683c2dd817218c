"""The tokenizer shipped with our random checkpoints: a small byte-level BPE trained on `corpus.txt`.

Byte level (GPT-2 style pre-tokenizer and decoder, all 256 byte symbols in the initial alphabet), so every UTF-8
string encodes and decodes back exactly. Ids 0 and 1 are DeepSeek's begin/end-of-sentence strings. Training is
deterministic: the same corpus and vocab size give a byte-identical `tokenizer.json` (tests check it).

The tokenizer adds no special tokens by itself (no post-processor): whoever builds a prompt prepends BOS, as
DeepSeek's `tokenizer_config.json` (`add_bos_token: true`) tells Hugging Face tokenizers to do.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4.errors import ConfigError

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)  # ids 0 and 1
DEFAULT_VOCAB_SIZE = 512


def corpus_text() -> str:
    """The training corpus that ships with the package (plain English prose about LLM serving)."""
    return resources.files("dsv4.checkpoint").joinpath("corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: str | None = None) -> Tokenizer:
    """Train the byte-level BPE; the result has exactly `vocab_size` ids (special tokens included)."""
    if corpus is None:
        return Tokenizer.from_str(_default_tokenizer_json(vocab_size))
    return Tokenizer.from_str(_train_json(vocab_size, corpus))


@functools.lru_cache(maxsize=8)
def _default_tokenizer_json(vocab_size: int) -> str:
    return _train_json(vocab_size, corpus_text())


def _train_json(vocab_size: int, corpus: str) -> str:
    min_size = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ConfigError(f"tokenizer vocab size must be an integer >= {min_size} (256 bytes + specials), "
                          f"got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ConfigError(f"the corpus yields only {got} tokens, fewer than the requested vocab size {vocab_size}; "
                          "use a smaller vocab or a larger corpus")
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok.to_str(pretty=True)


def tokenizer_json(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """The exact text of `tokenizer.json` for the default corpus (deterministic)."""
    return _default_tokenizer_json(vocab_size)


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict[str, Any]:
    """`tokenizer_config.json` in the shape DeepSeek's releases use (bos/eos strings, BOS added by the caller)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "legacy": True,
        "model_max_length": int(model_max_length),
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json` (a file, or a checkpoint directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on missing/corrupt files
        raise ConfigError(f"cannot load tokenizer from {p}: {e}") from None


def special_token_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(bos_id, eos_id) of a tokenizer that carries DeepSeek's special strings."""
    bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    if bos is None or eos is None:
        raise ConfigError(f"tokenizer lacks DeepSeek's special tokens {BOS_TOKEN!r} / {EOS_TOKEN!r}")
    return bos, eos


__all__ = ["BOS_TOKEN", "EOS_TOKEN", "DEFAULT_VOCAB_SIZE", "corpus_text", "train_tokenizer", "tokenizer_json",
           "tokenizer_config", "load_tokenizer", "special_token_ids"]
