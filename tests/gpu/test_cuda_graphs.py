"""Decode CUDA graphs on the GPU: captured at engine start, replayed for every decode batch up to the largest
bucket, and as good as the eager step they replace: the same kernels and launch plans, except that a batch padded
to its bucket size runs cuBLAS (the BF16 projections) at a different M, whose algorithm choice may round
differently (logprobs measured up to 0.03 apart). On random weights that can flip a near-tie late in a sequence
(seen once in 5 x 40 tokens), so: logprobs within 0.05 up to any divergence, none in the first 8 tokens, at most
one sequence of five diverging at all."""

from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI runs the same decode step eagerly (tests/unit/test_decode_step.py)",
                allow_module_level=True)

from dsv4.checkpoint.presets import PRESETS  # noqa: E402
from dsv4.checkpoint.writer import make_checkpoint  # noqa: E402
from dsv4.config import EngineConfig  # noqa: E402
from dsv4.engine.engine import Engine  # noqa: E402
from dsv4.engine.params import SamplingParams  # noqa: E402
from tests.unit.engine_runs import Seq  # noqa: E402  (the sequence fields ModelRunner reads)

PROMPT_LENGTHS = (1, 17, 126, 300, 700)   # 126: the first ratio-128 window closes while decoding
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def small3(tmp_path_factory):
    """`small` per-head dims (head_dim 512, 16 heads, indexer 64x128), 3 layers: window, CSA, HCA."""
    return make_checkpoint(PRESETS["small"](3), tmp_path_factory.mktemp("small3"), fmt="nvfp4", seed=3)


def engine(path, **kw) -> Engine:
    return Engine(EngineConfig(checkpoint=str(path), device="cuda", ops_backend="cute", max_num_seqs=8,
                               max_model_len=2048, num_kv_blocks=64, **kw))


def run(e: Engine, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    streams = [e.add_request(f"r{i}", prompt_token_ids=p, params=params) for i, p in enumerate(prompts)]
    return [collect(s) for s in streams]


def collect(outputs) -> tuple[list[int], list[float]]:
    """(token ids, logprobs) of one request's deltas; none may carry an error."""
    ids, lps = [], []
    for o in outputs:
        assert o.error is None, o.error
        ids += o.token_ids
        lps += o.logprobs or []
    return ids, lps


def cute_model(path):
    """The checkpoint's model on CuteOps, for runners of its own."""
    from dsv4.checkpoint.loader import load_checkpoint
    from dsv4.model.deepseek_v4 import DeepseekV4Model
    from dsv4.ops import select_ops

    dev = torch.device("cuda")
    ckpt = load_checkpoint(str(path), progress=False)
    ops = select_ops("cute", dev, torch.bfloat16)
    ops.reserve_positions(2048)
    return DeepseekV4Model(ckpt.config, ckpt.tensors, ops, dev, torch.bfloat16), dev


def execute(runner, seqs: dict, plan: list[tuple[str, int]]) -> torch.Tensor:
    """One step of `plan` ((sequence, tokens) pairs) on `runner`, its cache grown first -> fp32 logits."""
    from dsv4.engine.scheduler import ScheduledStep
    step = ScheduledStep(seqs=[seqs[k] for k, _ in plan], num_tokens=[n for _, n in plan])
    for s, n in zip(step.seqs, step.num_tokens):
        if s.request_id not in runner.cache:
            runner.cache.add(s.request_id)
        runner.cache.grow(s.request_id, s.num_computed + n)
    return runner.execute(step)[0].float()


@pytest.fixture(scope="module")
def prompts(small3):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(2, 500, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def test_graphs_replay_exactly_what_eager_decode_computes(small3, prompts):
    graphs = engine(small3)
    try:
        assert graphs.stats().cuda_graph_sizes == (1, 2, 4, 8), "capture failed: see the engine log"
        got = run(graphs, prompts)
        st = graphs.stats()
        assert st.graph_steps > NEW_TOKENS - 5, f"only {st.graph_steps} of {st.steps} steps replayed a graph"
        assert st.kv_blocks_in_use == 0
    finally:
        graphs.shutdown()
    eager = engine(small3, enforce_eager=True)
    try:
        assert eager.stats().cuda_graph_sizes == ()
        want = run(eager, prompts)
    finally:
        eager.shutdown()
    _assert_close_decoding(got, want, "graph", "eager")


def _assert_close_decoding(got, want, a: str, b: str) -> None:
    identical = 0
    for (ids, lps), (wids, wlps) in zip(got, want):
        assert len(ids) == len(wids) == NEW_TOKENS
        same = next((k for k, (x, y) in enumerate(zip(ids, wids)) if x != y), NEW_TOKENS)
        identical += same == NEW_TOKENS
        assert same >= 8, f"{a} and {b} decoding diverge at token {same}"
        worst = max(abs(x - y) for x, y in zip(lps[:same], wlps[:same]))
        assert worst < 0.05, f"logprob differs by {worst:.4f} before any divergence"
    # random weights leave near-ties that a different cuBLAS algorithm (padded M) can flip late in a sequence
    assert identical >= len(want) - 1, f"only {identical} of {len(want)} sequences identical"


def test_async_scheduling_decodes_what_one_step_at_a_time_decodes(small3, prompts):
    """Graph steps launched before the previous step's tokens are read take those tokens from the device."""
    outs, stats = {}, {}
    for mode in (True, False):
        e = engine(small3, async_scheduling=mode)
        try:
            outs[mode] = run(e, prompts)
            stats[mode] = e.stats()
        finally:
            e.shutdown()
    assert stats[True].overlapped_steps > NEW_TOKENS // 2 and stats[False].overlapped_steps == 0
    assert stats[True].graph_steps > NEW_TOKENS - 5
    _assert_close_decoding(outs[True], outs[False], "async", "sync")


def test_deferred_admission_with_graphs(small3, prompts):
    """With graphs a late request may wait (up to 8 decode steps) for company; outputs unchanged."""
    e = engine(small3, waiting_served_ratio=10.0)
    e.scheduler.min_expected_arrivals = 0.0     # defer even these few arrivals
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
        first = e.add_request("first", prompt_token_ids=prompts[0], params=params)
        it = iter(first)
        head = next(it)
        late = [e.add_request(f"late{i}", prompt_token_ids=p, params=params) for i, p in enumerate(prompts[1:])]
        ids0 = head.token_ids + [t for o in it for t in o.token_ids]
        lates = [[t for o in s for t in o.token_ids] for s in late]
        assert e.scheduler.num_deferred_steps > 0
    finally:
        e.shutdown()
    ref = engine(small3, max_waiting_steps=0)
    try:
        want = run(ref, prompts)
    finally:
        ref.shutdown()
    assert [len(x) for x in [ids0] + lates] == [NEW_TOKENS] * len(prompts)
    assert sum(x == w[0] for x, w in zip([ids0] + lates, want)) >= len(prompts) - 1


def test_fp8_cache_on_the_gpu_runs_torch_attention_ops_inside_the_graphs(small3, prompts):
    """The FP8 cache rows are read and written by torch ops (no GPU kernels for them yet); their decode path works
    from the device tables, so the step is still captured. The cute engine then decodes what the torch-ops engine
    with the same cache decodes (NVFP4 kernels vs dequantised matmuls can flip an FP8 rounding: early tokens only)."""
    e = engine(small3, kv_cache_dtype="fp8_e4m3")
    try:
        assert e.stats().cuda_graph_sizes == (1, 2, 4, 8), "capture failed: see the engine log"
        got = run(e, prompts[:3])
        assert e.stats().graph_steps > NEW_TOKENS - 5
    finally:
        e.shutdown()
    t = Engine(EngineConfig(checkpoint=str(small3), device="cuda", ops_backend="torch", max_num_seqs=8,
                            max_model_len=2048, num_kv_blocks=64, kv_cache_dtype="fp8_e4m3"))
    try:
        want = run(t, prompts[:3])
    finally:
        t.shutdown()
    for (ids, _), (wids, _) in zip(got, want):
        assert len(ids) == NEW_TOKENS and next((k for k, (x, y) in enumerate(zip(ids, wids)) if x != y), 99) >= 4


def test_batches_beyond_the_largest_graph_run_eagerly(small3, prompts):
    e = engine(small3, cuda_graph_max_batch=2)
    try:
        assert e.stats().cuda_graph_sizes == (1, 2)
        out = run(e, prompts)          # 5 at once: eager until only 2 remain
        assert all(len(ids) == NEW_TOKENS for ids, _ in out)
    finally:
        e.shutdown()


def run_staggered(e: Engine, prompts):
    """Each request arrives once the one before it has produced a token, so most steps with prompt tokens also
    carry decode rows (the load shape of a server)."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    started = []
    for i, p in enumerate(prompts):
        it = iter(e.add_request(f"s{i}", prompt_token_ids=p, params=params))
        started.append((next(it), it))
    return [collect(itertools.chain([first], it)) for first, it in started]


def test_steps_with_prompt_tokens_replay_piecewise_graphs_as_good_as_eager(small3, prompts):
    """Prompts chunked 256 tokens a step next to decode rows: every such step replays the piecewise graphs; both
    engines see the same step compositions, so they differ only by the padded GEMM M (as the decode graphs do)."""
    outs, stats = {}, {}
    for eager in (False, True):
        e = engine(small3, max_num_batched_tokens=256, enforce_eager=eager)
        try:
            assert eager or e.runner.mixed is not None, "mixed-step capture failed: see the engine log"
            outs[eager] = run(e, prompts)
            stats[eager] = e.stats()
            assert stats[eager].kv_blocks_in_use == 0
        finally:
            e.shutdown()
    assert stats[False].mixed_graph_steps >= 5 and stats[True].mixed_graph_steps == 0
    _assert_close_decoding(outs[False], outs[True], "piecewise graphs", "eager")


def test_staggered_arrivals_run_mixed_steps_from_graphs_without_errors(small3, prompts):
    """The server's load shape: each request arrives while the earlier ones decode. (Outputs are compared in the
    lockstep test below: here admission timing, and so each step's rows, differ from run to run.)"""
    e = engine(small3)
    try:
        out = run_staggered(e, prompts)
        st = e.stats()
        assert [len(ids) for ids, _ in out] == [NEW_TOKENS] * len(prompts)
        assert st.mixed_graph_steps >= len(prompts) - 1, f"{st.mixed_graph_steps} mixed-step graph replays"
        assert st.kv_blocks_in_use == 0
    finally:
        e.shutdown()


@pytest.mark.parametrize("graph_compressor,whole", [(False, 0), (True, 0), (True, 64), (True, 256)],
                         ids=["compressor-eager", "compressor-in-graphs", "whole-up-to-64", "whole-everywhere"])
def test_mixed_step_pieces_compute_what_the_plain_forward_computes(small3, graph_compressor, whole):
    """Lockstep, same model, two caches: prefill chunks next to decode rows in several buckets, padding rows
    scrambled before each step; logits and compressed caches agree (BF16, padded GEMM M: loose tolerance). With
    `graph_compressor` the compressors run inside the captured pieces from fixed-size padded plans; buckets up to
    `whole` tokens replay the whole step as one graph (per-token decode tables, MixedInputs)."""
    from dsv4.engine.kv_cache import KVCache
    from dsv4.engine.mixed_graphs import MixedGraphs
    from dsv4.engine.runner import ModelRunner

    model, dev = cute_model(small3)
    runners = []
    for mixed in (False, True):
        cache = KVCache(model.cfg, 32, 128, 6, dev, torch.bfloat16)
        graphs = None
        if mixed:
            graphs = MixedGraphs(model, cache.layers, dev, [16, 64, 128, 192, 256],
                                 graph_compressor=graph_compressor, whole_max_tokens=whole, max_model_len=2048,
                                 block_size=128, max_rows=6)
            graphs.prepare()
        runners.append(ModelRunner(model, cache, dev, 2048, mixed=graphs))
    plain, mixed = runners
    g = torch.Generator().manual_seed(5)
    lens = {"a": 125, "b": 3, "c": 40, "d": 300, "e": 9}
    prompts = {k: torch.randint(2, 500, (n,), generator=g).tolist() for k, n in lens.items()}
    seqs = [{k: Seq(k, list(p)) for k, p in prompts.items()} for _ in runners]
    schedule = [[("a", 125), ("b", 3)], [("a", 1), ("b", 1), ("c", 40)], [("a", 1), ("b", 1), ("c", 1), ("d", 150)],
                [("a", 1), ("b", 1), ("c", 1), ("d", 150), ("e", 9)], [("a", 1), ("d", 1), ("e", 1)]]
    for plan in schedule:
        for b in mixed.mixed._buckets.values():
            b.token_ids.random_(0, 500)
            b.positions.random_(0, 2048)
        outs = [execute(r, ss, plan) for r, ss in zip(runners, seqs)]
        torch.cuda.synchronize()
        want, got = outs
        assert torch.isfinite(got).all()
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
        assert cos > 0.999, f"step {plan}: min logits cosine {cos:.5f}"
        sampled = [k for k, _ in plan if seqs[0][k].num_computed == seqs[0][k].num_tokens]
        for k, tok in zip(sampled, want.argmax(-1).tolist(), strict=True):
            for ss in seqs:
                ss[k].output_ids.append(tok)
    assert mixed.mixed_graph_steps == 4
    assert mixed.whole_graph_steps == {0: 0, 64: 1, 256: 4}[whole]      # buckets 128, 64, 192, 192
    for lp, lm in zip(plain.cache.layers, mixed.cache.layers):
        for name in ("comp_kv", "index_k", "comp_carry_kv", "index_carry_kv"):
            a, b = getattr(lp, name), getattr(lm, name)
            if a is not None:
                assert torch.allclose(a.float(), b.float(), rtol=0.05, atol=0.05), name


def test_side_streams_decode_what_one_stream_decodes(small3, prompts, monkeypatch):
    """CuteOps.concurrently (decode's independent chains on side streams, inside the graphs) changes when kernels run,
    not what they compute: the same tokens, and logprobs equal up to float noise, as with every kernel on one stream."""
    results = {}
    for n in ("0", "2"):
        monkeypatch.setenv("DSV4_CUTE_STREAMS", n)
        e = engine(small3)
        try:
            assert e.stats().cuda_graph_sizes == (1, 2, 4, 8), "capture failed: see the engine log"
            results[n] = run(e, prompts)
            assert e.stats().kv_blocks_in_use == 0
        finally:
            e.shutdown()
    for (ids0, lp0), (ids2, lp2) in zip(results["0"], results["2"]):
        assert ids0 == ids2
        assert max(abs(a - b) for a, b in zip(lp0, lp2)) <= 1e-4


def test_the_pdl_chain_computes_the_bits_of_kernels_launched_one_after_another(small3):
    """Programmatic dependent launch along the decode chain (dsv4_kernels.pdl: each kernel launched while its
    predecessor runs, waiting in griddepcontrol.wait before it reads or writes) changes when kernels start, not what
    they compute. Lockstep, one model, two caches: decode graphs captured with the chain and without it, the same
    steps (eager prompt steps, then 24 decode steps of 5 sequences: the 8-row graph), and the logits bit-equal at
    every step. A kernel that read its input before the wait would race with its predecessor and differ.
    (Engines cannot show this: their steps batch by arrival timing, and a different batch rounds differently.)"""
    import dsv4_kernels.pdl as pdl
    from dsv4.engine.cuda_graphs import DecodeGraphs
    from dsv4.engine.kv_cache import KVCache
    from dsv4.engine.runner import ModelRunner

    assert pdl.MAX_TOKENS >= 8, "the 8-row graph must take the chain for this test to mean anything"
    model, dev = cute_model(small3)
    runners = {}
    for chain in (True, False):
        pdl.CHAIN = chain
        try:
            cache = KVCache(model.cfg, 64, 128, 6, dev, torch.bfloat16)
            graphs = DecodeGraphs(model, cache.layers, dev, [1, 2, 4, 8], 2048, 128)
            graphs.capture()
            runners[chain] = ModelRunner(model, cache, dev, 2048, graphs=graphs)
        finally:
            pdl.CHAIN = True
    g = torch.Generator().manual_seed(7)
    prompts = {f"r{i}": torch.randint(2, 500, (n,), generator=g).tolist() for i, n in enumerate(PROMPT_LENGTHS)}
    seqs = {chain: {k: Seq(k, list(p)) for k, p in prompts.items()} for chain in runners}
    schedule = [[(k, len(p))] for k, p in prompts.items()] + [[(k, 1) for k in prompts]] * 24
    for n, plan in enumerate(schedule):
        logits = {}
        for chain, r in runners.items():
            pdl.CHAIN = chain          # eager steps read it at launch; the graphs were captured with it
            try:
                logits[chain] = execute(r, seqs[chain], plan)
            finally:
                pdl.CHAIN = True
        torch.cuda.synchronize()
        assert torch.isfinite(logits[False]).all()
        assert torch.equal(logits[True], logits[False]), (
            f"step {n} ({len(plan)} rows): max |diff| {(logits[True] - logits[False]).abs().max().item()}")
        for k, tok in zip([k for k, _ in plan], logits[False].argmax(-1).tolist(), strict=True):
            for chain in runners:
                seqs[chain][k].output_ids.append(tok)
    assert runners[True].graph_steps == runners[False].graph_steps >= 20
