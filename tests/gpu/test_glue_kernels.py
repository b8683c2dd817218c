"""The glue kernels (CuteOps.rms_norm, swiglu_mlp, hc_post through CuteGlueMixin) vs TorchOps on random inputs of the
shapes a decode and a prefill step use; direct launches into NaN-poisoned outputs prove every element is written."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI compiles the kernels (tests/unit/test_glue_kernels_compile.py)",
                allow_module_level=True)

from dsv4.ops.cute import CuteOps  # noqa: E402
from dsv4.ops.cute_glue import (CuteGlueMixin, _hc_post_launcher, _rms_launcher,  # noqa: E402
                                _swiglu_launcher)
from dsv4.ops.torch_ops import TorchOps  # noqa: E402

BF = torch.bfloat16
TS = (1, 7, 64, 300)


def _cute(dtype=BF):
    """CuteOps with the decode-glue kernels on (they are opt-in until this module has passed on a GPU)."""
    return CuteOps("cuda", dtype, fused_glue=True)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-2):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got.float()).all()
    g, w = got.float(), want.float()
    # relative to the output's scale too: a one-ulp bf16 flip of an input to a sum is not an error
    atol = tol * max(w.abs().max().item(), 1.0)
    assert torch.allclose(g, w, rtol=tol, atol=atol), f"max |diff| {(g - w).abs().max().item():.3g}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def test_cute_ops_uses_the_glue_kernels():
    """Otherwise every comparison below would be TorchOps against itself."""
    assert issubclass(CuteOps, CuteGlueMixin)
    assert CuteOps.rms_norm is CuteGlueMixin.rms_norm
    assert CuteOps.swiglu_mlp is CuteGlueMixin.swiglu_mlp
    assert CuteOps.hc_post is CuteGlueMixin.hc_post


# --- rms_norm ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("D", [4096, 1024, 512, 128, 64])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_torch(T, D, weighted):
    g = _gen(T * 7 + D)
    x = (torch.randn((T, D), device="cuda", generator=g) * 3).to(BF)
    w = torch.rand(D, device="cuda", generator=g) + 0.5 if weighted else None
    _close(_cute().rms_norm(x, w, 1e-6), TorchOps("cuda", BF).rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("T", TS)
def test_rms_norm_per_head_q(T):
    """The per-head q norm: [T, 64, 512], no weight (64 T rows, two per CTA)."""
    x = torch.randn((T, 64, 512), device="cuda", generator=_gen(T)).to(BF)
    _close(_cute().rms_norm(x, None, 1e-6), TorchOps("cuda", BF).rms_norm(x, None, 1e-6))


@pytest.mark.parametrize("shape", [(7, 4096), (33, 64), (3, 5, 128)])
def test_rms_norm_fp32(shape):
    g = _gen(shape[0])
    x = torch.randn(shape, device="cuda", generator=g)
    w = torch.rand(shape[-1], device="cuda", generator=g) + 0.5
    _close(_cute(torch.float32).rms_norm(x, w, 1e-6), TorchOps("cuda", torch.float32).rms_norm(x, w, 1e-6),
           tol=1e-5)


def test_rms_norm_strided_and_misaligned_inputs():
    """A column slice (strided rows) and a contiguous view starting mid-vector both go through a copy."""
    D = 512
    base = torch.randn((7, D + 8), device="cuda").to(BF)
    w = torch.rand(D, device="cuda") + 0.5
    flat = torch.randn(7 * D + 4, device="cuda").to(BF)
    for x in (base[:, 8:], flat[4:].view(7, D)):
        assert not x.is_contiguous() or x.data_ptr() % 16
        _close(_cute().rms_norm(x, w, 1e-6), TorchOps("cuda", BF).rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("R,D,weighted", [(301, 512, True), (300, 64, False), (7, 4096, True), (1, 128, True),
                                          (129, 1024, False)])
def test_rms_norm_writes_every_element(R, D, weighted):
    x = torch.randn((R, D), device="cuda").to(BF)
    w = torch.rand(D, device="cuda") + 0.5
    out = torch.full_like(x, float("nan"))
    _rms_launcher(D, 1e-6, weighted, x.shape[0], x, w, out)(x, w, out)
    torch.cuda.synchronize()
    _close(out, TorchOps("cuda", BF).rms_norm(x, w if weighted else None, 1e-6))


# --- swiglu_mlp --------------------------------------------------------------------------------------------------

def _mlp_weights(D: int, I: int, seed: int):
    g = _gen(seed)
    prep = TorchOps("cuda", BF).prepare_linear
    # gate/up scaled so that a limit of 10 clamps a few percent of them
    w1 = prep(torch.randn((I, D), device="cuda", generator=g).to(BF) * (4 / D ** 0.5))
    w3 = prep(torch.randn((I, D), device="cuda", generator=g).to(BF) * (4 / D ** 0.5))
    w2 = prep(torch.randn((D, I), device="cuda", generator=g).to(BF) / I ** 0.5)
    return (w1, w3), w2          # the gate and up projections as TorchOps' prepare_linear_stack gives them


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("D,I", [(4096, 2048), (1024, 512), (64, 32)])
@pytest.mark.parametrize("limit", [0.0, 10.0])
def test_swiglu_mlp_matches_torch(T, D, I, limit):
    w13, w2 = _mlp_weights(D, I, seed=D + I)
    x = torch.randn((T, D), device="cuda", generator=_gen(T)).to(BF)
    want = TorchOps("cuda", BF).swiglu_mlp(x, w13, w2, limit)
    _close(_cute().swiglu_mlp(x, w13, w2, limit), want)


@pytest.mark.parametrize("R,I,dtype", [(7, 2048, BF), (300, 72, BF), (5, 64, torch.float32)])
@pytest.mark.parametrize("limit", [0.0, 10.0])
def test_swiglu_writes_every_element(R, I, dtype, limit):
    g = _gen(R + I)
    gate = (torch.randn((R, I), device="cuda", generator=g) * 6).to(dtype)
    up = (torch.randn((R, I), device="cuda", generator=g) * 6).to(dtype)
    out = torch.full((R, I), float("nan"), dtype=BF, device="cuda")
    _swiglu_launcher(limit, gate, up, out)(gate, up, out)
    torch.cuda.synchronize()
    want = TorchOps("cuda", BF)._swiglu(gate, up, limit).to(BF)
    _close(out, want)
    if limit > 0:
        assert (gate.float() > limit).any() and (up.float().abs() > limit).any()   # the clamps were exercised


# --- hc_post -----------------------------------------------------------------------------------------------------

def _hc_inputs(T: int, n: int, D: int, seed: int):
    g = _gen(seed)
    y = torch.randn((T, D), device="cuda", generator=g).to(BF)
    streams = torch.randn((T, n, D), device="cuda", generator=g).to(BF)
    post = 2 * torch.rand((T, n), device="cuda", generator=g)
    comb = torch.rand((T, n, n), device="cuda", generator=g)
    comb = comb / comb.sum(-1, keepdim=True)
    return y, streams, post, comb


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("n,D", [(4, 4096), (4, 1024), (2, 256), (4, 64)])
def test_hc_post_matches_torch(T, n, D):
    args = _hc_inputs(T, n, D, seed=T * 13 + D + n)
    _close(_cute().hc_post(*args), TorchOps("cuda", BF).hc_post(*args))


@pytest.mark.parametrize("T,n,D", [(300, 4, 1032), (7, 2, 64), (1, 4, 4096)])
def test_hc_post_writes_every_element(T, n, D):
    y, streams, post, comb = _hc_inputs(T, n, D, seed=T + D)
    c2 = comb.reshape(T, n * n).contiguous()
    out = torch.full_like(streams, float("nan"))
    _hc_post_launcher(n, False, y, y, streams, post, c2, out)(y, y, streams, post, c2, out)
    torch.cuda.synchronize()
    _close(out, TorchOps("cuda", BF).hc_post(y, streams, post, comb))


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("n,D", [(4, 4096), (4, 1024), (2, 256)])
def test_hc_post_of_a_two_part_output_is_hc_post_of_their_bf16_sum(T, n, D):
    """The MoE's routed + shared outputs, added inside the kernel: the same bits as hc_post(y + y2) on CuteOps (the
    sum rounded to bf16 first, as torch's add), and close to TorchOps."""
    y, streams, post, comb = _hc_inputs(T, n, D, seed=T * 17 + D)
    y2 = (torch.randn((T, D), device="cuda", generator=_gen(T + 5)) * 3).to(BF)
    got = _cute().hc_post_sum(y, y2, streams, post, comb)
    assert torch.equal(got, _cute().hc_post(y + y2, streams, post, comb))
    _close(got, TorchOps("cuda", BF).hc_post_sum(y, y2, streams, post, comb))


@pytest.mark.parametrize("T", (1, 2, 5, 8, 64))
@pytest.mark.parametrize("n,D,K", [(4, 4096, 8192), (4, 1024, 2048), (2, 512, 4096)])
def test_an_fp8_projection_into_hc_post_sums_its_split_partials_there_with_the_same_bits(T, n, D, K):
    """wo_b then HcPost: the GEMV's split-K partials summed inside HcPost give the bits of the split reduce + HcPost
    (every output poisoned first); at sizes without split partials the op takes the two-kernel path."""
    from dsv4.checkpoint.formats import quantize_fp8_block
    from dsv4_kernels.fp8_gemm import decode_reference, fp8_gemv_partials
    g = _gen(T + D + K)
    ops = _cute()
    w = ops.prepare_linear(quantize_fp8_block(torch.randn((D, K), device="cuda", generator=g) / K ** 0.5,
                                              ue8m0_scale=True))
    x = torch.randn((T, K), device="cuda", generator=g).to(BF)
    _, streams, post, comb = _hc_inputs(T, n, D, seed=T * 7 + D)
    want = ops.hc_post(ops.linear(x, w), streams, post, comb)
    streams_before = streams.clone()
    fused = T <= 64 and fp8_gemv_partials(x, w) is not None
    if T == 1 and D == 4096:
        assert fused, "wo_b at one token must split K (the fused path under test)"
    orig = torch.empty
    poisoned = []

    def poison_empty(*a, **kw):           # the op's output, NaN before the kernel writes it
        t = orig(*a, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
            poisoned.append(t)
        return t

    torch.empty = poison_empty
    try:
        got = ops.linear_hc_post(x, w, streams, post, comb)
    finally:
        torch.empty = orig
    assert any(p.data_ptr() == got.data_ptr() for p in poisoned) or not fused
    assert torch.equal(streams, streams_before)
    assert torch.equal(got, want)
    ref = TorchOps("cuda", BF)                 # and close to the torch path on the dequantised weight
    _close(got, ref.hc_post(ref.linear(x, decode_reference(w, BF)), streams, post, comb))


# --- CUDA graphs -------------------------------------------------------------------------------------------------

def test_glue_ops_replay_in_a_cuda_graph():
    """No host sync and the launches follow torch's (capture) stream: a captured graph replays the eager result."""
    ops = _cute()
    T, n, D, I = 5, 4, 1024, 512
    w13, w2 = _mlp_weights(D, I, seed=1)
    w = torch.rand(D, device="cuda") + 0.5
    y, streams, post, comb = _hc_inputs(T, n, D, seed=2)

    def step():
        x = ops.rms_norm(y, w, 1e-6)
        h = ops.swiglu_mlp(x, w13, w2, 10.0)
        return ops.hc_post(h, streams, post, comb)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                       # warm-up on the capture stream (compiles, caches the weight dummy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    y.copy_(torch.randn_like(y))
    graph.replay()
    torch.cuda.synchronize()
    _close(captured, step())
    assert not torch.equal(captured, eager)
