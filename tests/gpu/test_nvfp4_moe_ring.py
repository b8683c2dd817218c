"""The decode chain's kernels with the cp.async weight ring are bit-identical to the register-load kernels."""

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


def run(ex, x, ids, w, limit, ring: bool, pdl: bool, ks=(1, 1)):
    """One MoE call on the decode chain with the given K splits (the same for both variants, so the per-lane sums
    match), with or without the ring."""
    old = MO.DECODE_RING, MO.DECODE_PDL, MO.DECODE_KS, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN
    try:
        MO.DECODE_RING, MO.DECODE_PDL, MO.DECODE_KS = ring, pdl, ks
        MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN = MO.DECODE_LIMIT, 0
        poison_allocator()
        y = MO.nvfp4_moe(x, ids, w, ex, limit)
        torch.cuda.synchronize()
        return y
    finally:
        MO.DECODE_RING, MO.DECODE_PDL, MO.DECODE_KS, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN = old


@pytest.mark.parametrize("E,D,I,topk,T,ks", [
    (32, 1024, 512, 6, 1, (1, 1)), (32, 1024, 512, 6, 2, (1, 1)), (32, 1024, 512, 6, 4, (1, 1)),
    (32, 1024, 512, 6, 10, (1, 1)), (8, 1024, 512, 6, 5, (2, 1)), (8, 512, 256, 1, 64, (1, 1)),
    (16, 4096, 2048, 6, 1, (1, 1)), (16, 4096, 2048, 6, 8, (2, 2)), (8, 7168, 3072, 6, 1, (1, 1)),
    (8, 7168, 3072, 6, 2, (4, 4)), (64, 256, 128, 8, 8, (1, 1))])
@pytest.mark.parametrize("ids_dtype,w_dtype,pdl", [(torch.int64, torch.float32, True),
                                                   (torch.int32, torch.bfloat16, False)])
def test_ring_decode_is_bit_identical_to_the_register_kernels(E, D, I, topk, T, ks, ids_dtype, w_dtype, pdl):
    gen = torch.Generator(device=DEV).manual_seed(E + D + I + topk + T)
    w1, w2, w3 = make_experts(E, D, I, gen)
    ex = MO.prepare_nvfp4_experts(w1, w2, w3, DEV)
    ref_ops = TorchOps(DEV, torch.bfloat16)
    ref_ex = ref_ops.prepare_experts(w1, w2, w3)
    x = (torch.randn(T, D, device=DEV, generator=gen) * 2).to(torch.bfloat16)
    if topk == 1:
        ids = torch.full((T, 1), 3, dtype=torch.long, device=DEV)          # all assignments on one expert
    else:
        ids = torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)])
    ids = ids.to(ids_dtype)
    w = (torch.rand(T, topk, device=DEV, generator=gen) + 0.1).to(w_dtype)
    for limit in (10.0, 0.0):
        a = run(ex, x, ids, w, limit, True, pdl, ks)
        b = run(ex, x, ids, w, limit, False, pdl, ks)
        assert torch.isfinite(a.float()).all(), "NaN/Inf (or unwritten output) from the ring kernels"
        assert torch.equal(a, b), f"ring != register kernels at {(a != b).nonzero()[:3].tolist()}"
        ref = ref_ops.moe(x, ids.long(), w.float(), ref_ex, limit)
        assert float((a.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


def test_ring_decode_in_a_cuda_graph_with_changing_routing():
    E, D, I, topk, T = 32, 1024, 512, 6, 2
    gen = torch.Generator(device=DEV).manual_seed(9)
    ex = MO.prepare_nvfp4_experts(*make_experts(E, D, I, gen), DEV)
    x = torch.randn(T, D, device=DEV, generator=gen).to(torch.bfloat16)
    w = torch.rand(T, topk, device=DEV, generator=gen) + 0.1
    routings = [torch.stack([torch.randperm(E, device=DEV, generator=gen)[:topk] for _ in range(T)])
                for _ in range(4)]
    want = [run(ex, x, r, w, 10.0, False, True).clone() for r in routings]
    ids = routings[0].clone()
    old = MO.DECODE_RING, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN
    try:
        MO.DECODE_RING, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN = True, MO.DECODE_LIMIT, 0
        MO.warmup(ex, [T], topk, 10.0)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = MO.nvfp4_moe(x, ids, w, ex, 10.0)
        for r, expect in zip(routings, want):
            ids.copy_(r)
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expect)
    finally:
        MO.DECODE_RING, MO.DECODE_MAX_ASSIGN, MO.DECODE_FUSED_MAX_ASSIGN = old
