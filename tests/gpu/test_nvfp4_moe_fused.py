"""The one-launch MoE decode (gate_up + SwiGLU + down in one grid, CTAs ordered by a ticket counter) against the
three-kernel chain and against TorchOps.moe."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # module-level skip: CPU CI reports these as skipped, never as passed
    pytest.skip("no CUDA device: the CuTe DSL kernels need a Hopper GPU", allow_module_level=True)

from dsv4.ops.torch_ops import TorchOps  # noqa: E402
from dsv4_kernels import nvfp4_moe as MO  # noqa: E402
from tests.gpu.moe_helpers import make_experts, poison_allocator  # noqa: E402
from dsv4_kernels import nvfp4_moe_fused as F  # noqa: E402

DEV = torch.device("cuda")


def routing(kind, T, topk, E, gen):
    if kind == "one_expert":
        return torch.full((T, topk), 3, dtype=torch.long, device=DEV)
    if kind == "two_experts":       # every slot after the first two repeats an expert (duplicate-slot CTAs exit)
        return torch.stack([torch.tensor([1, 5] * ((topk + 1) // 2), device=DEV)[:topk] for _ in range(T)])
    return torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)])


def run(ex, x, ids, w, limit, fused: bool):
    """One MoE call on the fused path or on the chain with gate_up unsplit and the fused path's down split."""
    old = MO.DECODE_KS, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN
    try:
        MO.DECODE_MAX_ASSIGN = MO.DECODE_LIMIT
        if fused:
            MO.DECODE_KS, MO.DECODE_FUSED_MAX_ASSIGN = None, MO.DECODE_LIMIT
        else:
            ks2 = F.fused_plan(ex, ids.numel(), ids.shape[1])[1]
            MO.DECODE_KS, MO.DECODE_FUSED_MAX_ASSIGN = (1, ks2), 0
        poison_allocator()
        y = MO.nvfp4_moe(x, ids, w, ex, limit)
        torch.cuda.synchronize()
        return y
    finally:
        MO.DECODE_KS, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN = old


@pytest.mark.parametrize("E,D,I,topk,T,kind", [
    (32, 1024, 512, 6, 1, "random"), (32, 1024, 512, 6, 2, "random"), (32, 1024, 512, 6, 4, "random"),
    (32, 1024, 512, 6, 10, "random"), (8, 1024, 512, 6, 5, "two_experts"), (8, 512, 256, 1, 64, "one_expert"),
    (8, 512, 256, 2, 32, "random"), (16, 4096, 2048, 6, 1, "random"), (16, 4096, 2048, 6, 2, "random"),
    (8, 7168, 3072, 6, 1, "random"), (64, 256, 128, 8, 8, "random")])
@pytest.mark.parametrize("ids_dtype,w_dtype", [(torch.int64, torch.float32), (torch.int32, torch.bfloat16)])
def test_fused_decode_is_bit_identical_to_the_chain_and_close_to_torch(E, D, I, topk, T, kind, ids_dtype, w_dtype):
    gen = torch.Generator(device=DEV).manual_seed(E * 7 + D + I + topk * 3 + T)
    w1, w2, w3 = make_experts(E, D, I, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    ref_ops = TorchOps(DEV, torch.bfloat16)
    ref_ex = ref_ops.prepare_experts(w1, w2, w3)
    x = (torch.randn(T, D, device=DEV, generator=gen) * 2).to(torch.bfloat16)
    ids = routing(kind, T, topk, E, gen).to(ids_dtype)
    w = (torch.rand(T, topk, device=DEV, generator=gen) + 0.1).to(w_dtype)
    for limit in (10.0, 0.0):
        fused = run(ex, x, ids, w, limit, fused=True)
        chain = run(ex, x, ids, w, limit, fused=False)
        assert torch.isfinite(fused.float()).all(), "NaN/Inf in the fused MoE output"
        assert torch.equal(fused, chain), (f"fused != chain at {(fused != chain).nonzero()[:3].tolist()} "
                                           f"(T={T} topk={topk} {kind} limit={limit})")
        ref = ref_ops.moe(x, ids.long(), w.float(), ref_ex, limit)
        err = float((fused.float() - ref.float()).norm() / ref.float().norm())
        assert err < 1e-2, f"relative error {err:.3e} against TorchOps.moe"
    assert int(F._counters(ex, DEV).abs().sum()) == 0, "the last CTA must leave the counters zeroed"


def test_fused_decode_in_a_cuda_graph_with_changing_routing():
    """Back-to-back replays (the counters are reset by each launch's last CTA) with the routing changed between
    them each equal an eager chain call on the same routing."""
    E, D, I, topk, T = 32, 1024, 512, 6, 2
    gen = torch.Generator(device=DEV).manual_seed(5)
    w1, w2, w3 = make_experts(E, D, I, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    x = torch.randn(T, D, device=DEV, generator=gen).to(torch.bfloat16)
    w = torch.rand(T, topk, device=DEV, generator=gen) + 0.1
    routings = [routing("random", T, topk, E, gen) for _ in range(4)] + [routing("two_experts", T, topk, E, gen)]
    ids = routings[0].clone()
    expected = [run(ex, x, r, w, 10.0, fused=False).clone() for r in routings]
    old = MO.DECODE_KS, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN
    try:
        MO.DECODE_KS, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN = None, MO.DECODE_LIMIT, MO.DECODE_LIMIT
        MO.warmup(ex, [T], topk, 10.0)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = [MO.nvfp4_moe(x, ids, w, ex, 10.0) for _ in range(3)]     # three launches per replay
        for r, want in zip(routings, expected):
            ids.copy_(r)
            for o in outs:
                o.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            for o in outs:
                assert torch.equal(o, want), "a graph replay of the fused MoE differs from the eager chain"
    finally:
        MO.DECODE_KS, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN = old
    assert int(F._counters(ex, DEV).abs().sum()) == 0


def test_fused_decode_rejects_more_than_64_assignments():
    gen = torch.Generator(device=DEV).manual_seed(1)
    ex = MO.prepare_nvfp4_experts(*make_experts(4, 256, 128, gen), DEV)
    x = torch.randn(11, 256, device=DEV).to(torch.bfloat16)
    ids = torch.zeros(11 * 6, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="at most 64 assignments"):
        F.moe_decode_fused(x, ids, torch.ones(66, device=DEV), ex, 10.0, 6, False)
