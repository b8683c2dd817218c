"""DSV4_CUTE_STREAMS: how many side streams CuteOps gives `concurrently` (decode's independent chains)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
from dsv4.errors import ConfigError  # noqa: E402
from dsv4.ops import cute  # noqa: E402


@pytest.mark.parametrize("raw,n", [(None, 3), ("0", 0), ("1", 1), ("4", 4)])
def test_side_streams_setting(monkeypatch, raw, n):
    if raw is None:
        monkeypatch.delenv("DSV4_CUTE_STREAMS", raising=False)
    else:
        monkeypatch.setenv("DSV4_CUTE_STREAMS", raw)
    assert cute._side_streams_setting() == n


@pytest.mark.parametrize("raw", ["-1", "5", "two", ""])
def test_a_bad_side_streams_setting_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("DSV4_CUTE_STREAMS", raw)
    with pytest.raises(ConfigError, match="DSV4_CUTE_STREAMS.*0-4"):
        cute._side_streams_setting()
