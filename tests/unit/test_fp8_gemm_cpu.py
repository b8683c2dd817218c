"""CPU checks of the FP8-block W8A16 GEMM (dsv4_kernels.fp8_gemm): the weight re-layout is exact, the kernel's
integer decode (modelled in torch on the packed words) yields the checkpoint's e4m3 values in the MMA fragment
order, the errors say what is wrong, CuteOps' dispatch keeps FP8 only where the kernels apply, and every kernel
variant compiles for sm_90a (CUTE_DSL_ARCH=sm_90a, no GPU needed)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import cutlass  # noqa: E402,F401  - a hard requirement: CI must compile every kernel, never skip
import cutlass.cute as cute  # noqa: E402
from cutlass import Float32, Int32  # noqa: E402

from dsv4.checkpoint.formats import (FP8BlockTensor, float_to_ue8m0, quantize_fp8_block,  # noqa: E402
                                     quantize_nvfp4)
from dsv4_kernels import fp8_gemm as F  # noqa: E402
from dsv4_kernels import nvfp4_gemm as G  # noqa: E402

E8M0 = getattr(torch, "float8_e8m0fnu", None)


def _dense(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.05)
    w[0, :64] = 0                        # an all-zero stretch
    w[-1, -32:] *= 1e-5                  # e4m3 subnormals next to normal values in one block
    return w


def _weight(n: int, k: int, seed: int, scales: str) -> FP8BlockTensor:
    """scales: 'ue8m0' (power-of-two fp32, our writer), 'e8m0' / 'u8' (the same stored as UE8M0), 'fp32'
    (amax / 448: arbitrary fp32 multipliers, as HF's weight_scale_inv)."""
    q = quantize_fp8_block(_dense(n, k, seed), ue8m0_scale=scales != "fp32")
    if scales == "e8m0":
        return FP8BlockTensor(q.weight, float_to_ue8m0(q.scale, as_e8m0=True), q.block)
    if scales == "u8":
        return FP8BlockTensor(q.weight, float_to_ue8m0(q.scale), q.block)
    return q


SHAPES = [(16, 64), (64, 128), (48, 320), (256, 64), (128, 384), (272, 1280), (512, 1024)]
SCALES = ["ue8m0", "fp32", "u8"] + (["e8m0"] if E8M0 is not None else [])


# --- re-layout -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("scales", SCALES)
def test_relayout_roundtrip_exact(n, k, scales):
    """Ragged scale blocks (48 rows, 320 columns), every scale storage: the packed bytes are the checkpoint's bytes
    and decode_reference is torch's dequantisation, bit for bit, in fp32 and in bf16."""
    q = _weight(n, k, n * 31 + k, scales)
    pw = F.prepare_fp8_weight(q)
    assert pw.codes.shape == (n // 16, k // 64, 2, 32, 4) and pw.codes.dtype == torch.int32
    assert pw.scales.dtype == torch.float32 and pw.shape == (n, k) and pw.nbytes() == n * k + pw.scales.numel() * 4
    assert torch.equal(F.unpack_to_bytes(pw), q.weight.view(torch.uint8))
    assert torch.equal(F.decode_reference(pw), q.dequantize(torch.float32))
    assert torch.equal(F.decode_reference(pw, torch.bfloat16), q.dequantize(torch.float32).to(torch.bfloat16))


def test_relayout_every_byte_and_odd_scales():
    """All 254 non-NaN e4m3 bytes, and negative, zero, tiny (fp32-subnormal products) and huge scales."""
    n, k = 64, 256
    codes = torch.arange(n * k, dtype=torch.int64) % 256
    codes = torch.where((codes & 0x7F) == 0x7F, torch.zeros_like(codes), codes).to(torch.uint8)
    w8 = codes.view(n, k).view(torch.float8_e4m3fn)
    scale = torch.tensor([[-0.75, 0.0]], dtype=torch.float32)
    for s in (scale, torch.tensor([[2.0 ** -130, 3.0e30]]), torch.tensor([[1.0, -2.0 ** 100]])):
        q = FP8BlockTensor(w8, s)
        pw = F.prepare_fp8_weight(q)
        assert torch.equal(F.decode_reference(pw), q.dequantize(torch.float32))
        assert torch.equal(F.decode_reference(pw, torch.bfloat16), q.dequantize().to(torch.bfloat16))


def test_non_square_blocks():
    q = quantize_fp8_block(_dense(96, 384, 3), block=(32, 192))
    pw = F.prepare_fp8_weight(q)
    assert pw.block == (32, 192) and pw.scales.shape == (3, 2)
    assert torch.equal(F.decode_reference(pw), q.dequantize())


# --- the kernel's decode, modelled in torch --------------------------------------------------------------------

def _prmt_sign(w: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """prmt.b32 d, w, 0, sel with sel = (8|b1, b1, 8|b0, b0): halves [sign(byte b) x 8 | byte b]."""
    lo = (w >> (8 * b0)) & 0xFF
    hi = (w >> (8 * b1)) & 0xFF
    sx = lambda b: torch.where(b >= 0x80, torch.full_like(b, 0xFF), torch.zeros_like(b))   # noqa: E731
    return lo | (sx(lo) << 8) | (hi << 16) | (sx(hi) << 24)


def _bf16_half(bits: torch.Tensor, half: int) -> torch.Tensor:
    return (((bits >> (16 * half)) & 0xFFFF) << 16).to(torch.int32).view(torch.float32)


def test_kernel_decode_model_gives_fp8_values_in_fragment_order():
    """prmt / shl 4 / and 0x87F087F0 then x 2^120 (the bf16x2 fma) on the packed words, placed where the A fragment
    of m16n8k16 puts them (slot 0/1: rows g / g+8, MMA columns 2t,2t+1 <- K 16t+4s+2kp+{0,1}), is the e4m3 weight."""
    n, k = 32, 256
    codes = torch.arange(n * k, dtype=torch.int64).mul(37).remainder(256)
    codes = torch.where((codes & 0x7F) == 0x7F, torch.full_like(codes, 0x80), codes).to(torch.uint8)
    w8 = codes.view(n, k).view(torch.float8_e4m3fn)
    pw = F.prepare_fp8_weight(FP8BlockTensor(w8, torch.ones(1, 2)))
    words = pw.codes.to(torch.int64) & 0xFFFFFFFF                      # [r, c, h, lane, j]
    out = torch.full((n // 16, 16, k // 64, 4, 16), float("nan"))      # [r, row in tile, c, t, K in lane's 16]
    for j in range(4):
        sl, kp = j // 2, j % 2
        for pair, (b0, b1) in enumerate(((0, 1), (2, 3))):            # bytes 0,1: row g; bytes 2,3: row g + 8
            bits = (_prmt_sign(words[..., j], b0, b1) << 4) & 0x87F087F0
            for e in range(2):
                v = _bf16_half(bits, e) * 2.0 ** 120                  # exact: the fma by bf16 2^120
                for h in range(2):
                    s = 2 * h + sl
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        out[:, g + 8 * pair, :, t, 4 * s + 2 * kp + e] = v[:, :, h, lane]
    assert torch.equal(out.reshape(n, k), w8.to(torch.float32))


def test_chunk_scaled_sum_matches_reference_within_fp32_order():
    """The decode kernel's arithmetic (per 64-K chunk: exact fp8 * x products summed in fp32, times the chunk's
    scale, summed over chunks) against F.linear(x, W_bf16) for power-of-two scales: equal up to summation order."""
    n, k, m = 64, 512, 3
    q = _weight(n, k, 9, "ue8m0")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    w8 = q.weight.to(torch.float32)
    s = q.scale.repeat_interleave(128, 0)[:n]                           # [N, K/128]
    chunks = (x.float().view(m, 1, k // 64, 64) * w8.view(1, n, k // 64, 64)).sum(-1)   # [m, n, K/64]
    y = (chunks * s.repeat_interleave(2, 1)[None]).sum(-1)
    ref = torch.nn.functional.linear(x.float(), q.dequantize().to(torch.bfloat16).float())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# --- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k,block,match", [(100, 128, 128, "multiple of 16"), (64, 96, 128, "K of 64"),
                                             (64, 128, (32, 32), "columns of 64"), (64, 128, (8, 64), "rows")])
def test_prepare_refuses_shapes_the_kernel_cannot_take(n, k, block, match):
    q = quantize_fp8_block(torch.randn(n, k), block=block)
    assert not F.fp8_kernel_ok(q) and match in F.fp8_shape_problem(q)
    with pytest.raises(ValueError, match=match):
        F.prepare_fp8_weight(q)


def test_prepare_errors():
    with pytest.raises(ValueError, match="2-D"):
        F.prepare_fp8_weight(quantize_fp8_block(torch.randn(2, 64, 128)))
    with pytest.raises(TypeError, match="FP8BlockTensor"):
        F.prepare_fp8_weight(quantize_nvfp4(torch.randn(64, 128)))
    with pytest.raises(TypeError, match="FP8BlockTensor"):
        F.prepare_fp8_weight(torch.randn(64, 128))
    q = quantize_fp8_block(torch.randn(64, 128))
    bad = q.weight.clone().view(torch.uint8)
    bad[3, 5] = 0xFF
    with pytest.raises(ValueError, match="NaN codes"):
        F.prepare_fp8_weight(FP8BlockTensor(bad.view(torch.float8_e4m3fn), q.scale))
    with pytest.raises(ValueError, match="NaN/Inf"):
        F.prepare_fp8_weight(FP8BlockTensor(q.weight, torch.full_like(q.scale, float("inf"))))


def test_linear_argument_errors():
    pw = F.prepare_fp8_weight(quantize_fp8_block(torch.randn(64, 128)))
    with pytest.raises(TypeError, match="bfloat16"):
        F.fp8_linear(torch.zeros(2, 128), pw)
    with pytest.raises(ValueError, match="same GPU"):
        F.fp8_linear(torch.zeros(2, 128, dtype=torch.bfloat16), pw)
    with pytest.raises(TypeError, match="PackedFP8"):
        F.fp8_linear(torch.zeros(2, 128, dtype=torch.bfloat16), G.prepare_nvfp4_weight(quantize_nvfp4(
            torch.randn(64, 128))))


# --- plan ------------------------------------------------------------------------------------------------------

# (N, K) of every FP8 projection of V4-Flash / V4-Pro (backend_src/dsv4/bench_cmd.py FP8_SHAPES) and small / tiny
V4_FP8 = [(1024, 4096), (32768, 1024), (512, 4096), (8192, 1024), (4096, 8192), (2048, 4096), (4096, 2048),
          (4096, 4096), (1536, 7168), (65536, 1536), (512, 7168), (8192, 1536), (7168, 16384), (3072, 7168),
          (7168, 3072), (7168, 7168), (512, 1024), (8192, 512), (2048, 512), (1024, 512), (64, 128), (256, 64)]


def test_bench_lists_every_v4_fp8_projection():
    from dsv4.bench_cmd import FP8_SHAPES
    listed = {(n, k) for model in FP8_SHAPES.values() for _, n, k in model}
    assert listed <= set(V4_FP8)
    assert {(1024, 4096), (32768, 1024), (4096, 8192), (65536, 1536), (7168, 16384)} <= listed


@pytest.mark.parametrize("n,k", V4_FP8)
def test_plan_splits_k_into_whole_unrolled_iterations(n, k):
    """The spec: the fewest K splits giving >= 2 CTAs per SM (132 SMs), each split >= 4 iterations of 2 chunks, else
    the most splits allowed; then 8 chunks of loads in flight where a split holds >= 16 chunks (a multiple of 8),
    else 2; every split a whole number of unrolled iterations."""
    splits, unroll, prefetch = F.fp8_gemv_plan(n, k)
    nchunk = k // 64
    assert prefetch == F.PREFETCH and nchunk % (splits * unroll) == 0
    base = 2 if nchunk % 2 == 0 else 1
    iters = nchunk // base
    allowed = [s for s in range(1, iters + 1) if iters % s == 0 and (s == 1 or iters // s >= 4)]
    ctas = -(-n // 64)
    assert splits == min([s for s in allowed if s * ctas >= 2 * 132], default=max(allowed))
    cps = nchunk // splits
    assert unroll == (8 if cps >= 16 and cps % 8 == 0 else base)


def test_a_gemv_launched_ahead_loads_its_whole_split_in_one_iteration():
    """ahead (a kernel launched well before its input, as V4's wo_a behind the attention): splits of one 8-chunk
    iteration, so every weight load of a warp goes out before griddepcontrol.wait; K of fewer than 16 chunks keeps
    the plain rule."""
    assert F.fp8_gemv_plan(8192, 4096, ahead=True) == (8, 8, F.PREFETCH)
    assert F.fp8_gemv_plan(8192, 4096) == (4, 8, F.PREFETCH)
    assert F.fp8_gemv_plan(1024, 512, ahead=True) == F.fp8_gemv_plan(1024, 512)
    assert F.fp8_gemv_plan(8192, 4096, unroll=2, ahead=True) == F.fp8_gemv_plan(8192, 4096, unroll=2)


def test_plan_rejects_bad_unroll():
    with pytest.raises(ValueError, match="unroll"):
        F.fp8_gemv_plan(1024, 192, unroll=2)


# --- CuteOps dispatch (no GPU: the instance is built without its CUDA check) -------------------------------------

def _cpu_cute_ops(fp8_weights: bool = True):
    from dsv4.ops.cute import CuteOps
    ops = CuteOps.__new__(CuteOps)
    ops.device, ops.dtype, ops.fp8_weights, ops.fused_glue = torch.device("cpu"), torch.bfloat16, fp8_weights, True
    return ops


def test_cute_ops_keeps_fp8_only_where_the_kernel_applies():
    from dsv4.ops.cute import _fp8_kernel_ok, _kernel_ok
    ops = _cpu_cute_ops()
    ok = quantize_fp8_block(_dense(256, 512, 1), ue8m0_scale=True)
    pw = ops.prepare_linear(ok)
    assert isinstance(pw, F.PackedFP8) and _fp8_kernel_ok(ok) and not _kernel_ok(ok)
    assert torch.equal(F.decode_reference(pw), ok.dequantize())
    for ragged in (quantize_fp8_block(torch.randn(100, 128)), quantize_fp8_block(torch.randn(64, 96)),
                   quantize_fp8_block(torch.randn(64, 128), block=(64, 32))):
        assert not _fp8_kernel_ok(ragged)
        dense = ops.prepare_linear(ragged)
        assert isinstance(dense, torch.Tensor) and dense.dtype == torch.bfloat16
        assert torch.equal(dense, ragged.dequantize().to(torch.bfloat16))
    assert not _fp8_kernel_ok(torch.randn(64, 128)) and not _fp8_kernel_ok(quantize_nvfp4(torch.randn(64, 128)))
    off = _cpu_cute_ops(fp8_weights=False).prepare_linear(ok)
    assert isinstance(off, torch.Tensor) and torch.equal(off, ok.dequantize().to(torch.bfloat16))


def test_cute_ops_falls_back_for_nan_codes(caplog):
    q = quantize_fp8_block(torch.randn(64, 128))
    bad = q.weight.clone().view(torch.uint8)
    bad[0, 0] = 0x7F
    w = FP8BlockTensor(bad.view(torch.float8_e4m3fn), q.scale)
    out = _cpu_cute_ops().prepare_linear(w)
    assert isinstance(out, torch.Tensor) and torch.isnan(out[0, 0]) and "torch path" in caplog.text


def test_projections_of_one_input_stack_into_one_fp8_weight_whose_parts_are_its_rows():
    """wq_a + wkv (and wq_b + the indexer's wq_b): one packed weight, the same bytes and scales as the projections
    one by one, each projection's own weight a view of its rows."""
    from dsv4.ops.cute import LinearStack
    ops = _cpu_cute_ops()
    ws = [_weight(n, 512, seed, "ue8m0") for seed, n in enumerate((256, 128, 384))]
    stack = ops.prepare_linear_stack(ws)
    assert isinstance(stack, LinearStack) and isinstance(stack.weight, F.PackedFP8) and stack.sizes == (256, 128, 384)
    assert torch.equal(F.decode_reference(stack.weight), torch.cat([w.dequantize() for w in ws]))
    for part, w in zip(stack.parts, ws):
        alone = ops.prepare_linear(w)
        assert (part.n, part.k, part.block) == (alone.n, alone.k, alone.block)
        assert torch.equal(part.codes, alone.codes) and torch.equal(part.scales, alone.scales)
        assert part.codes.untyped_storage().data_ptr() == stack.weight.codes.untyped_storage().data_ptr()
        assert part.codes.is_contiguous() and part.scales.is_contiguous()


def test_fp8_projections_that_cannot_share_a_weight_stay_separate():
    ops = _cpu_cute_ops()
    for ws in ([_weight(256, 512, 0, "ue8m0"), _weight(128, 256, 1, "ue8m0")],       # different K
               [_weight(256, 512, 0, "ue8m0"), _weight(272, 512, 1, "ue8m0")],       # rows not whole 128-row blocks
               [_weight(256, 512, 0, "ue8m0"), _weight(128, 512, 1, "u8")]):         # scales stored differently
        out = ops.prepare_linear_stack(ws)
        assert isinstance(out, tuple) and len(out) == 2 and all(isinstance(o, F.PackedFP8) for o in out)
    off = _cpu_cute_ops(fp8_weights=False).prepare_linear_stack([_weight(256, 512, 0, "ue8m0")] * 2)
    assert isinstance(off, tuple) and all(isinstance(o, torch.Tensor) for o in off)


# --- compile for sm_90a ----------------------------------------------------------------------------------------

def test_grouped_weight_is_the_same_bytes_with_a_group_count():
    """A grouped projection (wo_a) packs exactly like a plain one; only the x K-slice per row group differs, so the
    layout round trip holds and groups that do not split N into 16-row tiles are refused."""
    q = quantize_fp8_block(torch.randn(4 * 32, 256), ue8m0_scale=True)
    pw = F.prepare_fp8_weight(q, groups=4)
    assert pw.groups == 4 and pw.shape == (128, 256)
    assert torch.equal(F.decode_reference(pw), q.dequantize(torch.float32))
    with pytest.raises(ValueError, match="groups"):
        F.prepare_fp8_weight(q, groups=3)
    with pytest.raises(ValueError, match="groups"):
        F.prepare_fp8_weight(q, groups=16)        # 8-row groups


def test_torch_ops_grouped_linear_is_the_models_einsum():
    """TorchOps.grouped_linear: group g's rows times x's g-th K-slice (the model's wo_a einsum, unchanged)."""
    from dsv4.ops.torch_ops import TorchOps

    ops = TorchOps("cpu", torch.float32)
    q = quantize_fp8_block(torch.randn(3 * 16, 64), ue8m0_scale=True)
    w = ops.prepare_grouped_linear(q, 3)
    x = torch.randn(5, 3 * 64)
    dense = q.dequantize(torch.float32).view(3, 16, 64)
    want = torch.stack([x[:, g * 64:(g + 1) * 64] @ dense[g].T for g in range(3)], 1).reshape(5, 48)
    torch.testing.assert_close(ops.grouped_linear(x, w), want)
    with pytest.raises(ValueError, match="row groups"):
        ops.prepare_grouped_linear(q, 5)


@pytest.mark.parametrize("groups", [8, 16])
def test_grouped_gemv_compiles(groups):
    assert F.compile_gemv(groups * 1024, 4096, 1, 2, 8, 0, (128, 128), groups) is not None
    assert F.compile_gemv(groups * 1024, 4096, 4, 1, 2, 0, (128, 128), groups) is not None


def test_grouped_gemv_with_16_chunk_iterations_is_compiled_for_four_ctas_an_sm(tmp_path):
    # V4-Flash wo_a: 512 CTAs; at ptxas's own 130 registers only 3 fit an SM (396 resident, docs/PERF.md session 30)
    assert F.gemv_min_ctas(8, 8) == F.MIN_CTAS_PER_SM == 4
    assert F.gemv_min_ctas(8, 1) == 0 and F.gemv_min_ctas(2, 8) == 0
    n, k, groups = 8192, 4096, 8
    obj = F._Gemv(n, k, 1, 4, 8, 0, (128, 128), groups, True, F.gemv_min_ctas(8, groups))
    m = cute.sym_int()
    ptx = cute.compile(obj.launch, *F._weight_fakes(n, k, (128, 128)), F._fake(Int32, (m, groups * k // 16, 8)),
                       F._fake(cutlass.BFloat16, (m, n), 2), F._fake(Float32, (4, m, n), 4), Int32(1),
                       F._stream_arg(), options=f"--keep-ptx --dump-dir={tmp_path}").artifacts.PTX
    assert ".minnctapersm 4" in ptx


@pytest.mark.parametrize("mt", range(1, 9))
@pytest.mark.parametrize("split", [False, True])
def test_gemv_compiles(mt, split):
    n, k = 1024, 4096
    splits, unroll, _ = F.fp8_gemv_plan(n, k) if split else (1, 2, 0)
    assert (splits > 1) == split
    assert F.compile_gemv(n, k, mt, splits, unroll) is not None


@pytest.mark.parametrize("n,k,mt,splits,unroll,prefetch,block", [
    (512, 7168, 1, 14, 2, 2, (128, 128)), (7168, 16384, 2, 4, 4, 0, (128, 128)), (256, 64, 1, 1, 1, 0, (128, 128)),
    (96, 384, 8, 3, 1, 1, (32, 192)), (65536, 1536, 1, 1, 2, 4, (128, 128))])
def test_gemv_variants_compile(n, k, mt, splits, unroll, prefetch, block):
    assert F.compile_gemv(n, k, mt, splits, unroll, prefetch, block) is not None


@pytest.mark.parametrize("n,k,block", [(4096, 2048, (128, 128)), (48, 320, (128, 128)), (96, 384, (32, 192))])
def test_dequant_and_reduce_compile(n, k, block):
    assert F.compile_dequant(n, k, block) is not None
    assert G.compile_split_reduce(n, 4) is not None
