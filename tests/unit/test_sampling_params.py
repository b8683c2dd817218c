"""SamplingParams: vLLM-compatible keys, strict validation, errors that name the parameter."""

import math

import pytest

from dsv4.engine.params import SamplingParams, check_fits_context
from dsv4.errors import InvalidRequestError


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_tokens) == (1.0, 1.0, 0, 16, 0)
    assert p.stop == [] and p.stop_token_ids == [] and p.ignore_eos is False
    assert p.seed is None and p.logprobs is None
    assert SamplingParams.from_dict({}) == p
    assert SamplingParams.from_dict(None) == p


def test_from_dict_all_supported_keys():
    p = SamplingParams.from_dict(
        {
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "max_tokens": 128,
            "min_tokens": 4,
            "stop": ["\n\n", "END"],
            "stop_token_ids": [7, 9],
            "ignore_eos": True,
            "seed": 1234,
            "logprobs": 1,
            "n": 1,
            "presence_penalty": 0.0,
            "frequency_penalty": 0,
            "repetition_penalty": 1.0,
        }
    )
    assert p == SamplingParams(0.7, 0.9, 40, 128, 4, ["\n\n", "END"], [7, 9], True, 1234, 1)


def test_stop_string_is_normalised_to_list_and_ints_accepted_for_floats():
    assert SamplingParams.from_dict({"stop": "###"}).stop == ["###"]
    assert SamplingParams(stop="x").stop == ["x"]
    p = SamplingParams.from_dict({"temperature": 0, "top_p": 1})
    assert p.temperature == 0 and p.is_greedy


def test_none_means_default():
    p = SamplingParams.from_dict({"temperature": None, "max_tokens": None, "seed": None, "stop": None, "n": None})
    assert p == SamplingParams()


def test_disabled_top_k_values_and_greedy():
    assert not SamplingParams(top_k=0).is_greedy
    assert not SamplingParams(top_k=-1).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert SamplingParams(temperature=0.0).is_greedy


def test_lists_are_copied():
    stops = ["a"]
    p = SamplingParams(stop=stops)
    stops.append("b")
    assert p.stop == ["a"]


BAD = [
    # (key, value, words the message must contain)
    ("temperature", -0.1, [">= 0"]),
    ("temperature", float("nan"), ["finite"]),
    ("temperature", float("inf"), ["finite"]),
    ("temperature", "0.7", ["number"]),
    ("temperature", True, ["number"]),
    ("temperature", [1.0], ["number"]),
    ("top_p", 0, ["(0, 1]"]),
    ("top_p", 0.0, ["(0, 1]"]),
    ("top_p", 1.5, ["(0, 1]"]),
    ("top_p", -0.5, ["(0, 1]"]),
    ("top_p", float("nan"), ["finite"]),
    ("top_p", "0.9", ["number"]),
    ("top_k", -2, [">= 1"]),
    ("top_k", 2.5, ["integer"]),
    ("top_k", 5.0, ["integer"]),
    ("top_k", "5", ["integer"]),
    ("top_k", False, ["integer"]),
    ("max_tokens", 0, [">= 1"]),
    ("max_tokens", -5, [">= 1"]),
    ("max_tokens", 1.5, ["integer"]),
    ("max_tokens", "16", ["integer"]),
    ("max_tokens", True, ["integer"]),
    ("min_tokens", -1, [">= 0"]),
    ("min_tokens", 17, ["max_tokens"]),  # default max_tokens is 16
    ("min_tokens", 1.0, ["integer"]),
    ("stop", 5, ["string"]),
    ("stop", [""], ["non-empty"]),
    ("stop", ["ok", 3], ["element 1", "string"]),
    ("stop", {"a": 1}, ["string"]),
    ("stop_token_ids", 5, ["list"]),
    ("stop_token_ids", [1, -1], ["element 1", ">= 0"]),
    ("stop_token_ids", [True], ["element 0"]),
    ("stop_token_ids", ["3"], ["element 0"]),
    ("ignore_eos", 1, ["boolean"]),
    ("ignore_eos", "true", ["boolean"]),
    ("seed", 1.5, ["integer"]),
    ("seed", "42", ["integer"]),
    ("seed", True, ["integer"]),
    ("seed", 2**64, ["seed", "must be in"]),
    ("logprobs", 5, ["0 or 1", "not supported"]),
    ("logprobs", -1, ["0 or 1"]),
    ("logprobs", True, ["integer"]),
    ("n", 2, ["n=1"]),
    ("n", 1.0, ["integer"]),
    ("presence_penalty", 0.5, ["not supported"]),
    ("frequency_penalty", -1, ["not supported"]),
    ("repetition_penalty", 1.1, ["not supported"]),
    ("repetition_penalty", "1", ["number"]),
    ("presence_penalty", float("nan"), ["finite"]),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_value_raises_naming_parameter(key, value, words):
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams.from_dict({key: value})
    msg = str(ei.value)
    assert f"'{key}'" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("key,value", [(k, v) for k, v, _ in BAD if k in SamplingParams.__dataclass_fields__])
def test_direct_construction_validates_too(key, value):
    with pytest.raises(InvalidRequestError, match=key):
        SamplingParams(**{key: value})


def test_unknown_key_is_named_and_allowed_keys_listed():
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams.from_dict({"temperature": 0.5, "best_of": 2})
    msg = str(ei.value)
    assert "'best_of'" in msg
    for k in ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "logprobs"):
        assert k in msg


def test_non_dict_rejected():
    with pytest.raises(InvalidRequestError):
        SamplingParams.from_dict([("temperature", 1.0)])


def test_validate_catches_mutation():
    p = SamplingParams()
    p.top_p = 2.0
    with pytest.raises(InvalidRequestError, match="top_p"):
        p.validate()


def test_context_check():
    p = SamplingParams(max_tokens=100)
    p.check_fits_context(prompt_len=28, max_model_len=128)  # exactly fits
    with pytest.raises(InvalidRequestError) as ei:
        p.check_fits_context(prompt_len=29, max_model_len=128)
    assert "max_tokens" in str(ei.value) and "99" in str(ei.value)
    with pytest.raises(InvalidRequestError, match="prompt length 128"):
        p.check_fits_context(prompt_len=128, max_model_len=128)
    with pytest.raises(InvalidRequestError, match="prompt"):
        check_fits_context(0, 128, 1)


def test_extreme_but_valid_values():
    SamplingParams(temperature=1e-9, top_p=1e-9, top_k=10**9, seed=-(2**63), max_tokens=10**9)
    SamplingParams(seed=2**64 - 1, logprobs=0)
    assert math.isfinite(SamplingParams(temperature=100).temperature)
