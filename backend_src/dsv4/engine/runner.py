"""ModelRunner: a scheduled step -> the flat batch the model takes -> logits of the sequences that sample."""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

import numpy as np
import torch

from dsv4.config import ceil_div
from dsv4.engine.cuda_graphs import DecodeGraphs
from dsv4.engine.decode_inputs import TOKEN, DecodeInputs, MixedInputs, PendingTokens, decode_batch, to_device
from dsv4.engine.kv_cache import KVCache
from dsv4.engine.mixed_graphs import MixedGraphs
from dsv4.engine.sampler import SamplerOutput
from dsv4.engine.scheduler import ScheduledStep
from dsv4.model.deepseek_v4 import DeepseekV4Model
from dsv4.ops.base import ForwardBatch


class StepLogits(NamedTuple):
    logits: torch.Tensor                 # fp32 [len(sampling), vocab]
    sampling: list[int]                  # indices into step.seqs of the sequences that sample
    greedy: SamplerOutput | None         # greedy_head(logits) where a CUDA graph computed it (Sampler's shortcut)


class ModelRunner:
    """Decode-only steps (one token per sequence) go through `DecodeInputs`: replayed from a CUDA graph when one of
    their size was captured, else run eagerly over the same device-side tables. Steps with prefill tokens build a
    general ForwardBatch, run through piecewise CUDA graphs (`mixed`) when one holds their token count; small ones
    (`mixed.whole_bucket`) are described like a decode step, one row per token (`MixedInputs`), and replay one
    graph of the whole step."""

    def __init__(self, model: DeepseekV4Model, cache: KVCache, device: torch.device, max_model_len: int,
                 graphs: DecodeGraphs | None = None, mixed: MixedGraphs | None = None):
        self.model, self.cache, self.device = model, cache, device
        self.table_width = ceil_div(max_model_len, cache.block_size)
        # eager decode sizes its launch plans for the same bound as the graphs, so both run identical kernels
        self.max_position = max_model_len - 1
        self.graphs, self.mixed = graphs, mixed
        self.graph_steps = 0
        self.mixed_graph_steps = 0
        self.whole_graph_steps = 0       # of mixed_graph_steps: one graph of the whole step
        self.eager_steps = 0

    def build_batch(self, step: ScheduledStep) -> tuple[ForwardBatch, list[int]]:
        """-> (batch, indices into step.seqs of the sequences whose last token is computed now and so sample)."""
        ids: list[int] = []
        positions: list[int] = []
        starts = [0]
        slots: list[int] = []
        logits_rows: list[int] = []
        sampling: list[int] = []
        for k, (seq, n) in enumerate(zip(step.seqs, step.num_tokens)):
            c = seq.num_computed
            all_ids = seq.all_ids
            ids += all_ids[c:c + n]
            positions += range(c, c + n)
            slots += self.cache.window_slots(seq.request_id, c, c + n)
            starts.append(starts[-1] + n)
            if c + n == seq.num_tokens:
                logits_rows.append(starts[-1] - 1)
                sampling.append(k)
        # one host-to-device copy (from pinned memory) for the four index vectors instead of four blocking ones
        T = len(ids)
        packed = to_device(torch.from_numpy(np.array(ids + positions + slots + logits_rows, dtype=np.int64)),
                           self.device)
        batch = ForwardBatch(
            token_ids=packed[:T],
            positions=packed[T:2 * T],
            query_start=starts,
            context_lens=[s.num_computed for s in step.seqs],
            state_slots=[self.cache.slot(s.request_id) for s in step.seqs],
            swa_block_tables=[self.cache.window.block_table(s.request_id) for s in step.seqs],
            comp_block_tables=[self.cache.compressed.block_table(s.request_id) for s in step.seqs],
            swa_slot_mapping=packed[2 * T:3 * T],
            logits_indices=packed[3 * T:],
        )
        return batch, sampling

    def decode_logits(self, step: ScheduledStep,
                      pending: PendingTokens | None = None) -> tuple[torch.Tensor, SamplerOutput | None]:
        """fp32 logits [B, vocab] of a decode-only step, with their greedy head where a graph computed it."""
        n = len(step.seqs)
        size = self.graphs.bucket(n) if self.graphs is not None else None
        inputs = DecodeInputs.build(step.seqs, self.cache, size or n, self.table_width)
        if size is not None:
            self.graph_steps += 1
            return self.graphs.run(inputs, pending)
        self.eager_steps += 1
        i64 = to_device(torch.from_numpy(inputs.i64), self.device)
        i32 = to_device(torch.from_numpy(inputs.i32), self.device)
        if pending is not None:
            pending.apply(i64[TOKEN])
        batch = decode_batch(i64, i32, self.max_position, torch.arange(n, device=self.device), host=inputs)
        return self.model.forward(batch, self.cache.layers), None

    @staticmethod
    def _token_rows(step: ScheduledStep, pending: PendingTokens | None) -> PendingTokens | None:
        """`pending` (rows = indices into step.seqs) with rows of the step's flat token batch instead. Only decode
        rows take pending tokens: a sequence whose last token is still on the GPU has nothing else to compute."""
        if pending is None:
            return None
        ends = list(accumulate(step.num_tokens))
        if any(step.num_tokens[r] != 1 for r in pending.rows):
            raise ValueError("a pending device token can only be the input of a decode row")
        return PendingTokens([ends[r] - 1 for r in pending.rows], pending.src, pending.tokens)

    def execute(self, step: ScheduledStep, pending: PendingTokens | None = None) -> StepLogits:
        """Run `step`; `pending` supplies the input tokens of decode rows that are still on the device."""
        greedy = None
        if step.num_tokens.count(1) == len(step.num_tokens):     # decode-only
            logits, greedy = self.decode_logits(step, pending)
            sampling = [k for k, s in enumerate(step.seqs) if s.num_computed + 1 == s.num_tokens]
            if len(sampling) < len(step.seqs):
                logits = logits[torch.tensor(sampling, dtype=torch.long, device=logits.device)]
                greedy = None
        else:
            T = sum(step.num_tokens)
            pending = self._token_rows(step, pending)
            whole = self.mixed.whole_bucket(T) if self.mixed is not None else None
            if whole is not None:
                inputs = MixedInputs.build(step.seqs, step.num_tokens, self.cache, whole, self.table_width)
                self.mixed_graph_steps += 1
                self.whole_graph_steps += 1
                (logits, greedy), sampling = self.mixed.forward_whole(inputs, pending), inputs.sampling
            else:
                batch, sampling = self.build_batch(step)
                if pending is not None:
                    pending.apply(batch.token_ids)
                if self.mixed is not None and self.mixed.bucket(T) is not None:
                    self.mixed_graph_steps += 1
                    logits = self.mixed.forward(batch)
                else:
                    self.eager_steps += 1
                    logits = self.model.forward(batch, self.cache.layers)
        for seq, n in zip(step.seqs, step.num_tokens):
            seq.num_computed += n
            self.cache.release_window(seq.request_id, seq.num_computed)
        return StepLogits(logits, sampling, greedy)
