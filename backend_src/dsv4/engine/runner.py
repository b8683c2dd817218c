"""ModelRunner: a scheduled step -> the flat batch the model takes -> logits of the sequences that sample."""

from __future__ import annotations

import torch

from dsv4.engine.kv_cache import KVCache
from dsv4.engine.scheduler import ScheduledStep
from dsv4.model.deepseek_v4 import DeepseekV4Model
from dsv4.ops.base import ForwardBatch


class ModelRunner:
    def __init__(self, model: DeepseekV4Model, cache: KVCache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device

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
        dev = self.device
        batch = ForwardBatch(
            token_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            query_start=starts,
            context_lens=[s.num_computed for s in step.seqs],
            state_slots=[self.cache.slot(s.request_id) for s in step.seqs],
            swa_block_tables=[self.cache.window.block_table(s.request_id) for s in step.seqs],
            comp_block_tables=[self.cache.compressed.block_table(s.request_id) for s in step.seqs],
            swa_slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
        )
        return batch, sampling

    def execute(self, step: ScheduledStep) -> tuple[torch.Tensor, list[int]]:
        batch, sampling = self.build_batch(step)
        logits = self.model.forward(batch, self.cache.layers)
        for seq, n in zip(step.seqs, step.num_tokens):
            seq.num_computed += n
            self.cache.release_window(seq.request_id, seq.num_computed)
        return logits, sampling
