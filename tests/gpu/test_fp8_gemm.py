"""FP8-block W8A16 GEMM on the GPU against torch's dequantised BF16 weight (fresh random inputs, poisoned outputs).

Tolerances. The reference is x @ W_bf16^T in float64, W_bf16 = bf16(fp32(fp8) * scale) (TorchOps' weight), so only
the kernel's errors count. Power-of-two (UE8M0) scales: the kernel multiplies the exact e4m3 values by bf16 x
(exact fp32 products) and scales each 64-K chunk's fp32 sum exactly, i.e. it sums the very products of the reference
in fp32, in its own order, and rounds y to bf16 once. So |y - ref| <= 2^-9 |ref| (bf16 rounding; we allow 2^-8) plus
the fp32 summation error, a few 2^-24 of sum_k |w x| in practice (2^-17.6 in the worst case of K = 16384 with
every rounding aligned); we allow 2^-18 * sum_k |w x|. Arbitrary fp32 scales: the reference rounds every weight to
bf16 (2^-9 relative each) and the kernel does not, so the bound adds 2^-9 * sum_k |w x|. The prefill path multiplies
torch's bf16 weight (the dequant kernel is compared bit for bit) with cuBLAS, inside the same bound.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # module-level skip: CPU CI reports these as skipped, never as passed
    pytest.skip("no CUDA device: the CuTe DSL kernels need a Hopper GPU", allow_module_level=True)

from dsv4.bench_cmd import FP8_SHAPES  # noqa: E402
from dsv4.checkpoint.formats import FP8BlockTensor, quantize_fp8_block  # noqa: E402
from dsv4_kernels import fp8_gemm as F  # noqa: E402

DEV = torch.device("cuda")
# every FP8 projection of V4-Flash / V4-Pro that runs through the kernel, MTP's e_proj, small and tiny presets'
# shapes, ragged scale blocks (48, 320)
V4 = sorted({(n, k) for model in FP8_SHAPES.values() for _, n, k in model})
SMALL = [(512, 1024), (8192, 512), (2048, 512), (1024, 512), (1024, 2048), (64, 128), (256, 64), (128, 64),
         (48, 320), (16, 64), (4096, 4096)]
MS = [1, 2, 3, 8, 16, 17, 33, 64, 65, 128, 300]


def rand_weight(n: int, k: int, gen: torch.Generator, pow2: bool = True) -> FP8BlockTensor:
    w = torch.randn(n, k, device=DEV, generator=gen) * torch.rand(n, 1, device=DEV, generator=gen).add(0.05)
    w[: max(1, n // 64), :64] = 0          # all-zero stretches
    w[-1, -32:] *= 1e-5                     # e4m3 subnormals next to normal values in one block
    if n >= 256 and k >= 256:
        w[128:256, 128:256] *= 1e-3         # a block with a much smaller scale
    return quantize_fp8_block(w, ue8m0_scale=pow2)


def check(y: torch.Tensor, x: torch.Tensor, q: FP8BlockTensor | None, pow2: bool, what: str,
          wb: torch.Tensor | None = None) -> None:
    assert torch.isfinite(y).all(), f"{what}: NaN/Inf in the output (unwritten rows or overflow)"
    if wb is None:
        wb = q.dequantize(torch.float32).to(torch.bfloat16)                # the reference's weight
    wb = wb.to(DEV, torch.float64)
    ref = x.double() @ wb.T                                             # float64: no error of its own to budget
    mag = x.double().abs() @ wb.abs().T                                 # sum_k |w x| per output
    bound = 2.0 ** -8 * ref.abs() + (2.0 ** -18 if pow2 else 2.0 ** -9 + 2.0 ** -18) * mag + 1e-30
    err = (y.double() - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} outputs outside the bound, worst |err| / bound "
                           f"{float((err / bound).max()):.2f}")


@pytest.mark.parametrize("n,k", V4 + SMALL)
def test_dequant_kernel_bit_equal(n, k):
    gen = torch.Generator(device=DEV).manual_seed(n * 7 + k)
    for pow2 in (True, False):
        q = rand_weight(n, k, gen, pow2)
        w = F.dequantize_packed(F.prepare_fp8_weight(q))
        ref = q.dequantize(torch.float32).to(torch.bfloat16)
        assert torch.equal(w, ref), f"dequant kernel differs from torch in {(w != ref).sum().item()} elements"


@pytest.mark.parametrize("n,k", V4 + SMALL)
@pytest.mark.parametrize("pow2", [True, False], ids=["ue8m0", "fp32scale"])
def test_gemm_against_reference(n, k, pow2):
    gen = torch.Generator(device=DEV).manual_seed(n + 13 * k + pow2)
    q = rand_weight(n, k, gen, pow2)
    pw = F.prepare_fp8_weight(q)
    ms = MS if n * k <= 8192 * 4096 else [1, 3, 16, 64, 65, 300]
    for m in ms:
        for path in ("gemv", "dequant") if m <= F.GEMV_MAX_M else ("dequant",):
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)   # poison
            F.fp8_linear(x, pw, out=y, force=path)
            torch.cuda.synchronize()
            check(y, x, q, pow2, f"M={m} N={n} K={k} path={path}")


def test_dequant_path_equals_cublas_on_torch_weight():
    """Prefill: the dequant kernel's bf16 weight is torch's, so y is cuBLAS's result on it, bit for bit."""
    gen = torch.Generator(device=DEV).manual_seed(5)
    q = rand_weight(1024, 4096, gen, pow2=False)
    pw = F.prepare_fp8_weight(q)
    x = torch.randn(300, 4096, device=DEV, generator=gen).to(torch.bfloat16)
    ref = torch.matmul(x, q.dequantize(torch.float32).to(torch.bfloat16).to(DEV).t())
    assert torch.equal(F.fp8_linear(x, pw), ref)


def _plans(k: int) -> list[tuple[int, int, int]]:
    """(splits, unroll, prefetch): unsplit, the most splits, odd splits (3, 7), unroll 1/2/4, L2 prefetch 0-3
    iterations ahead (also further ahead than the split is long) -- those that divide K's chunks."""
    nchunk = k // 64
    most = max(s for s in range(1, nchunk + 1) if nchunk % (2 * s) == 0) if nchunk % 2 == 0 else nchunk
    want = [(1, 1, 0), (1, 2, 2), (1, 4, 0), (most, 2, 0), (most, 2, 1), (2, 4, 3), (3, 1, 0), (7, 1, 2),
            (3, 2, 1), F.fp8_gemv_plan(64 * 16, k)]
    return list(dict.fromkeys(p for p in want if nchunk % (p[0] * p[1]) == 0))


@pytest.mark.parametrize("n,k", [(512, 4096), (1024, 1536), (4096, 8192), (64, 128), (512, 7168)])
def test_forced_plans(n, k):
    """Forced decode plans (K splits, unroll, L2 prefetch), repeated calls: the same numbers (a plan changes only the
    fp32 summation order)."""
    gen = torch.Generator(device=DEV).manual_seed(n + k)
    q = rand_weight(n, k, gen)
    pw = F.prepare_fp8_weight(q)
    plans = _plans(k)
    assert len(plans) >= 3
    for m in (1, 33, 64):
        x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
        for plan in plans:
            pw.cache["plan"] = plan
            for _ in range(2):
                y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
                F.fp8_linear(x, pw, out=y, force="gemv")
                torch.cuda.synchronize()
                check(y, x, q, True, f"M={m} N={n} K={k} plan={plan}")


def test_shape_and_dtype_errors():
    gen = torch.Generator(device=DEV).manual_seed(1)
    pw = F.prepare_fp8_weight(rand_weight(128, 256, gen))
    with pytest.raises(ValueError, match="shape"):
        F.fp8_linear(torch.zeros(2, 128, dtype=torch.bfloat16, device=DEV), pw)
    with pytest.raises(TypeError, match="bfloat16"):
        F.fp8_linear(torch.zeros(2, 256, dtype=torch.float32, device=DEV), pw)
    with pytest.raises(ValueError, match="multiple"):
        F.prepare_fp8_weight(quantize_fp8_block(torch.randn(100, 256)))
    with pytest.raises(ValueError, match="M <= 64"):
        F.fp8_linear(torch.zeros(65, 256, dtype=torch.bfloat16, device=DEV), pw, force="gemv")
    with pytest.raises(ValueError, match="contiguous"):
        F.fp8_linear(torch.zeros(2, 256, dtype=torch.bfloat16, device=DEV), pw,
                     out=torch.empty(128, 2, dtype=torch.bfloat16, device=DEV).t())


def test_leading_dims_strided_and_empty():
    gen = torch.Generator(device=DEV).manual_seed(2)
    q = rand_weight(256, 512, gen)
    pw = F.prepare_fp8_weight(q)
    x = torch.randn(3, 5, 512, device=DEV, generator=gen).to(torch.bfloat16)
    y = F.fp8_linear(x, pw)
    assert y.shape == (3, 5, 256)
    check(y.view(15, 256), x.view(15, 512), q, True, "leading dims")
    xs = torch.randn(4, 1024, device=DEV, generator=gen).to(torch.bfloat16)[:, 3:515]   # strided, misaligned
    check(F.fp8_linear(xs, pw), xs, q, True, "strided x")
    assert F.fp8_linear(torch.empty(0, 512, dtype=torch.bfloat16, device=DEV), pw).shape == (0, 256)


@pytest.mark.parametrize("n,k", [(32768, 1024), (4096, 8192)])
def test_cuda_graph_capture(n, k):
    """warmup, capture, then replay on new inputs (an unsplit and a split plan, M 4 and 40)."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    q = rand_weight(n, k, gen)
    pw = F.prepare_fp8_weight(q)
    for m in (4, 40):
        F.warmup(pw, (m,))
        x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
        y = torch.empty(m, n, dtype=torch.bfloat16, device=DEV)
        F.fp8_linear(x, pw, out=y)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            F.fp8_linear(x, pw, out=y)
        for _ in range(2):
            x.copy_(torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16))
            y.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            check(y, x, q, True, f"graph replay M={m}")


def test_cute_ops_linear_uses_fp8_weights():
    """CuteOps keeps the checkpoint's FP8 projections FP8 and its linear matches TorchOps' within the bound."""
    from dsv4.ops.cute import CuteOps
    from dsv4.ops.torch_ops import TorchOps
    gen = torch.Generator(device=DEV).manual_seed(4)
    q = rand_weight(1024, 4096, gen)
    cute, ref = CuteOps(DEV, torch.bfloat16), TorchOps(DEV, torch.bfloat16)
    pw = cute.prepare_linear(FP8BlockTensor(q.weight.cpu(), q.scale.cpu()))
    assert isinstance(pw, F.PackedFP8) and pw.device.type == "cuda"
    for m in (1, 8, 100):
        x = torch.randn(m, 4096, device=DEV, generator=gen).to(torch.bfloat16)
        y = cute.linear(x, pw)
        check(y, x, q, True, f"CuteOps M={m}")
        torch.testing.assert_close(y.float(), ref.linear(x, ref.prepare_linear(q)).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sizes,k", [((1024, 512), 4096), ((32768, 8192), 1024), ((512, 128), 1024),
                                     ((128, 256, 384), 512)])
@pytest.mark.parametrize("pow2", [True, False], ids=["ue8m0", "fp32scale"])
def test_a_stack_of_fp8_projections_gives_each_projection_within_the_bound(sizes, k, pow2):
    """wq_a + wkv, wq_b + the indexer's wq_b (V4-Flash) and small stacks: one token through the stacked GEMV, more
    through each projection's rows of it; every output poisoned first, each checked against its own weight."""
    from dsv4.ops.cute import CuteOps, LinearStack
    gen = torch.Generator(device=DEV).manual_seed(sum(sizes) + k)
    qs = [rand_weight(n, k, gen, pow2) for n in sizes]
    cute = CuteOps(DEV, torch.bfloat16)
    stack = cute.prepare_linear_stack(qs)
    assert isinstance(stack, LinearStack) and isinstance(stack.weight, F.PackedFP8) and stack.sizes == sizes
    for m in (1, 3, 8, 100):
        x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
        if m == 1:
            full = F.fp8_linear(x, stack.weight, out=torch.full((1, sum(sizes)), float("nan"), device=DEV,
                                                                dtype=torch.bfloat16))
            outs = stack.split(full)
        else:
            outs = [F.fp8_linear(x, p, out=torch.full((m, p.n), float("nan"), device=DEV, dtype=torch.bfloat16))
                    for p in stack.parts]
        ys = cute.linear_stack(x, stack)
        for y, o, q in zip(ys, outs, qs):
            check(o, x, q, pow2, f"stack {sizes} part {q.weight.shape[0]} M={m}")
            check(y, x, q, pow2, f"linear_stack {sizes} part {q.weight.shape[0]} M={m}")


@pytest.mark.parametrize("groups,rows,k", [(8, 1024, 4096), (16, 1024, 4096), (2, 64, 128), (4, 16, 320)])
@pytest.mark.parametrize("pow2", [True, False], ids=["ue8m0", "fp32scale"])
def test_grouped_projection_against_the_einsum(groups, rows, k, pow2):
    """A grouped weight (V4's wo_a: o_groups row blocks, each times its own K-slice of x; Flash is 8 x [1024, 4096])
    against the per-group products of torch's BF16 weight, on the decode and the dequant paths."""
    gen = torch.Generator(device=DEV).manual_seed(groups * rows + k + pow2)
    q = rand_weight(groups * rows, k, gen, pow2)
    pw = F.prepare_fp8_weight(q, groups=groups)
    wb = q.dequantize(torch.float32).to(torch.bfloat16)          # torch's BF16 weight, all groups
    for m in (1, 5, 16, 64, 65, 300):
        for path in ("gemv", "dequant") if m <= F.GEMV_MAX_M else ("dequant",):
            x = torch.randn(m, groups * k, device=DEV, generator=gen).to(torch.bfloat16)
            y = torch.full((m, groups * rows), float("nan"), dtype=torch.bfloat16, device=DEV)
            F.fp8_linear(x, pw, out=y, force=path)
            torch.cuda.synchronize()
            for g in range(groups):
                rs = slice(g * rows, (g + 1) * rows)
                check(y[:, rs], x[:, g * k:(g + 1) * k], None, pow2, f"group {g} M={m} {path}", wb=wb[rs])
    with pytest.raises(ValueError, match="features"):
        F.fp8_linear(torch.zeros(1, k, dtype=torch.bfloat16, device=DEV), pw)


def test_cute_ops_grouped_linear_matches_torch_ops():
    """CuteOps packs an FP8 wo_a as a grouped FP8 weight; its grouped_linear agrees with TorchOps' einsum."""
    from dsv4.ops.cute import CuteOps
    from dsv4.ops.torch_ops import TorchOps

    gen = torch.Generator(device=DEV).manual_seed(7)
    q = rand_weight(8 * 256, 512, gen)
    cute, ref = CuteOps(DEV), TorchOps(DEV, torch.bfloat16)
    wc, wr = cute.prepare_grouped_linear(q, 8), ref.prepare_grouped_linear(q, 8)
    assert isinstance(wc, F.PackedFP8) and wc.groups == 8
    x = torch.randn(3, 8 * 512, device=DEV, generator=gen).to(torch.bfloat16)
    a, b = cute.grouped_linear(x, wc), ref.grouped_linear(x, wr)
    assert a.shape == b.shape == (3, 8 * 256)
    assert float((a.float() - b.float()).norm() / b.float().norm()) < 4e-3
