"""CuTe indexer_topk (score kernel + unordered top-k on unique sort keys) vs TorchOps.indexer_topk on the GPU: ragged
decode and prefill batches, block tables in random order, NaN-filled pool blocks nobody owns, exact score ties
(duplicated key rows, all-ReLU-zero scores) that must go to the earlier entry."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI only compiles the kernels", allow_module_level=True)

from dsv4.bench_attention_cmd import make_case  # noqa: E402
from dsv4.ops import cute_attention  # noqa: E402
from dsv4.ops.torch_ops import TorchOps  # noqa: E402

REF = TorchOps(device="cuda", dtype=torch.bfloat16)


def _index_pool(case, dk, seed, dup_every=0):
    bs = case.cache.block_size
    nblk = case.cache.swa_kv.shape[0]
    g = torch.Generator(device="cuda").manual_seed(seed)
    pool = torch.randn(nblk, bs // 4, dk, generator=g, device="cuda", dtype=torch.bfloat16)
    used = torch.zeros(nblk, dtype=torch.bool)
    for tab in case.batch.comp_block_tables:
        used[[x for x in tab if x >= 0]] = True
    used[-1] = True
    pool[(~used).to("cuda")] = float("nan")
    if dup_every:
        # duplicate logical entries of every sequence: entry e gets the row of entry e - e % dup_every
        per = bs // 4
        for tab in case.batch.comp_block_tables:
            n = len(tab) * per
            src = torch.arange(n) - torch.arange(n) % dup_every
            t = torch.tensor(tab)
            flat = pool.view(-1, dk)
            flat[(t[torch.arange(n) // per] * per + torch.arange(n) % per).cuda()] = \
                flat[(t[src // per] * per + src % per).cuda()].clone()
    return pool


def _scores(q, w, pool, case):
    """fp64 score of every (token, entry) it may see, -inf elsewhere: [T, n_max]."""
    bs = case.cache.block_size
    per = bs // 4
    pos = case.batch.positions
    n_max = int(((pos + 1) // 4).max())
    out = torch.full((q.shape[0], max(1, n_max)), float("-inf"), dtype=torch.float64, device="cuda")
    flat = pool.view(-1, pool.shape[-1])
    for b in range(case.batch.num_seqs):
        s0, s1 = case.batch.query_start[b], case.batch.query_start[b + 1]
        for t in range(s0, s1):
            n = (int(pos[t]) + 1) // 4
            if n == 0:
                continue
            tab = torch.tensor(case.batch.comp_block_tables[b], device="cuda")
            e = torch.arange(n, device="cuda")
            k = flat[tab[e // per] * per + e % per].double()
            sc = (q[t].double() @ k.T).relu() * w[t].double()[:, None]
            out[t, :n] = sc.sum(0)
    return out


def _check(ctx, new, nh, dk, topk, seed, dup_every=0):
    case = make_case(ctx, new, 1, 64, 0, seed=seed)
    pool = _index_pool(case, dk, seed, dup_every)
    T = case.q.shape[0]
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    q = torch.randn(T, nh, dk, generator=g, device="cuda").to(torch.bfloat16)
    w = torch.randn(T, nh, generator=g, device="cuda") * (dk ** -0.5 * nh ** -0.5)
    ref = REF.indexer_topk(q, w, pool, case.cache.block_size, topk, case.batch)
    out = cute_attention.indexer_topk(q, w, pool, case.cache.block_size, topk, case.batch)
    torch.cuda.synchronize()
    assert out.shape == ref.shape and out.dtype == torch.long
    # the CuTe path returns its selection in no particular order (attention does not need one): compare sets
    assert torch.equal((out >= 0).sum(1), (ref >= 0).sum(1)), "different number of selected entries"
    sc = _scores(q, w, pool, case)
    agree = total = 0
    for t in range(T):
        sel, want = out[t][out[t] >= 0], ref[t][ref[t] >= 0]
        assert sel.unique().numel() == sel.numel(), "duplicate entry selected"
        if not sel.numel():
            continue
        assert int(sel.max()) < (int(case.batch.positions[t]) + 1) // 4, "invisible entry selected"
        v_out = sc[t, sel].sort(descending=True).values
        v_ref = sc[t, want].sort(descending=True).values
        scale = float(v_ref.abs().max()) + 1e-30
        assert float((v_out - v_ref).abs().max()) <= 1e-4 * scale, "selected scores differ beyond rounding"
        agree += int(torch.isin(sel, want).sum())
        total += sel.numel()
    if total:
        assert agree / total >= 0.99, f"only {agree / total:.4f} of the selected entries agree with TorchOps"
    return out


RAGGED = [0, 2, 3, 4, 127, 1000, 4095, 8191]


@pytest.mark.parametrize("nh,dk,topk", [(64, 128, 512), (16, 128, 64), (4, 64, 16)])
def test_indexer_decode_ragged(nh, dk, topk):
    seed = torch.randint(0, 1 << 30, ()).item()
    _check(RAGGED, [1] * len(RAGGED), nh, dk, topk, seed)


def test_indexer_prefill_chunks():
    seed = torch.randint(0, 1 << 30, ()).item()
    _check([0, 100, 1500, 2], [200, 37, 5, 1], 16, 128, 64, seed)


def test_indexer_ties_go_to_earlier_entry():
    """Duplicated key rows give bit-equal scores; with 4 heads ~1/16 of the scores are exactly 0 (every ReLU zero),
    and a top-k of 512 over ~750 visible entries reaches into them."""
    seed = torch.randint(0, 1 << 30, ()).item()
    _check([5000, 900, 63], [1, 1, 2], 16, 128, 64, seed, dup_every=3)
    out = _check([3000, 400], [1, 3], 4, 64, 512, seed + 7)
    assert (out >= 0).any()


def test_indexer_short_context_selects_every_visible_entry():
    """No more entries than top-k: every visible entry is selected without a top-k (and none a query cannot see)."""
    seed = torch.randint(0, 1 << 30, ()).item()
    out = _check([300, 40, 0], [1, 2, 1], 16, 128, 512, seed)
    assert int((out >= 0).sum()) == 301 // 4 + 41 // 4 + 42 // 4 + 1 // 4


def test_mixin_indexer_falls_back():
    class Ops(cute_attention.CuteAttentionMixin, TorchOps):
        pass

    case = make_case([40], [1], 1, 64, 0, seed=2)
    pool = torch.randn(case.cache.swa_kv.shape[0], case.cache.block_size // 4, 32, device="cuda",
                       dtype=torch.bfloat16)
    q = torch.randn(1, 4, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1, 4, device="cuda")
    ops = Ops(device="cuda", dtype=torch.bfloat16)
    out = ops.indexer_topk(q, w, pool, case.cache.block_size, 16, case.batch)   # dk 32: TorchOps path
    assert torch.equal(out, REF.indexer_topk(q, w, pool, case.cache.block_size, 16, case.batch))
