"""StopChecker: EOS / stop_token_ids / max_tokens / stop strings with safe streaming.

Most tests use a fake detokenizer whose token id ``i`` decodes to ``PIECES[i]`` so that the
exact token boundaries are under control; one test drives a real byte-level BPE tokenizer.
"""

import random

import pytest

from dsv4.engine.detokenizer import IncrementalDetokenizer
from dsv4.engine.params import SamplingParams as SP
from dsv4.engine.stop import StopChecker, StopUpdate

EOS = 0


class FakeDetok:
    def __init__(self, pieces):
        self.pieces = pieces
        self.flushed = False
        self.tail = ""

    def step(self, ids):
        assert not self.flushed
        return "".join(self.pieces.get(i, "") for i in ids)  # unknown ids: special tokens -> ""

    def flush(self):
        self.flushed = True
        return self.tail


def run(params, texts, eos=EOS, tail=""):
    """Feed tokens whose texts are `texts` (strings, or ints = raw token ids)."""
    pieces = {}
    ids = []
    for j, t in enumerate(texts):
        if isinstance(t, int):
            ids.append(t)
        else:
            pieces[100 + j] = t
            ids.append(100 + j)
    det = FakeDetok(pieces)
    det.tail = tail
    sc = StopChecker(params, eos_token_ids=eos)
    deltas = []
    upd = None
    for tid in ids:
        upd = sc.update(tid, det)
        assert isinstance(upd, StopUpdate)
        deltas.append(upd.text)
        if upd.finished:
            break
    return sc, deltas, upd


# ---------------------------------------------------------------------------- token-level


def test_eos_stops_and_is_not_in_text():
    sc, deltas, upd = run(SP(max_tokens=10), ["a", "b", EOS, "c"])
    assert upd.finished and upd.finish_reason == "stop" and upd.stop_reason is None
    assert "".join(deltas) == "ab" and sc.num_output_tokens == 3


def test_ignore_eos_continues():
    sc, deltas, upd = run(SP(max_tokens=4, ignore_eos=True), ["a", EOS, "b", "c", "d"])
    assert upd.finish_reason == "length" and sc.num_output_tokens == 4


def test_multiple_eos_ids():
    sc, _, upd = run(SP(max_tokens=10), ["a", 5, "b"], eos=[0, 5])
    assert upd.finish_reason == "stop" and sc.num_output_tokens == 2


def test_stop_token_ids():
    sc, deltas, upd = run(SP(max_tokens=10, stop_token_ids=[7]), ["x", "y", 7, "z"])
    assert (upd.finish_reason, upd.stop_reason) == ("stop", 7)
    assert "".join(deltas) == "xy" and sc.num_output_tokens == 3


def test_min_tokens_defers_eos_and_stop_tokens():
    p = SP(max_tokens=10, min_tokens=3, stop_token_ids=[7])
    sc = StopChecker(p, EOS)
    det = FakeDetok({1: "a"})
    assert sc.suppressed_token_ids() == [EOS, 7]
    assert not sc.update(EOS, det).finished  # token 1 of 3 protected
    assert not sc.update(7, det).finished  # token 2
    assert sc.suppressed_token_ids() == [EOS, 7]
    assert not sc.update(1, det).finished  # token 3
    assert sc.suppressed_token_ids() == []
    upd = sc.update(EOS, det)  # token 4 may stop
    assert upd.finished and upd.finish_reason == "stop" and sc.num_output_tokens == 4
    # ignore_eos: EOS is never suppressed, stop tokens are
    assert StopChecker(SP(min_tokens=1, ignore_eos=True, stop_token_ids=[3]), EOS).suppressed_token_ids() == [3]


def test_max_tokens_length_and_held_text_released():
    sc, deltas, upd = run(SP(max_tokens=3, stop=["STOP"]), ["a", "b", "ST"], tail="")
    assert upd.finish_reason == "length"
    assert deltas == ["a", "b", "ST"]  # "ST" was held during the step, released at finish
    assert sc.output_text == "abST"


def test_length_finish_includes_detokenizer_flush():
    sc, deltas, upd = run(SP(max_tokens=2), ["a", "b"], tail="\ufffd")
    assert "".join(deltas) == "ab\ufffd"


def test_stop_string_on_last_token_wins_over_length():
    sc, deltas, upd = run(SP(max_tokens=2, stop=["yz"]), ["xy", "z"])
    assert (upd.finish_reason, upd.stop_reason) == ("stop", "yz")
    assert "".join(deltas) == "x"


def test_update_after_finish_raises():
    sc, _, _ = run(SP(max_tokens=1), ["a"])
    with pytest.raises(RuntimeError):
        sc.update(1, FakeDetok({1: "b"}))


# ---------------------------------------------------------------------------- stop strings


def test_stop_string_split_across_tokens_never_leaks():
    sc, deltas, upd = run(SP(max_tokens=50, stop=["STOP"]), ["Hello ", "S", "T", "O", "P", " after"])
    assert deltas == ["Hello ", "", "", "", ""]
    assert (upd.finish_reason, upd.stop_reason) == ("stop", "STOP")
    assert sc.output_text == "Hello "


def test_stop_string_inside_one_token_truncates():
    sc, deltas, upd = run(SP(max_tokens=50, stop=["\n\n"]), ["para one.\n\npara two"])
    assert deltas == ["para one."] and upd.finish_reason == "stop"


def test_held_prefix_released_when_it_diverges():
    sc, deltas, upd = run(SP(max_tokens=50, stop=["abc"]), ["x", "a", "b", "d", "e"])
    assert deltas == ["x", "", "", "abd", "e"]
    assert not upd.finished


def test_overlapping_prefix_holdback():
    # "aab" arrives as "a","a","a","b": the stop string starts at the 2nd 'a'.
    sc, deltas, upd = run(SP(max_tokens=50, stop=["aab"]), ["a", "a", "a", "b"])
    assert "".join(deltas) == "a" and upd.finish_reason == "stop"


def test_earliest_completed_stop_string_wins():
    sc, deltas, upd = run(SP(max_tokens=50, stop=["abcd", "bc"]), ["a", "bcd"])
    assert upd.stop_reason == "bc" and "".join(deltas) == "a"
    sc, deltas, upd = run(SP(max_tokens=50, stop=["b", "abc"]), ["xabc"])
    assert upd.stop_reason == "b" and "".join(deltas) == "xa"


def test_min_tokens_ignores_stop_strings_in_protected_tokens():
    # tokens 1-2 are protected; "END" completed by token 2 does not count, by token 4 does.
    sc, deltas, upd = run(SP(max_tokens=50, min_tokens=2, stop=["END"]), ["E", "ND ", "x", "END", "y"])
    assert upd.finished and upd.stop_reason == "END"
    assert sc.output_text == "END x" and sc.num_output_tokens == 4


def test_stop_completed_by_flush_tail():
    sc, deltas, upd = run(SP(max_tokens=50, stop=["a\ufffd"]), ["x", "a", EOS], tail="\ufffd")
    assert upd.finish_reason == "stop" and upd.stop_reason == "a\ufffd" and "".join(deltas) == "x"


def reference_output(text, stops, protected=0):
    """Truncate before the stop string that is completed first (earliest end, then longest);
    only matches ending after the first `protected` characters count (min_tokens)."""
    best = None
    for s in stops:
        for i in range(len(text) - len(s) + 1):
            if text.startswith(s, i) and i + len(s) > protected:
                key = (i + len(s), -len(s))
                if best is None or key < best:
                    best = key
                break
    return (text[: best[0] + best[1]], True) if best else (text, False)


def test_random_streams_against_reference():
    rng = random.Random(99)
    alphabet = "abc"
    for _ in range(1500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        stops = list({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))})
        # random tokenization of `text` (including empty pieces)
        pieces, i = [], 0
        while i < len(text):
            k = rng.randint(0, 4)
            pieces.append(text[i : i + k])
            i += k
        min_tokens = rng.choice([0, 0, rng.randint(0, len(pieces))])
        params = SP(max_tokens=len(pieces), min_tokens=min_tokens, stop=stops)
        sc, deltas, upd = run(params, pieces)
        expected, hit = reference_output(text, stops, len("".join(pieces[:min_tokens])))
        assert upd.finished
        assert "".join(deltas) == expected == sc.output_text, (text, stops, pieces, deltas)
        assert upd.finish_reason == ("stop" if hit else "length")
        # every streamed prefix is a prefix of the final output (no partial stop ever leaked)
        acc = ""
        for d in deltas:
            acc += d
            assert expected.startswith(acc)
            if min_tokens == 0:
                for s in stops:
                    assert s not in acc


def test_with_real_tokenizer_multibyte_stop():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        ["some plain words here"],
        trainer=trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    text = "answer: 42 🛑 ignored"
    ids = t.encode(text).ids
    det = IncrementalDetokenizer(t, [])
    sc = StopChecker(SP(max_tokens=100, stop=["🛑"]), eos_token_ids=None)
    out = []
    for tid in ids:
        u = sc.update(tid, det)
        out.append(u.text)
        assert "\ufffd" not in u.text
        if u.finished:
            break
    assert "".join(out) == "answer: 42 " and u.stop_reason == "🛑"
