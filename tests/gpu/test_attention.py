"""CuTe attention kernels vs TorchOps on the GPU: fresh random paged caches, ragged batches, block tables with holes,
NaN-filled pool blocks nobody owns, NaN-poisoned outputs."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI only compiles the kernels (tests/unit/test_attention_kernels_compile.py)",
                allow_module_level=True)

from dsv4.bench_attention_cmd import make_case  # noqa: E402
from dsv4.ops import cute_attention  # noqa: E402
from dsv4.ops.torch_ops import TorchOps  # noqa: E402

REF = TorchOps(device="cuda", dtype=torch.bfloat16)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def _check(case, num_splits=None, tol=1.5e-2, heads_cta=None, part_bf16=None, topk=None, block_n=64, stages=2,
           wgmma=None, cluster=None):
    ref = REF.sparse_attention(case.q, case.cache, case.ratio, case.window, case.topk, case.sink, case.scale,
                               case.batch)
    assert not ref.isnan().any(), "reference produced NaN: the test case is broken"
    launch, result = cute_attention.prepare_sparse_attention(
        case.q, case.cache, case.ratio, case.window, case.topk if topk is None else topk, case.sink, case.scale,
        case.batch, num_splits=num_splits, heads_cta=heads_cta, part_bf16=part_bf16, block_n=block_n, stages=stages,
        wgmma=wgmma, cluster=cluster)
    if wgmma is not None:
        assert launch.wgmma == wgmma
    if cluster is not None:
        assert launch.cluster == cluster
    launch()
    # poison the output the launch writes into, then run again: every element must be written by the kernel
    result().fill_(float("nan"))
    launch()
    out = result()
    torch.cuda.synchronize()
    assert out.shape == ref.shape
    assert not out.isnan().any(), "NaN in the kernel output"
    err = _rel(out, ref)
    assert err < tol, f"relative error {err:.3e}"
    return err


RAGGED = [0, 4, 127, 128, 300, 1000, 4095, 8191]


@pytest.mark.parametrize("ratio", [0, 4, 128])
@pytest.mark.parametrize("heads,wgmma", [(16, None), (64, False), (64, True)])
def test_decode_ragged(ratio, heads, wgmma):
    seed = torch.randint(0, 1 << 30, ()).item()
    case = make_case(RAGGED, [1] * len(RAGGED), heads, 512, ratio, topk=64 if heads == 16 else 512, seed=seed)
    _check(case, wgmma=wgmma)


@pytest.mark.parametrize("ratio", [0, 4, 128])
@pytest.mark.parametrize("splits", [1, 3, 16])
@pytest.mark.parametrize("wgmma", [False, True])
def test_decode_forced_splits(ratio, splits, wgmma):
    """3 splits of the wgmma kernel merge in a cluster; 16 exceed a cluster and go through partials + combine."""
    seed = torch.randint(0, 1 << 30, ()).item()
    case = make_case([8191, 2000, 5], [1, 1, 1], 64, 512, ratio, topk=512, seed=seed)
    _check(case, num_splits=splits, wgmma=wgmma)


@pytest.mark.parametrize("variant", [dict(heads_cta=16), dict(heads_cta=32, num_splits=2),
                                     dict(heads_cta=16, num_splits=4, part_bf16=False), dict(part_bf16=True),
                                     dict(heads_cta=64, wgmma=False), dict(heads_cta=16, stages=3),
                                     dict(wgmma=True, part_bf16=True, num_splits=3, cluster=False),
                                     dict(wgmma=True, block_n=32, stages=4), dict(wgmma=True, num_splits=1),
                                     dict(wgmma=True, num_splits=2, cluster=True),
                                     dict(wgmma=True, num_splits=5, cluster=True),
                                     dict(wgmma=True, block_n=32, stages=4, num_splits=8, cluster=True)])
@pytest.mark.parametrize("ratio", [4, 128])
def test_decode_variants(ratio, variant):
    """Head groups of 16/32/64 for 64 heads (grid: head groups fastest), fp32 and bf16 split partials, 3 stages."""
    seed = torch.randint(0, 1 << 30, ()).item()
    case = make_case([8191, 2000, 5, 300], [1, 1, 1, 1], 64, 512, ratio, topk=512, seed=seed)
    _check(case, **variant)


def test_csa_int32_topk_and_dlpack_path():
    """Top-k given as int32 (the kernel also takes TorchOps' int64), and the explicit from_dlpack launch path."""
    seed = torch.randint(0, 1 << 30, ()).item()
    case = make_case([4095, 77, 1000], [1, 1, 1], 64, 512, 4, topk=512, seed=seed)
    _check(case, topk=case.topk.to(torch.int32))
    saved = cute_attention.TVM_FFI
    cute_attention.TVM_FFI = False
    try:
        case.batch.__dict__.pop("_cute_attention_plan", None)
        _check(case, num_splits=3)
    finally:
        cute_attention.TVM_FFI = saved


def test_plan_is_cached_per_batch():
    case = make_case([100, 5000], [1, 1], 64, 512, 128, seed=3)
    p1 = cute_attention.plan_for(case.batch, case.q.device)
    _check(case)
    assert cute_attention.plan_for(case.batch, case.q.device) is p1 and len(p1.launch_cfg) >= 1
    assert p1.seq.tolist() == [0, 1] and p1.swa_table(case.window, 128).shape[0] == 2


@pytest.mark.parametrize("tokens,ctx,ratio,wgmma", [(1, 8000, 4, False), (40, 8000, 4, True), (40, 8000, 128, False),
                                                   (40, 30000, 128, True), (127, 8000, 128, False),
                                                   (128, 8000, 128, True)])
def test_engine_choice(tokens, ctx, ratio, wgmma):
    """64 heads: the warpgroup-MMA kernel on sm_90 once >= 32 (token, 64-head group) pairs with >= 4 tiles of rows
    fill the GPU, or >= 128 pairs with shorter lists; the mma.sync kernel otherwise (measured faster there); the
    choice must also compute the right thing. HCA at 8k context: 128 window rows + 62 entries = 3 tiles; at 30k: 362
    rows."""
    case = make_case([ctx] * tokens, [1] * tokens, 64, 512, ratio, topk=512, seed=1)
    launch, _ = cute_attention.prepare_sparse_attention(case.q, case.cache, case.ratio, case.window, case.topk,
                                                        case.sink, case.scale, case.batch)
    hopper = torch.cuda.get_device_capability()[0] == 9 and cute_attention.WGMMA
    assert launch.wgmma == (hopper and wgmma)
    _check(case)


@pytest.mark.parametrize("ratio", [0, 4, 128])
@pytest.mark.parametrize("wgmma", [True, False])
def test_decode_128_heads_two_head_groups(ratio, wgmma):
    """V4-Pro's 128 heads: two CTAs of 64 heads per token (wgmma) or four of 32 (mma.sync) read the same rows."""
    seed = torch.randint(0, 1 << 30, ()).item()
    case = make_case([8191, 129, 3000], [1, 1, 1], 128, 512, ratio, topk=512, seed=seed)
    _check(case, wgmma=wgmma)


@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_prefill_chunks_wgmma(ratio):
    """Prefill chunks through the 64-head wgmma kernel: each query token is its own row list."""
    seed = torch.randint(0, 1 << 30, ()).item()
    case = make_case([0, 100, 1500], [150, 37, 5], 64, 512, ratio, topk=512, seed=seed)
    _check(case, wgmma=True)


@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_prefill_chunks(ratio):
    """Several query tokens per sequence: each sees its own window, compressed prefix and top-k."""
    seed = torch.randint(0, 1 << 30, ()).item()
    case = make_case([0, 100, 1500], [200, 37, 5], 16, 512, ratio, topk=64, seed=seed)
    _check(case)


def test_tiny_dims_padded_heads():
    """tiny preset shapes: 4 heads (padded to 16 in the kernel), head_dim 64, window 64."""
    seed = torch.randint(0, 1 << 30, ()).item()
    for ratio in (0, 4, 128):
        case = make_case([0, 63, 64, 700], [3, 1, 2, 1], 4, 64, ratio, window=64, topk=16, seed=seed)
        _check(case)


def test_store_window_kv_exact():
    seed = torch.randint(0, 1 << 30, ()).item()
    case = make_case([0, 129, 3000], [5, 1, 130], 16, 512, 0, seed=seed)
    T = case.q.shape[0]
    kv = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16)
    ref_pool = case.cache.swa_kv.clone()
    ref_pool.view(-1, 512)[case.batch.swa_slot_mapping] = kv
    cute_attention.store_window_kv(kv, case.cache, case.batch)
    torch.cuda.synchronize()
    same = (case.cache.swa_kv == ref_pool) | (case.cache.swa_kv.isnan() & ref_pool.isnan())
    assert bool(same.all())


@pytest.mark.parametrize("d,rd", [(512, 64), (128, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_store_window_kv_is_bit_exact(d, rd, dtype):
    """KVScatterFp8 writes exactly the bytes Fp8Rows.quantize makes (exponent from amax's bits, exact 2^-e scaling,
    round to nearest even), for magnitudes from 1e-30 to 1e4, zero rows and rows whose group max sits on a scale
    boundary; rows with slot -1 are skipped and rows nobody writes keep their poison."""
    from dsv4.ops.base import LayerCache
    from dsv4.ops.fp8_rows import Fp8Rows

    rows = Fp8Rows(d, rd)
    T, S = 300, 400
    g = torch.Generator(device="cuda").manual_seed(d + (dtype == torch.float32))
    kv = torch.randn(T, d, device="cuda", generator=g) * torch.logspace(-30, 4, T, device="cuda")[:, None]
    kv[5] = 0.0
    kv[6, :64] = 1.75 * 2.0 ** torch.arange(-8, 56, device="cuda").float() / 2 ** 20   # group maxima on boundaries
    kv[7, 3] = 448.0
    kv = kv.to(dtype)
    slots = torch.randperm(S, device="cuda", generator=g)[:T]
    slots[::17] = -1
    pool = torch.full((S, rows.row_bytes), 0xFF, dtype=torch.uint8, device="cuda")
    want = pool.clone()
    keep = slots >= 0
    want[slots[keep]] = rows.quantize(kv[keep])
    want[slots[keep], rows.nope + 2 * rd + rows.groups:] = 0xFF      # the kernel leaves the pad byte alone
    cache = LayerCache(swa_kv=pool, block_size=128, kv_rows=rows)
    batch = type("B", (), {"swa_slot_mapping": slots})()
    cute_attention.store_window_kv_fp8(kv, cache, batch)
    torch.cuda.synchronize()
    bad = (pool != want).any(-1).nonzero().flatten().tolist()
    assert not bad, f"pool rows {bad[:5]} differ from Fp8Rows.quantize"


def test_mixin_falls_back_on_cpu_tensors():
    class Ops(cute_attention.CuteAttentionMixin, TorchOps):
        pass

    case = make_case([10], [1], 4, 64, 0, window=64, device="cpu", seed=1)
    ops = Ops(device="cpu", dtype=torch.float32)
    out = ops.sparse_attention(case.q, case.cache, 0, 64, None, case.sink, case.scale, case.batch)
    assert not out.isnan().any()


# --- the inverse RoPE of the output inside the split combine ------------------------------------------------------

@pytest.mark.parametrize("ratio", [0, 4, 128])
@pytest.mark.parametrize("heads,wgmma,cluster,splits", [(16, None, None, None), (64, False, None, 4),
                                                        (64, True, False, 3), (64, True, True, None)])
@pytest.mark.parametrize("ctx", [[1000], [4095, 300], RAGGED])
def test_the_split_combine_rotates_the_output_back_with_rope_tails_bits(ratio, heads, wgmma, cluster, splits, ctx):
    """Where a split combine runs, it rotates the output's RoPE'd tail back itself: the same bits as the combine's
    output followed by RopeTail's inverse rotation. Without a combine (one split, cluster merge) the launch says
    it did not rotate and leaves the output as it was."""
    from dsv4.config import RopeConfig
    from dsv4.ops.cute import CuteOps
    ops = CuteOps("cuda")
    seed = torch.randint(0, 1 << 30, ()).item()
    case = make_case(ctx, [1] * len(ctx), heads, 512, ratio, topk=64 if heads == 16 else 512, seed=seed)
    rope, rd = RopeConfig(theta=10000.0, original_seq_len=4096, factor=4.0), 64
    pos = case.batch.positions.to(device="cuda", dtype=torch.long).contiguous()
    cos, sin = ops.rope_table(rope, rd, pos)
    kw = dict(num_splits=splits, wgmma=wgmma, cluster=cluster)
    args = (case.q, case.cache, case.ratio, case.window, case.topk, case.sink, case.scale, case.batch)
    plain_launch, plain_result = cute_attention.prepare_sparse_attention(*args, **kw)
    plain_launch()
    plain = plain_result().clone()
    launch, result = cute_attention.prepare_sparse_attention(*args, **kw, out_rope=(pos, cos, sin))
    launch()
    result().fill_(float("nan"))
    launch()
    out = result()
    torch.cuda.synchronize()
    assert launch.rotated == (launch.splits > 1 and not launch.cluster)
    if splits is not None and not cluster:
        assert launch.rotated, "a forced split must end in the rotating combine"
    want = ops.rope_tail(plain, pos, rope, rd, inverse=True) if launch.rotated else plain
    assert not out.isnan().any()
    assert torch.equal(out, want)
    # and through the op: the reference's output, rotated back
    ref = REF.sparse_attention(*args, out_rope=(rope, rd))
    assert _rel(ops.sparse_attention(*args, out_rope=(rope, rd)), ref) < 1.5e-2
