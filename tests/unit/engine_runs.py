"""Helpers the engine tests share (not a test module)."""

from __future__ import annotations

from dsv4.engine.engine import Engine
from dsv4.engine.params import SamplingParams


def run_concurrently(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Add every prompt at once, then collect each stream's token ids (no request may fail)."""
    streams = [engine.add_request(f"r{i}", prompt_token_ids=p, params=params) for i, p in enumerate(prompts)]
    results = []
    for s in streams:
        ids = []
        for out in s:
            assert out.error is None, out.error
            ids += out.token_ids
        results.append(ids)
    return results
