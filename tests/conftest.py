"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset, NVFP4, seed 0, written once per session in 1 MiB shards (so it has several). Read-only:
    tests that damage a checkpoint copy it first."""
    from dsv4.checkpoint.presets import PRESETS
    from dsv4.checkpoint.writer import make_checkpoint

    return make_checkpoint(PRESETS["tiny"](None), tmp_path_factory.mktemp("tiny_checkpoint"), fmt="nvfp4", seed=0,
                           max_shard_bytes=1 << 20)
