"""The MoE gate kernel (dsv4_kernels.moe_route) compiles for sm_90a on the CPU (CUTE_DSL_ARCH=sm_90a) for every
score function, hash and top-k layer, and the expert counts the models use; plus the host path CuteOps takes."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import cutlass  # noqa: E402  - a hard requirement: CI must compile every kernel, never skip
import cutlass.cute as cute  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream  # noqa: E402

from dsv4_kernels.moe_route import SCORE_FUNCS, MoeRoute, supported  # noqa: E402

F32, I64 = cutlass.Float32, cutlass.Int64


def _fake(dtype, rank):
    shape = tuple(cute.sym_int() for _ in range(rank))
    return make_fake_compact_tensor(dtype, shape, stride_order=tuple(range(rank - 1, -1, -1)),
                                    assumed_align=dtype.width // 8)


@pytest.mark.parametrize("E", [256, 64, 32])
@pytest.mark.parametrize("topk", [6, 2])
@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("hashed", [False, True])
def test_moe_route_compiles(E, topk, score_func, hashed):
    cute.compile(MoeRoute(E, topk, score_func, 2.5, hashed), _fake(F32, 2), _fake(F32, 1), _fake(I64, 2),
                 _fake(I64, 1), _fake(I64, 2), _fake(F32, 2), make_fake_stream())


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("hashed", [False, True])
def test_moe_route_with_partial_logits_compiles(score_func, hashed):
    """Decode's gate: the logits as HcMix partials [T, S, E + 1]."""
    cute.compile(MoeRoute(256, 6, score_func, 2.5, hashed, num_partials=4), _fake(F32, 3), _fake(F32, 1),
                 _fake(I64, 2), _fake(I64, 1), _fake(I64, 2), _fake(F32, 2), make_fake_stream())


@pytest.mark.parametrize("E,topk", [(512, 8), (1024, 32)])
def test_moe_route_compiles_large(E, topk):
    cute.compile(MoeRoute(E, topk, "sqrtsoftplus", 1.0, False), _fake(F32, 2), _fake(F32, 1), _fake(I64, 2),
                 _fake(I64, 1), _fake(I64, 2), _fake(F32, 2), make_fake_stream())


def test_unsupported_shapes_rejected():
    assert supported(256, 6, "sqrtsoftplus") and supported(32, 2, "softmax")
    assert not supported(8, 2, "sigmoid")             # the small test models: TorchOps
    assert not supported(48, 2, "sigmoid")
    assert not supported(2048, 6, "sigmoid")
    assert not supported(256, 33, "sigmoid")
    assert not supported(256, 6, "relu")
    with pytest.raises(ValueError):
        MoeRoute(32, 33, "softmax", 1.0, False)


def test_cpu_tensors_fall_back_to_torch():
    import torch

    from dsv4.ops.cute_route import CuteRouteMixin, covers
    from dsv4.ops.torch_ops import TorchOps

    class Ops(CuteRouteMixin, TorchOps):
        pass

    x, gate, bias = torch.randn(3, 16), torch.randn(64, 16), torch.randn(64)
    assert not covers(x, gate, bias, None, torch.zeros(3, dtype=torch.long), 6, "sigmoid")
    ids, w = Ops("cpu", torch.float32).route(x, gate, bias, None, torch.zeros(3, dtype=torch.long), 6, "sigmoid", 2.0)
    want_ids, want_w = TorchOps("cpu", torch.float32).route(x, gate, bias, None, torch.zeros(3, dtype=torch.long), 6,
                                                            "sigmoid", 2.0)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)


@pytest.mark.parametrize("hashed", [False, True])
def test_tvm_ffi_compile_path(hashed):
    """The host path CuteOps takes: fake tensors built from torch dtypes, compiled with --enable-tvm-ffi."""
    pytest.importorskip("tvm_ffi")
    import torch

    from dsv4.ops import cute_attention as ca
    from dsv4.ops import cute_route as cr
    if not ca.TVM_FFI:
        pytest.skip("TVM-FFI disabled by DSV4_CUTE_NO_TVM_FFI")
    f32, i64 = torch.empty((1, 256)), torch.empty((1, 6), dtype=torch.int64)
    ex = [f32, torch.empty(1), i64, torch.empty(1, dtype=torch.int64), i64, torch.empty((1, 6))]
    launcher = cr._launcher(256, 6, "sqrtsoftplus", 2.5, hashed, 0, ex)
    assert launcher.tvm and launcher.fn is not None
