"""Sampler: greedy, temperature, top-k, top-p, per-request seeds, raw logprobs.

Statistical tests draw N=20000 samples (one batched call) from a fixed 8-token logits vector
with a fixed global seed and compare the empirical histogram with the exact target
distribution using a chi-square statistic at the 0.1% level; tokens outside the top-k set /
nucleus must never appear.
"""

import math

import pytest
import torch

from dsv4.engine.params import SamplingParams as SP
from dsv4.engine.sampler import Sampler, SamplerOutput, greedy_head, make_generator

LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]
V = len(LOGITS)
N = 20000
# chi-square critical values at p = 0.001 for df = 1..7
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}

sampler = Sampler()


def softmax(xs, T=1.0):
    m = max(xs)
    e = [math.exp((x - m) / T) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def restrict(probs, keep):
    s = sum(probs[i] for i in keep)
    return [probs[i] / s if i in keep else 0.0 for i in range(len(probs))]


def nucleus(probs, p):
    """Smallest set of most likely tokens whose mass reaches p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for i in order:
        keep.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return keep


def draw(params, n=N, seed=0):
    torch.manual_seed(seed)
    logits = torch.tensor([LOGITS] * n)
    out = sampler.sample(logits, [params] * n, [None] * n)
    return torch.bincount(out.token_ids, minlength=V).tolist()


def chi2(counts, expected_probs):
    n = sum(counts)
    stat, df = 0.0, -1
    for c, p in zip(counts, expected_probs):
        if p == 0.0:
            assert c == 0, "a token with zero target probability was sampled"
            continue
        e = n * p
        stat += (c - e) ** 2 / e
        df += 1
    return stat, df


def assert_matches(counts, expected):
    stat, df = chi2(counts, expected)
    assert stat < CHI2_CRIT[df], (stat, df, counts, [round(N * p) for p in expected])


# ---------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_ignores_seed_and_filters():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    params = [SP(temperature=0), SP(temperature=0, seed=3), SP(top_k=1), SP(temperature=0, top_p=0.1),
              SP(temperature=1e-7), SP(temperature=0, top_k=5)]
    gens = [None, make_generator(3), None, None, None, None]
    out = sampler.sample(logits, params, gens)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids.dtype == torch.long and out.token_ids.shape == (6,)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (6,)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    ids, lps = out  # tuple-unpackable, as in INTERFACES.md
    assert torch.equal(ids, out.token_ids)


def test_mixed_batch_greedy_rows_exact():
    torch.manual_seed(1)
    logits = torch.randn(8, 64)
    params = [SP(temperature=0) if i % 2 == 0 else SP(temperature=1.3, top_p=0.8) for i in range(8)]
    out = sampler.sample(logits, params, [None] * 8)
    for i in range(0, 8, 2):
        assert out.token_ids[i].item() == logits[i].argmax().item()


def test_a_greedy_head_from_a_cuda_graph_is_taken_only_when_every_row_is_greedy_and_suppresses_nothing():
    torch.manual_seed(4)
    logits = torch.randn(3, 50)
    marker = SamplerOutput(torch.tensor([7, 8, 9]), torch.zeros(3))     # not what these logits give
    greedy = [SP(temperature=0), SP(top_k=1), SP(temperature=0, seed=5)]
    assert sampler.sample(logits, greedy, [None] * 3, precomputed=marker) is marker
    head, own = greedy_head(logits), sampler.sample(logits, greedy, [None] * 3)
    assert torch.equal(head.token_ids, own.token_ids) and torch.equal(head.logprobs, own.logprobs)
    assert head.token_ids.tolist() == logits.argmax(-1).tolist()

    one_random = [SP(temperature=0), SP(temperature=1.0), SP(temperature=0)]
    out = sampler.sample(logits, one_random, [None] * 3, precomputed=marker)
    assert out is not marker and out.token_ids[0].item() == logits[0].argmax().item()
    banned = int(logits[1].argmax())
    out = sampler.sample(logits, greedy, [None] * 3, suppress_token_ids=[None, [banned], None], precomputed=marker)
    assert out is not marker and out.token_ids[1].item() != banned


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_of_chosen_token():
    torch.manual_seed(2)
    logits = torch.randn(5, 300) * 3
    params = [SP(temperature=0), SP(temperature=0.3), SP(temperature=2.0, top_k=10),
              SP(top_p=0.5, seed=9), SP(temperature=5.0)]
    gens = [None, None, None, make_generator(9), None]
    out = sampler.sample(logits, params, gens)
    ref = torch.log_softmax(logits.double(), -1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs.double(), ref, atol=1e-5, rtol=1e-5)
    assert (out.logprobs <= 0).all()


def test_suppressed_tokens_never_sampled_logprob_stays_raw():
    torch.manual_seed(3)
    logits = torch.zeros(4, 10)
    logits[:, 7] = 10.0  # e.g. EOS, suppressed while min_tokens is not reached
    params = [SP(temperature=0), SP(temperature=0), SP(temperature=1.0), SP(temperature=1.0, seed=1)]
    gens = [None, None, None, make_generator(1)]
    for _ in range(20):
        out = sampler.sample(logits, params, gens, suppress_token_ids=[[7], None, [7, 3], [7]])
        ids = out.token_ids.tolist()
        assert ids[1] == 7 and 7 not in (ids[0], ids[2], ids[3]) and ids[2] != 3
    ref = torch.log_softmax(logits, -1)[0, out.token_ids[0]]
    assert out.logprobs[0].item() == pytest.approx(ref.item(), abs=1e-6)


# ---------------------------------------------------------------------------- statistics


def test_plain_sampling_matches_softmax():
    assert_matches(draw(SP(temperature=1.0)), softmax(LOGITS))


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_temperature_matches_softmax_of_scaled_logits(T):
    counts = draw(SP(temperature=T), seed=1)
    assert_matches(counts, softmax(LOGITS, T))
    # ... and is clearly *not* the T=1 distribution.
    stat, df = chi2(counts, softmax(LOGITS))
    assert stat > 20 * CHI2_CRIT[df]


def test_top_k_only_top_k_tokens_and_renormalised():
    counts = draw(SP(top_k=3), seed=2)
    assert all(c == 0 for c in counts[3:])
    assert_matches(counts, restrict(softmax(LOGITS), {0, 1, 2}))


def test_top_p_nucleus_only_and_renormalised():
    probs = softmax(LOGITS)
    keep = nucleus(probs, 0.7)
    assert keep == {0, 1, 2}  # 0.403 + 0.244 < 0.7 <= 0.403 + 0.244 + 0.148
    counts = draw(SP(top_p=0.7), seed=3)
    assert all(counts[i] == 0 for i in range(V) if i not in keep)
    assert_matches(counts, restrict(probs, keep))


def test_top_p_keeps_at_least_one_token():
    counts = draw(SP(top_p=1e-6), n=2000, seed=4)
    assert counts[0] == 2000


def test_top_k_then_top_p_with_temperature():
    # vLLM order: temperature -> top-k -> top-p (top-p on the renormalised top-k distribution).
    T, k, p = 0.8, 5, 0.75
    probs_k = restrict(softmax(LOGITS, T), set(range(k)))
    keep = nucleus(probs_k, p)
    counts = draw(SP(temperature=T, top_k=k, top_p=p), seed=5)
    assert all(counts[i] == 0 for i in range(V) if i not in keep)
    assert_matches(counts, restrict(probs_k, keep))


def test_mixed_filters_in_one_batch():
    # Rows with different filters in the same call are each sampled from their own target.
    torch.manual_seed(6)
    n = 8000
    kinds = [SP(top_k=2), SP(top_p=0.7), SP(temperature=0.5), SP()]
    params = [kinds[i % 4] for i in range(4 * n)]
    out = sampler.sample(torch.tensor([LOGITS] * (4 * n)), params, [None] * (4 * n)).token_ids
    targets = [restrict(softmax(LOGITS), {0, 1}), restrict(softmax(LOGITS), {0, 1, 2}),
               softmax(LOGITS, 0.5), softmax(LOGITS)]
    for j, tgt in enumerate(targets):
        counts = torch.bincount(out[j::4], minlength=V).tolist()
        stat, df = chi2(counts, tgt)
        assert stat < CHI2_CRIT[df], (j, stat, counts)


def test_seeded_rows_are_distributed_correctly():
    # Each row has its own generator (seeds 0..n-1): the marginal is still the target.
    n = 4000
    params = [SP(temperature=1.0, top_k=4, seed=s) for s in range(n)]
    gens = [make_generator(s) for s in range(n)]
    out = sampler.sample(torch.tensor([LOGITS] * n), params, gens).token_ids
    counts = torch.bincount(out, minlength=V).tolist()
    stat, df = chi2(counts, restrict(softmax(LOGITS), {0, 1, 2, 3}))
    assert stat < CHI2_CRIT[df]


# ---------------------------------------------------------------------------- seeds


SEEDED_VARIANTS = [
    SP(temperature=1.0, seed=42),
    SP(temperature=0.9, top_k=20, seed=42),
    SP(temperature=1.2, top_p=0.9, seed=42),
    SP(temperature=0.7, top_k=50, top_p=0.95, seed=42),
]


def _run_steps(target, steps_logits, companions, position):
    """Sample `target` for several steps inside batches with `companions` at `position`."""
    g = make_generator(target.seed)
    comp_gens = [make_generator(p.seed) for p in companions]
    toks = []
    for logits_row, other_rows in steps_logits:
        rows = list(other_rows[: len(companions)])
        rows.insert(position, logits_row)
        params = list(companions)
        params.insert(position, target)
        gens = list(comp_gens)
        gens.insert(position, g)
        out = sampler.sample(torch.stack(rows), params, gens)
        toks.append(out.token_ids[position].item())
    return toks


@pytest.mark.parametrize("target", SEEDED_VARIANTS, ids=["plain", "top_k", "top_p", "top_k_top_p"])
def test_seed_reproducible_regardless_of_batch(target):
    torch.manual_seed(7)
    Vb = 1000
    steps = [(torch.randn(Vb) * 2, torch.randn(6, Vb) * 2) for _ in range(12)]
    alone = _run_steps(target, steps, [], 0)
    assert alone == _run_steps(target, steps, [], 0)  # same seed => same tokens
    batches = [
        ([SP(temperature=0)], 1),
        ([SP(), SP(top_p=0.5), SP(top_k=3, seed=1)], 2),
        ([SP(top_k=999, seed=5), SP(temperature=0), SP(seed=42), SP(top_p=0.3), SP(top_k=7)], 0),
        ([SP(top_k=2)] * 6, 6),
    ]
    for i, (companions, pos) in enumerate(batches):
        torch.manual_seed(1000 + i)  # the global RNG state must not matter either
        assert _run_steps(target, steps, companions, pos) == alone, i
    other_seed = SP(**{**target.__dict__, "seed": 43})
    assert _run_steps(other_seed, steps, [], 0) != alone


def test_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        sampler.sample(torch.zeros(2, 4), [SP()], [None, None])
    with pytest.raises(ValueError):
        sampler.sample(torch.zeros(2, 4), [SP(), SP()], [None])
    with pytest.raises(ValueError):
        sampler.sample(torch.zeros(4), [SP()], [None])
