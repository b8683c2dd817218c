"""Specification of the tokenizer shipped with random checkpoints (dsv4.checkpoint.tokenizer).

Byte-level BPE trained on the package's corpus: exactly the requested vocab size, DeepSeek's special strings at ids
0 and 1, every UTF-8 string round-trips, and the same corpus + vocab size give a byte-identical tokenizer.json.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.checkpoint.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    corpus_text,
    load_tokenizer,
    special_token_ids,
    tokenizer_json,
    train_tokenizer,
)
from dsv4.errors import ConfigError


def _random_text(rng: random.Random, n: int) -> str:
    pools = [
        (0x20, 0x7E),        # ASCII
        (0x00, 0x1F),        # control characters
        (0xA0, 0x24F),       # Latin-1 + Latin Extended (accents)
        (0x300, 0x36F),      # combining marks
        (0x400, 0x4FF),      # Cyrillic
        (0x4E00, 0x9FFF),    # CJK ideographs
        (0xAC00, 0xD7A3),    # Hangul
        (0x1F300, 0x1FAFF),  # emoji
        (0x10000, 0x10FFFF), # anything beyond the BMP
    ]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_vocab_has_exactly_the_requested_size_with_deepseek_specials_first():
    tok = train_tokenizer(512)
    assert tok.get_vocab_size(with_added_tokens=True) == 512
    assert tok.token_to_id(BOS_TOKEN) == 0 and tok.token_to_id(EOS_TOKEN) == 1
    assert special_token_ids(tok) == (0, 1)
    assert BOS_TOKEN == "<｜begin▁of▁sentence｜>" and EOS_TOKEN == "<｜end▁of▁sentence｜>"


def test_special_strings_encode_to_single_ids_and_nothing_is_added_implicitly():
    tok = train_tokenizer(512)
    assert tok.encode(BOS_TOKEN + "attention" + EOS_TOKEN).ids[0] == 0
    assert tok.encode(BOS_TOKEN + "attention" + EOS_TOKEN).ids[-1] == 1
    plain = tok.encode("attention").ids
    assert 0 not in plain and 1 not in plain


@pytest.mark.parametrize("seed", range(5))
def test_any_utf8_text_round_trips(seed):
    tok = train_tokenizer(512)
    rng = random.Random(seed)
    for _ in range(40):
        text = _random_text(rng, rng.randint(0, 60))
        ids = tok.encode(text).ids
        assert all(0 <= i < 512 for i in ids)
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_round_trips_named_samples_and_compresses_english():
    tok = train_tokenizer(512)
    for text in ["Hello, world!", "模型推理服务 🤖🚀 façade naïve", "  leading and trailing  ", "\n\t\r", "",
                 "👩‍👩‍👧‍👦 family emoji (ZWJ)", "e\u0301 combining", "x" * 1000]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    english = "The key-value cache stores the keys and values of earlier tokens."
    assert len(tok.encode(english).ids) < len(english.encode()) / 2   # merges were learned


def test_training_is_deterministic_in_process_and_across_processes():
    corpus = corpus_text()
    first = train_tokenizer(512, corpus).to_str(pretty=True)
    assert train_tokenizer(512, corpus).to_str(pretty=True) == first
    assert tokenizer_json(512) == first
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    code = "import sys; from dsv4.checkpoint.tokenizer import tokenizer_json; sys.stdout.write(tokenizer_json(512))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert other == first


def test_the_corpus_is_package_data_of_the_advertised_size():
    text = corpus_text()
    assert 20_000 <= len(text.encode()) <= 60_000
    assert any(c.isdigit() for c in text) and "," in text and "?" in text


def test_a_corpus_too_small_for_the_vocab_is_an_error():
    with pytest.raises(ConfigError, match="fewer than the requested vocab size"):
        train_tokenizer(4096, "tiny corpus")
    with pytest.raises(ConfigError):
        train_tokenizer(100)


def test_checkpoint_ships_the_same_tokenizer(tiny_checkpoint):
    tiny_checkpoint = Path(tiny_checkpoint)
    assert (tiny_checkpoint / "tokenizer.json").read_text() == tokenizer_json(512)
    tok = load_tokenizer(tiny_checkpoint)
    assert tok.get_vocab_size() == 512
    with pytest.raises(ConfigError):
        load_tokenizer(tiny_checkpoint / "nope")
