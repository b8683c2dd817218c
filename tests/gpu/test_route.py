"""The MoE gate kernel (CuteOps.route, dsv4_kernels.moe_route) vs TorchOps.route: every score function, hash and
top-k layers, decode and prefill token counts, exact ties, and a CUDA-graph replay.

Expert choice is compared where it is well defined: tokens whose biased scores around the k-th place are more than
TIE_GAP apart (the kernel's exp/log1p may differ from torch's by an ulp or two, which can swap a near-tie).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI compiles the kernel (tests/unit/test_route_kernel_compile.py)",
                allow_module_level=True)

from dsv4.ops import cute_route as cr  # noqa: E402
from dsv4.ops.cute import CuteOps  # noqa: E402
from dsv4.ops.cute_route import CuteRouteMixin  # noqa: E402
from dsv4.ops.torch_ops import TorchOps  # noqa: E402
from dsv4_kernels.mhc_pre import num_chunks  # noqa: E402

FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
TIE_GAP = 1e-5
D = 256
VOCAB = 1000
SCALE = 1.5


def _inputs(T, E, topk, hashed, logit_std, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn((T, D), device="cuda", generator=g).to(torch.bfloat16)
    gate = torch.randn((E, D), device="cuda", generator=g) * (logit_std / D ** 0.5)
    bias = None if hashed else torch.randn(E, device="cuda", generator=g) * 0.1
    tid2eid = torch.randint(0, E, (VOCAB, topk), device="cuda", generator=g) if hashed else None
    tok = torch.randint(0, VOCAB, (T,), device="cuda", generator=g)
    return x, gate, bias, tid2eid, tok


def _scores(x, gate, score_func):
    logits = x.float() @ gate.T
    if score_func == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    return logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)


def _clean_rows(biased, topk):
    """Rows whose top k+1 biased scores are pairwise more than TIE_GAP apart: their id order is well defined."""
    top = biased.double().topk(min(topk + 1, biased.shape[1]), dim=-1).values
    return ((top[:, :-1] - top[:, 1:]) > TIE_GAP).all(-1)


def _by_id(ids, w):
    order = ids.argsort(-1)
    return ids.gather(1, order), w.gather(1, order)


@pytest.fixture(scope="module")
def ops():
    assert issubclass(CuteOps, CuteRouteMixin), "CuteOps must mix in CuteRouteMixin ahead of TorchOps"
    return CuteOps("cuda", torch.bfloat16, fused_glue=True), TorchOps("cuda", torch.bfloat16)


@pytest.mark.parametrize("T", [1, 5, 64, 300])
@pytest.mark.parametrize("E,topk", [(256, 6), (64, 2)])
@pytest.mark.parametrize("score_func", FUNCS)
@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("logit_std", [1.0, 12.0])    # 12: many logits past softplus' threshold of 20
def test_route_matches_torch(ops, T, E, topk, score_func, hashed, logit_std):
    cute_ops, torch_ops = ops
    x, gate, bias, tid2eid, tok = _inputs(T, E, topk, hashed, logit_std, seed=T * 1000 + E + topk)
    assert cr.covers(x, gate, bias, tid2eid, tok, topk, score_func)
    ids, w = cute_ops.route(x, gate, bias, tid2eid, tok, topk, score_func, SCALE)
    want_ids, want_w = torch_ops.route(x, gate, bias, tid2eid, tok, topk, score_func, SCALE)
    assert ids.shape == want_ids.shape == (T, topk) and ids.dtype == torch.int64
    assert w.shape == want_w.shape and w.dtype == torch.float32
    assert torch.isfinite(w).all()
    if hashed:
        assert torch.equal(ids, want_ids)
        assert torch.allclose(w, want_w, rtol=1e-5, atol=1e-6), f"max |diff| {(w - want_w).abs().max().item():.3g}"
        return
    assert ((ids >= 0) & (ids < E)).all()
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "an expert chosen twice"
    scores = _scores(x, gate, score_func)
    clean = _clean_rows(scores + bias, topk)
    assert clean.float().mean() > 0.9, "too many near-ties: the inputs do not test the choice"
    # descending by biased score, so on clean rows the very order matches torch.topk(sorted=True)
    assert torch.equal(ids[clean], want_ids[clean])
    gi, gw = _by_id(ids[clean], w[clean])
    wi, ww = _by_id(want_ids[clean], want_w[clean])
    assert torch.equal(gi, wi)
    assert torch.allclose(gw, ww, rtol=1e-5, atol=1e-6), f"max |diff| {(gw - ww).abs().max().item():.3g}"
    # every row: the weights are the kernel's own ids' scores, normalised as torch does
    want_any = scores.gather(1, ids)
    if score_func != "softmax":
        want_any = want_any / want_any.sum(-1, keepdim=True)
    assert torch.allclose(w, want_any * SCALE, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("score_func", FUNCS)
def test_ties_go_to_the_lower_expert_and_every_output_is_written(score_func):
    """Direct launch on hand-made logits, outputs poisoned first: exact ties resolve to the lower expert index."""
    E, k, T = 64, 6, 9
    g = torch.Generator(device="cuda").manual_seed(5)
    logits = torch.randn((T, E), device="cuda", generator=g) * 0.1
    logits[:, 40] = 3.0
    logits[:, 7] = 3.0              # tied first place: 7 before 40
    logits[:, 50] = 2.0
    logits[:, 13] = 2.0             # tied third place: 13 before 50
    logits[0] = 0.0                 # a row of all-equal scores: experts 0..k-1
    bias = torch.zeros(E, device="cuda")
    ids = torch.full((T, k), -7, dtype=torch.int64, device="cuda")
    w = torch.full((T, k), float("nan"), device="cuda")
    unread = [cr.placeholder((1, k), torch.int64, logits.device), cr.placeholder((1,), torch.int64, logits.device)]
    args = [logits, bias, *unread, ids, w]
    cr._launcher(E, k, score_func, 2.0, False, 0, args)(*args)
    torch.cuda.synchronize()
    assert torch.equal(ids[0], torch.arange(k, device="cuda"))
    assert (ids[1:, :4] == torch.tensor([7, 40, 13, 50], device="cuda")).all()
    rest = logits[1:].clone()
    rest[:, [7, 40, 13, 50]] = -1e9
    assert torch.equal(ids[1:, 4:], rest.topk(k - 4, dim=-1).indices)
    if score_func == "sqrtsoftplus":
        scores = torch.nn.functional.softplus(logits).sqrt()
    else:
        scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    want = scores.gather(1, ids)
    if score_func != "softmax":
        want = want / want.sum(-1, keepdim=True)
    assert torch.allclose(w, want * 2.0, rtol=1e-5, atol=1e-6)


def test_decode_batches_take_the_partials_gate():
    x, gate, _, _, _ = _inputs(cr.GATE_MIX_MAX_TOKENS, 256, 6, False, 1.0, seed=3)
    part, s = cr.gate_logits(x, gate)
    assert s == num_chunks(D) and part.shape == (x.shape[0], s, 257)
    assert torch.allclose(part[:, :, :256].sum(1), x.float() @ gate.T, rtol=1e-4, atol=1e-4)
    logits, s = cr.gate_logits(torch.cat([x, x]), gate)
    assert s == 0 and logits.shape == (2 * x.shape[0], 256)


def test_small_gates_fall_back_to_torch(ops):
    cute_ops, torch_ops = ops
    x, gate, bias, _, tok = _inputs(7, 8, 2, False, 1.0, seed=1)     # E = 8: the test presets
    assert not cr.covers(x, gate, bias, None, tok, 2, "sqrtsoftplus")
    got = cute_ops.route(x, gate, bias, None, tok, 2, "sqrtsoftplus", SCALE)
    want = torch_ops.route(x, gate, bias, None, tok, 2, "sqrtsoftplus", SCALE)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("T", [4, 16])           # the HcMix gate (T <= GATE_MIX_MAX_TOKENS) and cuBLAS's
@pytest.mark.parametrize("hashed", [False, True])
def test_route_replays_in_a_cuda_graph(ops, hashed, T):
    cute_ops, torch_ops = ops
    E, k = 256, 6
    x, gate, bias, tid2eid, tok = _inputs(T, E, k, hashed, 1.0, seed=21)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                       # compile and warm up outside the capture
        cute_ops.route(x, gate, bias, tid2eid, tok, k, "sqrtsoftplus", SCALE)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, w = cute_ops.route(x, gate, bias, tid2eid, tok, k, "sqrtsoftplus", SCALE)
    x2, _, _, _, tok2 = _inputs(T, E, k, hashed, 1.0, seed=22)
    x.copy_(x2)
    tok.copy_(tok2)
    graph.replay()
    torch.cuda.synchronize()
    want_ids, want_w = torch_ops.route(x, gate, bias, tid2eid, tok, k, "sqrtsoftplus", SCALE)
    clean = torch.ones(T, dtype=torch.bool, device="cuda") if hashed else _clean_rows(
        _scores(x, gate, "sqrtsoftplus") + bias, k)
    assert clean.any()
    assert torch.equal(ids[clean], want_ids[clean])
    assert torch.allclose(w[clean], want_w[clean], rtol=1e-5, atol=1e-6)
