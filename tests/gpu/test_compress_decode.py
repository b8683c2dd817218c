"""The decode compressor kernel (CuteOps.compress_and_store on a decode batch) vs TorchOps' decode path, step by
step across window closings, with CUDA-graph padding rows, NaN-poisoned pool rows nobody may write."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI compiles the kernel (tests/unit/test_attention_kernels_compile.py)",
                allow_module_level=True)

from dsv4.config import RopeConfig  # noqa: E402
from dsv4.ops.base import DecodeTables, ForwardBatch  # noqa: E402
from dsv4.ops.cute import CuteOps  # noqa: E402
from dsv4.ops.torch_ops import TorchOps  # noqa: E402

YARN = RopeConfig(theta=160000.0, original_seq_len=4096, factor=16.0, beta_fast=32.0, beta_slow=1.0)
BS = 128


def _batch(pos: torch.Tensor, slots: torch.Tensor, bt: torch.Tensor) -> ForwardBatch:
    B = pos.shape[0]
    tables = DecodeTables(state_slots=slots, swa_block_tables=bt, comp_block_tables=bt,
                          seq_index=torch.arange(B, dtype=torch.int32, device="cuda"), max_position=4095)
    return ForwardBatch(token_ids=torch.zeros_like(pos), positions=pos, query_start=list(range(B + 1)),
                        context_lens=pos.tolist(), state_slots=slots.tolist(), swa_block_tables=[[0]] * B,
                        comp_block_tables=[[0]] * B, swa_slot_mapping=torch.zeros_like(pos),
                        logits_indices=torch.arange(B, device="cuda"), decode=tables)


@pytest.mark.parametrize("ratio,d,rd", [(4, 512, 64), (128, 512, 64), (4, 128, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_compressor_matches_torch(ratio, d, rd, dtype):
    g = torch.Generator(device="cuda").manual_seed(ratio * 7 + d)
    coff = 2 if ratio == 4 else 1
    B, pad, S, NB = 5, 3, 8, 64
    start = torch.tensor([0, 3, 125, 254, 1000], device="cuda")      # some close a window within 8 steps
    slots = torch.tensor([6, 1, 3, 0, 5], device="cuda")
    bt = torch.randperm(NB, device="cuda", generator=g)[:B * 10].view(B, 10).to(torch.int32)
    ape = torch.randn((ratio, coff * d), device="cuda", generator=g)
    norm = torch.rand(d, device="cuda", generator=g) + 0.5
    state = {}
    for name, ops in (("torch", TorchOps("cuda", dtype)), ("cute", CuteOps("cuda", dtype))):
        ops.reserve_positions(4096)
        gk = torch.Generator(device="cuda").manual_seed(99)
        carry_kv = torch.randn((S, coff * ratio, coff * d), device="cuda", generator=gk)
        carry_s = torch.randn((S, coff * ratio, coff * d), device="cuda", generator=gk)
        carry_s[3, :ratio] = -math.inf           # slot 3: a sequence with no previous window yet
        out = torch.full((NB, BS // ratio, d), float("nan"), device="cuda", dtype=dtype)
        for step in range(8):
            pos = start + step
            kv = torch.randn((B, coff * d), device="cuda", generator=gk).to(dtype)
            sc = torch.randn((B, coff * d), device="cuda", generator=gk).to(dtype)
            idx = torch.cat([torch.arange(B, device="cuda"), torch.zeros(pad, dtype=torch.long, device="cuda")])
            ops.compress_and_store(kv[idx], sc[idx], ape, norm, 1e-6, ratio, YARN, rd, carry_kv, carry_s, out, BS,
                                   _batch(pos[idx], slots[idx], bt[idx]))
        state[name] = (carry_kv, carry_s, out)
    torch.cuda.synchronize()
    (tk, ts, to), (ck, cs, co) = state["torch"], state["cute"]
    written = ~to.isnan()
    assert torch.equal(written, ~co.isnan()), "the kernel wrote other pool rows than the torch path"
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(co[written].float(), to[written].float(), rtol=tol, atol=tol), \
        f"entries differ by {(co[written].float() - to[written].float()).abs().max().item():.3g}"
    assert torch.allclose(ck, tk, rtol=1e-5, atol=1e-5) and torch.equal(cs.isinf(), ts.isinf())
    fin = ~ts.isinf()
    assert torch.allclose(cs[fin], ts[fin], rtol=1e-5, atol=1e-5)
