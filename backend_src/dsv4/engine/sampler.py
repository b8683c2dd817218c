"""Batched token sampling (greedy / temperature / top-k / top-p, per-request seeds).

Design
------
* Rows are split on the host (from the params list, no device sync) into a *greedy* group
  (temperature < SAMPLING_EPS or top_k == 1) handled by one ``argmax`` and a *random* group
  handled by one vectorised pipeline: ``logits / T`` -> top-k -> top-p -> softmax -> sample.
* top-k keeps exactly ``k`` tokens (ties broken by sort order); top-p keeps the smallest
  prefix of the descending-sorted distribution whose mass reaches ``p`` (a token is kept iff
  the mass strictly before it is < p, so the most likely token is always kept).  top-p is
  computed on the distribution after top-k, as vLLM does.
* Sampling uses the exponential race: ``argmax(probs / E)`` with ``E ~ Exponential(1)`` i.i.d.
  is an exact sample from ``probs``; it is evaluated in log space as
  ``argmax(logits / T - log E)`` over the kept tokens (Gumbel-max).  ``E`` is always drawn in *vocabulary* space with shape
  ``[V]`` per row, so a seeded row consumes exactly ``V`` draws from its own generator per
  step, independent of the batch it is in: same seed => same tokens regardless of batch
  composition or position (barring float rounding exactly at a top-p cutoff).  Unseeded rows
  share one batched draw from the default generator.
  Generators must live on the same device as ``logits``.
* Logprobs: the returned logprob is ``log_softmax(raw_logits)[token]`` -- the *unmodified*
  logits, before temperature / top-k / top-p ("raw logprobs", vLLM's default).  This is the
  model's own probability of the chosen token and is identical for greedy and sampled rows.
* Only host->device copies of small index/param tensors happen here; the caller does the
  single ``.tolist()``.
* ``greedy_head`` is the all-greedy path on its own, so a CUDA graph can run it after the logits
  (engine.cuda_graphs, engine.mixed_graphs): a step whose rows are all greedy and suppress nothing
  then takes its tokens from the graph (``sample(..., precomputed=...)``) and launches nothing here
  (five eager launches were ~0.3-0.4 ms of host time per step on the H100 machine).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from dsv4.engine.decode_inputs import to_device

from dsv4.engine.params import SamplingParams

__all__ = ["Sampler", "SamplerOutput", "greedy_head", "make_generator"]


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, raw log_softmax of the chosen token


def greedy_head(logits: torch.Tensor) -> SamplerOutput:
    """Argmax of every row and its raw logprob: what `Sampler.sample` returns for rows that are all greedy and
    suppress nothing (the same ops, so the same tokens)."""
    raw = logits.float()
    token_ids = raw.argmax(dim=-1)
    logprobs = (raw.gather(1, token_ids.unsqueeze(1)).squeeze(1) - torch.logsumexp(raw, dim=-1)).float()
    return SamplerOutput(token_ids, logprobs)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A torch.Generator for a request's ``seed`` on ``device`` (None when unseeded)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _dev(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without a host sync (the engine launches the next step before reading this
    one's tokens; a copy from pageable memory would wait for the GPU)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


class Sampler:
    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        *,
        suppress_token_ids: Sequence[Sequence[int] | None] | None = None,
        precomputed: SamplerOutput | None = None,
    ) -> SamplerOutput:
        """Sample one token per row.

        logits: [B, V] (any float dtype; computed in float32). params/generators: length B.
        suppress_token_ids (optional, per row): token ids whose logits are set to -inf before
        sampling, e.g. EOS / stop tokens while ``min_tokens`` is not reached (see
        ``StopChecker.suppressed_token_ids``).  The raw logprob ignores suppression.
        precomputed (optional): ``greedy_head`` of these logits, already computed on the device; returned
        as is when every row is greedy and suppresses nothing.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        B, V = logits.shape
        if len(params) != B:
            raise ValueError(f"got {len(params)} SamplingParams for {B} rows")
        if generators is None:
            generators = [None] * B
        if len(generators) != B:
            raise ValueError(f"got {len(generators)} generators for {B} rows")
        suppressing = suppress_token_ids is not None and any(suppress_token_ids)
        if not suppressing and all(p.is_greedy for p in params):
            return precomputed if precomputed is not None else greedy_head(logits)
        device = logits.device
        raw = logits.float()

        # Raw logprob normaliser (unmodified logits).
        lse = torch.logsumexp(raw, dim=-1)  # [B]

        work = raw
        if suppressing:
            rows: list[int] = []
            cols: list[int] = []
            for i, ids in enumerate(suppress_token_ids):
                if ids:
                    for t in ids:
                        if 0 <= t < V:
                            rows.append(i)
                            cols.append(t)
            if rows:
                work = raw.clone()
                work[_dev(rows, torch.long, device), _dev(cols, torch.long, device)] = float("-inf")

        greedy_rows: list[int] = []
        random_rows: list[int] = []
        for i, p in enumerate(params):
            (greedy_rows if p.is_greedy else random_rows).append(i)

        token_ids = torch.empty(B, dtype=torch.long, device=device)

        if greedy_rows:
            if len(greedy_rows) == B:
                token_ids = work.argmax(dim=-1)
            else:
                gidx = _dev(greedy_rows, torch.long, device)
                token_ids.index_copy_(0, gidx, work.index_select(0, gidx).argmax(dim=-1))

        if random_rows:
            if len(random_rows) == B:
                ridx = None
                sub = work
            else:
                ridx = _dev(random_rows, torch.long, device)
                sub = work.index_select(0, ridx)
            rparams = [params[i] for i in random_rows]
            rgens = [generators[i] for i in random_rows]
            sampled = self._sample_random(sub, rparams, rgens)
            if ridx is None:
                token_ids = sampled
            else:
                token_ids.index_copy_(0, ridx, sampled)

        chosen = raw.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        logprobs = (chosen - lse).float()
        return SamplerOutput(token_ids, logprobs)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _sample_random(
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        R, V = logits.shape
        device = logits.device

        temps = _dev([p.temperature for p in params], torch.float32, device)
        scaled = logits / temps.unsqueeze(1)

        ks = [p.top_k if p.top_k >= 1 else V for p in params]
        ks = [min(k, V) for k in ks]
        ps = [p.top_p for p in params]
        need_top_p = any(p < 1.0 for p in ps)
        need_top_k = any(k < V for k in ks)

        # Exponential noise in vocabulary space: seeded rows use their own generator with a
        # draw of exactly [V], so their stream does not depend on the rest of the batch.
        seeded = [i for i, g in enumerate(generators) if g is not None]
        if len(seeded) == R:
            q = torch.stack([torch.empty(V, device=device).exponential_(generator=g) for g in generators])
        else:
            q = torch.empty((R, V), device=device).exponential_()
            for i in seeded:
                q[i] = torch.empty(V, device=device).exponential_(generator=generators[i])
        # -log(E) is Gumbel(0, 1): argmax(logit/T - log E) == argmax(probs / E).  Working in
        # log space makes the choice independent of the softmax normaliser (batch-invariant).
        neg_log_q = q.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_()

        if not need_top_p and not need_top_k:
            return (scaled + neg_log_q).argmax(dim=-1)

        # top-p needs the sorted head of the distribution after top-k only, so a partial
        # top-k (cheap) suffices unless some row has no top-k limit (full sort).
        width = max(ks)
        if width < V:
            vals, idx = scaled.topk(width, dim=-1, largest=True, sorted=True)
        else:
            vals, idx = scaled.sort(dim=-1, descending=True)
        W = vals.shape[1]

        if need_top_k:
            pos = torch.arange(W, device=device).unsqueeze(0)
            k_t = _dev(ks, torch.long, device).unsqueeze(1)
            vals = vals.masked_fill(pos >= k_t, float("-inf"))

        if need_top_p:
            probs = torch.softmax(vals, dim=-1)
            # p >= 1 rows: never mask (avoids cumsum rounding dropping tail tokens).
            p_t = _dev([p if p < 1.0 else float("inf") for p in ps], torch.float32, device)
            excl = probs.cumsum(dim=-1) - probs  # mass strictly before each token
            drop = excl >= p_t.unsqueeze(1)
            drop[:, 0] = False  # always keep the most likely token
            vals = vals.masked_fill(drop, float("-inf"))

        pos_choice = (vals + neg_log_q.gather(1, idx)).argmax(dim=-1, keepdim=True)
        return idx.gather(1, pos_choice).squeeze(1)
