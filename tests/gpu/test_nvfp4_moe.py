"""NVFP4 grouped MoE on the GPU against TorchOps.moe on the dequantised weights (ragged loads included)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # module-level skip: CPU CI reports these as skipped, never as passed
    pytest.skip("no CUDA device: the CuTe DSL kernels need a Hopper GPU", allow_module_level=True)

from dsv4.ops.torch_ops import TorchOps  # noqa: E402
from dsv4_kernels import nvfp4_moe as MO  # noqa: E402
from tests.gpu.moe_helpers import make_experts, poison_allocator  # noqa: E402

DEV = torch.device("cuda")


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("E,D,I,topk", [(8, 128, 64, 2), (32, 1024, 512, 6), (8, 4096, 2048, 6)])
@pytest.mark.parametrize("T", [1, 3, 8, 64, 300])
@pytest.mark.parametrize("routing", ["random", "one_expert", "skewed"])
def test_moe_against_torch(E, D, I, topk, T, routing):
    gen = torch.Generator(device=DEV).manual_seed(E * 1000 + T + len(routing))
    w1, w2, w3 = make_experts(E, D, I, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    ref_ops = TorchOps(DEV, torch.bfloat16)
    ref_ex = ref_ops.prepare_experts(w1, w2, w3)
    x = (torch.randn(T, D, device=DEV, generator=gen) * 2).to(torch.bfloat16)
    if routing == "random":
        ids = torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)])
    elif routing == "one_expert":      # every token's first choice is expert 0; expert E-1 gets nothing
        ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long, device=DEV),
                                      1 + torch.randperm(E - 2, device=DEV, generator=gen)[:topk - 1]])
                           for _ in range(T)])
    else:                               # only the first topk + 1 experts are used
        ids = torch.stack([torch.randperm(topk + 1, device=DEV, generator=gen)[:topk] for _ in range(T)])
    w = torch.rand(T, topk, device=DEV, generator=gen) + 0.1
    w = w / w.sum(-1, keepdim=True) * 1.5
    for limit in (10.0, 0.0):
        poison_allocator()
        y = MO.nvfp4_moe(x, ids, w, ex, limit)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all(), "NaN/Inf in MoE output"
        ref = ref_ops.moe(x, ids, w, ref_ex, limit)
        err = rel_err(y, ref)
        assert err < 1e-2, f"E={E} D={D} I={I} T={T} routing={routing} limit={limit}: relative error {err:.3e}"


def test_moe_all_tokens_one_expert_and_graph():
    E, D, I, topk = 8, 1024, 512, 1
    gen = torch.Generator(device=DEV).manual_seed(7)
    w1, w2, w3 = make_experts(E, D, I, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    ref_ops = TorchOps(DEV, torch.bfloat16)
    ref_ex = ref_ops.prepare_experts(w1, w2, w3)
    T = 200
    x = torch.randn(T, D, device=DEV, generator=gen).to(torch.bfloat16)
    ids = torch.full((T, topk), 5, dtype=torch.long, device=DEV)
    w = torch.ones(T, topk, device=DEV)
    MO.warmup(ex, [T], topk, 10.0)
    y = MO.nvfp4_moe(x, ids, w, ex, 10.0)
    assert rel_err(y, ref_ops.moe(x, ids, w, ref_ex, 10.0)) < 1e-2
    # CUDA graph: routing changes between replays without recompiling or syncing
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = MO.nvfp4_moe(x, ids, w, ex, 10.0)
    ids.copy_(torch.randint(0, E, (T, topk), device=DEV, generator=gen))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, ref_ops.moe(x, ids, w, ref_ex, 10.0)) < 1e-2


@pytest.mark.parametrize("T,topk,E,ids_dtype,w_dtype,ks", [
    (1, 6, 32, torch.int64, torch.float32, None), (2, 6, 8, torch.int32, torch.bfloat16, None),
    (10, 6, 32, torch.int64, torch.float32, (4, 2)), (64, 1, 8, torch.int64, torch.float32, None),
    (16, 4, 8, torch.int64, torch.float32, (2, 4)), (5, 6, 64, torch.int64, torch.float32, (1, 1))])
def test_moe_decode_path(T, topk, E, ids_dtype, w_dtype, ks):
    """The in-kernel-routing decode path (A <= 64) against torch, with forced K splits and id/weight dtypes."""
    D, I = 1024, 512
    gen = torch.Generator(device=DEV).manual_seed(T * 31 + topk + E)
    w1, w2, w3 = make_experts(E, D, I, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    ref_ops = TorchOps(DEV, torch.bfloat16)
    ref_ex = ref_ops.prepare_experts(w1, w2, w3)
    x = (torch.randn(T, D, device=DEV, generator=gen) * 2).to(torch.bfloat16)
    if topk == 1 and T == 64:
        ids = torch.full((T, 1), 3, dtype=torch.long, device=DEV)          # all 64 assignments on one expert
    else:
        ids = torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)])
    ids = ids.to(ids_dtype)
    w = (torch.rand(T, topk, device=DEV, generator=gen) + 0.1).to(w_dtype)
    old = MO.DECODE_KS, MO.DECODE_MAX_ASSIGN
    try:
        MO.DECODE_KS, MO.DECODE_MAX_ASSIGN = ks, MO.DECODE_LIMIT
        for limit in (10.0, 0.0):
            poison_allocator()
            y = MO.nvfp4_moe(x, ids, w, ex, limit)
            torch.cuda.synchronize()
            assert torch.isfinite(y).all(), "NaN/Inf in MoE output"
            err = rel_err(y, ref_ops.moe(x, ids.long(), w.float(), ref_ex, limit))
            assert err < 1e-2, f"T={T} topk={topk} E={E} ks={ks} limit={limit}: relative error {err:.3e}"
    finally:
        MO.DECODE_KS, MO.DECODE_MAX_ASSIGN = old


def test_moe_sorted_path_small_batch():
    """The sorted (torch routing) path still works where the decode path would be taken."""
    E, D, I, topk, T = 16, 512, 256, 6, 4
    gen = torch.Generator(device=DEV).manual_seed(11)
    w1, w2, w3 = make_experts(E, D, I, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    ref_ops = TorchOps(DEV, torch.bfloat16)
    ref_ex = ref_ops.prepare_experts(w1, w2, w3)
    x = torch.randn(T, D, device=DEV, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)])
    w = torch.rand(T, topk, device=DEV, generator=gen) + 0.1
    MO.SORTED_ONLY = True
    try:
        y = MO.nvfp4_moe(x, ids, w, ex, 10.0)
    finally:
        MO.SORTED_ONLY = False
    assert rel_err(y, ref_ops.moe(x, ids, w, ref_ex, 10.0)) < 1e-2


def test_moe_decode_graph():
    E, D, I, topk, T = 16, 1024, 512, 6, 4
    gen = torch.Generator(device=DEV).manual_seed(12)
    w1, w2, w3 = make_experts(E, D, I, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    ref_ops = TorchOps(DEV, torch.bfloat16)
    ref_ex = ref_ops.prepare_experts(w1, w2, w3)
    x = torch.randn(T, D, device=DEV, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)])
    w = torch.rand(T, topk, device=DEV, generator=gen) + 0.1
    old, MO.DECODE_MAX_ASSIGN = MO.DECODE_MAX_ASSIGN, MO.DECODE_LIMIT
    try:
        MO.warmup(ex, [T], topk, 10.0)
        MO.nvfp4_moe(x, ids, w, ex, 10.0)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = MO.nvfp4_moe(x, ids, w, ex, 10.0)
    finally:
        MO.DECODE_MAX_ASSIGN = old
    for _ in range(3):
        ids.copy_(torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)]))
        x.copy_(torch.randn(T, D, device=DEV, generator=gen).to(torch.bfloat16))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref_ops.moe(x, ids, w, ref_ex, 10.0)) < 1e-2


def test_moe_errors():
    gen = torch.Generator(device=DEV).manual_seed(9)
    w1, w2, w3 = make_experts(2, 128, 64, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    with pytest.raises(ValueError, match="bf16"):
        MO.nvfp4_moe(torch.zeros(2, 128, device=DEV), torch.zeros(2, 1, dtype=torch.long, device=DEV),
                     torch.ones(2, 1, device=DEV), ex, 10.0)


@pytest.mark.parametrize("E,topk", [(256, 6), (32, 6), (64, 2)])
@pytest.mark.parametrize("T", [1, 5, 64, 300])
@pytest.mark.parametrize("routing", ["random", "one_expert", "skewed"])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_sort_kernel_groups_assignments_like_torch(E, topk, T, routing, ids_dtype):
    """dsv4_kernels.moe_sort (one launch) equals the torch bookkeeping exactly: offsets, the stable permutation,
    token rows and weights; outputs poisoned first; empty experts and an expert with every assignment included."""
    gen = torch.Generator(device=DEV).manual_seed(T * 7 + E)
    if routing == "one_expert":
        ids = torch.full((T, topk), E - 1, device=DEV)
    elif routing == "skewed":
        ids = torch.randint(0, 3, (T, topk), device=DEV, generator=gen)
    else:
        ids = torch.randint(0, E, (T, topk), device=DEV, generator=gen)
    ids = ids.to(ids_dtype)
    w = torch.rand((T, topk), device=DEV, generator=gen)
    poison_allocator()
    got = MO._sorted_by_kernel(ids, w, E)
    want = MO._sorted_by_torch(ids, w, E)
    for name, a, b in zip(("offs", "perm", "rows", "wts"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: first difference at {(a != b).nonzero()[:1].tolist()}"


@pytest.mark.parametrize("T", [1, 8, 64])
def test_moe_with_the_sort_kernel_is_bit_identical(T):
    E, D, I, topk = 32, 1024, 512, 6
    gen = torch.Generator(device=DEV).manual_seed(T)
    experts = MO.prepare_nvfp4_experts(*make_experts(E, D, I, gen), DEV)
    x = (torch.randn(T, D, device=DEV, generator=gen)).to(torch.bfloat16)
    ids = torch.randint(0, E, (T, topk), device=DEV, generator=gen)
    w = torch.rand((T, topk), device=DEV, generator=gen)
    a = MO.nvfp4_moe(x, ids, w, experts, 10.0, sort_kernel=True)
    b = MO.nvfp4_moe(x, ids, w, experts, 10.0, sort_kernel=False)
    assert torch.isfinite(a.float()).all() and torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 2, 4, 10])
def test_moe_decode_pdl_chain_is_bit_identical(T):
    """The decode chain with programmatic dependent launch (down's weight loads issued before it waits for the
    SwiGLU kernel) gives bit-identical outputs to the chain without it, eagerly and from a CUDA graph whose routing
    changes between replays."""
    E, D, I, topk = 32, 1024, 512, 6
    gen = torch.Generator(device=DEV).manual_seed(100 + T)
    w1, w2, w3 = make_experts(E, D, I, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    x = torch.randn(T, D, device=DEV, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)])
    w = torch.rand(T, topk, device=DEV, generator=gen) + 0.1
    routings = [torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)])
                for _ in range(3)]
    old = MO.DECODE_PDL, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN
    outs = {}
    try:
        MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN = MO.DECODE_LIMIT, 0     # the three-kernel chain
        for pdl in (False, True):
            MO.DECODE_PDL = pdl
            MO.warmup(ex, [T], topk, 10.0)
            ids.copy_(routings[0])
            eager = MO.nvfp4_moe(x, ids, w, ex, 10.0).clone()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = MO.nvfp4_moe(x, ids, w, ex, 10.0)
            replays = []
            for r in routings:
                ids.copy_(r)
                out.fill_(float("nan"))
                g.replay()
                torch.cuda.synchronize()
                assert torch.isfinite(out).all()
                replays.append(out.clone())
            assert torch.equal(replays[0], eager)
            outs[pdl] = replays
    finally:
        MO.DECODE_PDL, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN = old
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a, b), "PDL changed the MoE decode output"
