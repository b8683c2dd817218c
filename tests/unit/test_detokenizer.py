"""IncrementalDetokenizer: streamed text is UTF-8 safe and round-trips exactly.

A tiny byte-level BPE tokenizer is trained in-process (ByteLevel pre-tokenizer + decoder,
initial alphabet = all 256 byte symbols), so any UTF-8 string encodes; characters that the
training text does not cover are split into single-byte tokens, i.e. multi-byte characters
straddle token boundaries.
"""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4.engine.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"


def _bytes_to_unicode():
    """GPT-2 byte -> printable symbol table used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>", "<pad>"],
        show_progress=False,
    )
    corpus = [
        "hello world, the quick brown fox jumps over the lazy dog",
        "日本語のテキストです。中文文本。",
        "emoji 😀😃 and café naïve résumé",
        "def f(x):\n    return x * 2\n",
    ] * 3
    t.train_from_iterator(corpus, trainer=trainer)
    return t


@pytest.fixture(scope="module")
def byte_ids(tok):
    table = _bytes_to_unicode()
    return {b: tok.token_to_id(table[b]) for b in range(256)}


POOLS = [
    "abcdefghijklmnopqrstuvwxyz     ,.!?\n\t0123456789",
    "éèêëàâîïôöûüçñßøå",
    "日本語中文字漢字テキストひらがなカタカナ한국어",
    "😀😃😄🎉🚀👍🏽🇯🇵👨‍👩‍👧𝕏𝔸🀄",
    "e\u0301a\u0308o\u0302n\u0303\u0327\u20dd",  # combining marks
    "Ωπσж漢€£¥\u200b\u00a0",
]


def random_text(rng: random.Random) -> str:
    n = rng.randint(1, 40)
    return "".join(rng.choice(rng.choice(POOLS)) for _ in range(n))


def stream(tok, ids, prompt_ids=(), rng=None):
    det = IncrementalDetokenizer(tok, list(prompt_ids))
    pieces, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 3) if rng else 1
        pieces.append(det.step(ids[i : i + k]))
        i += k
    tail = det.flush()
    return det, pieces, tail


def test_round_trip_random_utf8(tok):
    rng = random.Random(1234)
    for _ in range(300):
        s = random_text(rng)
        ids = tok.encode(s).ids
        assert tok.decode(ids) == s  # byte-level BPE is lossless
        prompt = tok.encode(random_text(rng)).ids if rng.random() < 0.5 else []
        det, pieces, tail = stream(tok, ids, prompt, rng)
        assert "".join(pieces) + tail == tok.decode(ids) == s
        assert det.text == s
        for p in pieces:
            assert FFFD not in p, (s, pieces)
        assert tail == ""  # nothing incomplete left over for valid text


def test_multibyte_char_split_into_byte_tokens_is_held_back(tok, byte_ids):
    s = "a😀b"
    raw = s.encode("utf-8")
    ids = [byte_ids[b] for b in raw]  # one token per byte: the emoji spans 4 tokens
    det = IncrementalDetokenizer(tok, [])
    outs = [det.step([t]) for t in ids]
    assert outs == ["a", "", "", "", "😀", "b"]
    assert det.flush() == ""
    assert det.text == s


def test_incomplete_tail_becomes_replacement_char_only_at_flush(tok, byte_ids):
    ids = tok.encode("ok ").ids + [byte_ids[b] for b in "日".encode()[:2]]
    det = IncrementalDetokenizer(tok, [])
    out = "".join(det.step([t]) for t in ids)
    assert out == "ok " and FFFD not in out
    tail = det.flush()
    assert tail.endswith(FFFD)
    assert out + tail == tok.decode(ids)
    assert det.flush() == ""  # idempotent
    with pytest.raises(RuntimeError):
        det.step([1])


def test_invalid_bytes_in_the_middle_match_full_decode(tok, byte_ids):
    ids = tok.encode("x").ids + [byte_ids[0x80]] + tok.encode("yz").ids  # lone continuation byte
    det, pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert FFFD in det.text


def test_special_tokens_are_skipped(tok):
    eos = tok.token_to_id("<eos>")
    ids = tok.encode("hi ").ids + [eos] + tok.encode("there").ids
    det, pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == "hi there" == tok.decode(ids, skip_special_tokens=True)


def test_prompt_context_does_not_leak_into_output(tok):
    prompt = tok.encode("The prompt ends here 日本").ids
    out_ids = tok.encode(" and continues 😀 fine").ids
    det, pieces, tail = stream(tok, out_ids, prompt)
    assert det.text == " and continues 😀 fine"
    assert det.output_ids == out_ids


def test_accepts_int_and_empty_steps(tok):
    det = IncrementalDetokenizer(tok, None)
    assert det.step([]) == ""
    ids = tok.encode("abc").ids
    got = "".join(det.step(t) for t in ids)
    assert got == "abc"
