"""Helpers the engine tests share (not a test module)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv4.checkpoint.loader import load_checkpoint
from dsv4.engine.engine import Engine
from dsv4.engine.params import SamplingParams
from dsv4.model.deepseek_v4 import DeepseekV4Model
from dsv4.ops.torch_ops import TorchOps


@dataclass
class Seq:
    """The parts of an engine Sequence the ModelRunner reads (runner-level tests drive steps by hand)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        return self.all_ids[i]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def cpu_model(checkpoint, max_len: int) -> DeepseekV4Model:
    """The checkpoint's model on torch ops, fp32 on the CPU, RoPE tables reserved up to max_len."""
    ckpt = load_checkpoint(checkpoint, progress=False)
    ops = TorchOps()
    ops.reserve_positions(max_len)
    return DeepseekV4Model(ckpt.config, ckpt.tensors, ops, torch.device("cpu"), torch.float32)


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
