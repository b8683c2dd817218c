"""Steps with prompt tokens run through per-token-count buckets (engine.mixed_graphs), piecewise or as one
whole-step graph, compute what the plain forward computes: the same logits and the same cache contents, step after
step, whatever the padding rows of a bucket hold.

On CPU the pieces run eagerly through the same static buffers (`capture=False`); tests/gpu/test_cuda_graphs.py
replays them from captured graphs.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.engine.kv_cache import KVCache
from dsv4.engine.mixed_graphs import MixedGraphs, token_buckets
from dsv4.engine.runner import ModelRunner
from dsv4.engine.scheduler import ScheduledStep
from dsv4.errors import ConfigError

from engine_runs import Seq, cpu_model

MAX_LEN = 1024
SIZES = [16, 64, 128, 192]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return cpu_model(tiny_checkpoint, MAX_LEN)


def new_runner(model, mixed: bool, graph_compressor: bool = False, whole_max_tokens: int = 0) -> ModelRunner:
    cache = KVCache(model.cfg, num_blocks=24, block_size=128, max_seqs=6, device=torch.device("cpu"),
                    dtype=torch.float32)
    for t in [cache.window_kv] + [t for lc in cache.layers for t in (lc.comp_kv, lc.index_k) if t is not None]:
        t.fill_(float("nan"))   # anything read before it is written poisons the logits
    graphs = None
    if mixed:
        graphs = MixedGraphs(model, cache.layers, torch.device("cpu"), SIZES, capture=False,
                             graph_compressor=graph_compressor, whole_max_tokens=whole_max_tokens,
                             max_model_len=MAX_LEN, block_size=128, max_rows=6)
        graphs.prepare()
    return ModelRunner(model, cache, torch.device("cpu"), MAX_LEN, mixed=graphs)


def scramble_padding(runner: ModelRunner, g: torch.Generator) -> None:
    """Fill every bucket's static inputs with other valid token ids and positions (what earlier steps leave)."""
    for b in runner.mixed._buckets.values():
        b.token_ids.copy_(torch.randint(0, runner.model.cfg.vocab_size, b.token_ids.shape, generator=g))
        b.positions.copy_(torch.randint(0, MAX_LEN, b.positions.shape, generator=g))
        if b.o is not None:
            b.o.normal_(generator=g)


def run_step(runner: ModelRunner, seqs: list[Seq], num_tokens: list[int]) -> torch.Tensor:
    for s, n in zip(seqs, num_tokens):
        if s.request_id not in runner.cache:
            runner.cache.add(s.request_id)
        runner.cache.grow(s.request_id, s.num_computed + n)
    logits = runner.execute(ScheduledStep(seqs=seqs, num_tokens=num_tokens)).logits
    return logits


def test_token_buckets_cover_up_to_the_limit_with_kernel_path_boundaries():
    assert token_buckets(1024) == [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024]
    assert token_buckets(300) == [16, 32, 64, 128, 192, 256, 300]
    assert token_buckets(10) == [10]
    with pytest.raises(ConfigError, match="cuda_graph_max_tokens"):
        token_buckets(0)


@pytest.mark.parametrize("graph_compressor,whole_max_tokens", [(False, 0), (True, 0), (True, 64), (True, 192)],
                         ids=["compressor-eager", "compressor-in-pieces", "whole-up-to-64", "whole-everywhere"])
def test_mixed_steps_through_buckets_equal_the_plain_forward(model, graph_compressor, whole_max_tokens):
    """Prefill chunks next to decode rows, sizes in several buckets, chunked prompts crossing compressed-window
    closings; padding rows scrambled before every step. With the compressors inside the pieces, their padded plans
    must write exactly what the plain plan writes (padding writes are no-ops). Whole-step buckets describe the step
    one row per token through the decode tables: a prompt token reads its sequence's cache up to its own position,
    this step's rows included, exactly as the prefill path does."""
    g = torch.Generator().manual_seed(11)
    V = model.cfg.vocab_size
    prompts = {name: torch.randint(2, V, (n,), generator=g).tolist()
               for name, n in (("a", 125), ("b", 3), ("c", 40), ("d", 300), ("e", 9))}
    plain = new_runner(model, mixed=False)
    mixed = new_runner(model, mixed=True, graph_compressor=graph_compressor, whole_max_tokens=whole_max_tokens)
    seqs = {r: {k: Seq(k, list(p)) for k, p in prompts.items()} for r in ("plain", "mixed")}
    # (sequence, tokens) per step: None = one decode token
    schedule = [
        [("a", 125), ("b", 3)],                     # 128 tokens: bucket 128 exactly
        [("a", None), ("b", None), ("c", 40)],      # 42 -> bucket 64
        [("a", None), ("b", None), ("c", None), ("d", 150)],   # 153 -> 192
        [("a", None), ("b", None), ("c", None), ("d", 150), ("e", 9)],  # 162 -> 192 (d's window closings)
        [("a", None), ("b", None), ("c", None), ("d", None), ("e", None)],  # decode only: not a mixed step
        [("a", None), ("b", None), ("c", None), ("d", None), ("e", None)],
    ]
    steps_before, whole_before = mixed.mixed_graph_steps, mixed.whole_graph_steps
    for plan in schedule:
        scramble_padding(mixed, g)
        out = {}
        for r, runner in (("plain", plain), ("mixed", mixed)):
            ss = [seqs[r][k] for k, _ in plan]
            ns = [1 if n is None else n for _, n in plan]
            out[r] = run_step(runner, ss, ns)
        assert torch.isfinite(out["mixed"]).all()
        err = float((out["mixed"] - out["plain"]).abs().max() / out["plain"].abs().max())
        assert err < 1e-5, f"step {plan}: relative error {err:.3g}"
        sampled = [k for k, _ in plan if seqs["plain"][k].num_computed == seqs["plain"][k].num_tokens]
        for k, tok in zip(sampled, out["plain"].argmax(-1).tolist(), strict=True):
            for r in ("plain", "mixed"):
                seqs[r][k].output_ids.append(tok)
    assert mixed.mixed_graph_steps - steps_before == 4          # the four steps with prompt tokens
    # buckets 128, 64, 192, 192: whole up to 64 takes one of them, whole everywhere all four
    assert mixed.whole_graph_steps - whole_before == {0: 0, 64: 1, 192: 4}[whole_max_tokens]
    for lp, lm in zip(plain.cache.layers, mixed.cache.layers):    # and the caches hold the same entries
        for name in ("comp_kv", "index_k", "comp_carry_kv", "index_carry_kv"):
            a, b = getattr(lp, name), getattr(lm, name)
            if a is not None:
                assert torch.allclose(a.nan_to_num(7.0), b.nan_to_num(7.0), rtol=1e-5, atol=1e-5), name


def test_a_step_beyond_the_largest_bucket_runs_the_plain_forward(model):
    runner = new_runner(model, mixed=True)
    eager_before, mixed_before = runner.eager_steps, runner.mixed_graph_steps
    logits = run_step(runner, [Seq("x", list(range(2, 202)))], [200])
    assert torch.isfinite(logits).all()
    assert runner.eager_steps == eager_before + 1 and runner.mixed_graph_steps == mixed_before
    assert runner.mixed.bucket(200) is None and runner.mixed.bucket(193) is None and runner.mixed.bucket(65) == 128


def test_a_piece_that_replays_differently_from_its_eager_run_disables_the_graphs(model, monkeypatch):
    """The check at preparation compares each replayed piece with its eager run (a graph that captured a stale
    pointer or a host-dependent branch would differ): here the replay is made to drift."""
    import dsv4.engine.mixed_graphs as mg

    real = mg._rebinder

    def drifting(piece, stages):
        run = real(piece, stages)

        def drift():
            run()
            piece.h.add_(0.5)
        return drift

    monkeypatch.setattr(mg, "_rebinder", drifting)
    cache = KVCache(model.cfg, num_blocks=4, block_size=128, max_seqs=2, device=torch.device("cpu"),
                    dtype=torch.float32)
    graphs = MixedGraphs(model, cache.layers, torch.device("cpu"), [16], capture=False)
    with pytest.raises(RuntimeError, match="replays differently from its eager run"):
        graphs.prepare()
    assert graphs.bucket(10) is None                 # nothing left to replay: those steps run eagerly


def test_mixed_inputs_give_every_token_its_sequence_and_pad_with_row_zero(model):
    """MixedInputs (whole-step buckets): one decode-style row per token with its sequence's block tables, the
    window slot of its own position, the last token of each sampling sequence as a logits row, and padding rows
    that repeat row 0 (so they write what row 0 writes)."""
    from dsv4.engine.decode_inputs import LOGITS_ROW, POSITION, SLOT, STATE, TOKEN, MixedInputs

    cache = KVCache(model.cfg, num_blocks=8, block_size=128, max_seqs=4, device=torch.device("cpu"),
                    dtype=torch.float32)
    a, b = Seq("a", list(range(2, 202))), Seq("b", [5, 6, 7], output_ids=[9], num_computed=3)
    for s, n in ((a, 150), (b, 1)):
        cache.add(s.request_id)
        cache.grow(s.request_id, s.num_computed + n)
    x = MixedInputs.build([a, b], [150, 1], cache, padded=160, width=8)
    assert x.num_tokens == 151 and x.sampling == [1]                 # a's chunk ends mid-prompt: only b samples
    assert x.i64[TOKEN, :151].tolist() == list(range(2, 152)) + [9]
    assert x.i64[POSITION, :151].tolist() == list(range(150)) + [3]
    want_slots = cache.window_slots("a", 0, 150) + cache.window_slots("b", 3, 4)
    assert x.i64[SLOT, :151].tolist() == want_slots
    assert set(x.i64[STATE, :150].tolist()) == {cache.slot("a")} and x.i64[STATE, 150] == cache.slot("b")
    assert x.i64[LOGITS_ROW].tolist() == [150] + [0] * 159
    table_a = cache.window.block_table("a")
    assert x.i32[0, 149, :len(table_a)].tolist() == table_a and (x.i32[0, 149, len(table_a):] == -1).all()
    assert (x.i64[:LOGITS_ROW, 151:] == x.i64[:LOGITS_ROW, :1]).all() and (x.i32[:, 151:] == x.i32[:, :1]).all()
    with pytest.raises(ValueError, match="does not fit"):
        MixedInputs.build([a, b], [150, 1], cache, padded=128, width=8)
