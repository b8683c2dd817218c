"""The glue kernels CuteGlueMixin launches (RmsNorm, Swiglu, HcPost) compile for sm_90a on the CPU
(CUTE_DSL_ARCH=sm_90a), both directly against fake tensors and through the engine's Launcher (TVM-FFI) path."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import cutlass  # noqa: E402  - a hard requirement: CI must compile every kernel, never skip
import cutlass.cute as cute  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream  # noqa: E402

from dsv4_kernels.mhc import HcPost  # noqa: E402
from dsv4_kernels.rmsnorm import RmsNorm, _row_threads  # noqa: E402
from dsv4_kernels.swiglu import Swiglu  # noqa: E402

BF, F32 = cutlass.BFloat16, cutlass.Float32


def _fake(dtype, rank, rows=True):
    vec = 16 // (dtype.width // 8)
    shape = tuple(cute.sym_int(divisibility=vec if (rows and i == rank - 1) else 1) for i in range(rank))
    return make_fake_compact_tensor(dtype, shape, stride_order=tuple(range(rank - 1, -1, -1)),
                                    assumed_align=16 if rows else dtype.width // 8)


@pytest.mark.parametrize("d", [4096, 1024, 512, 128, 64, 8, 7168, 8192, 96, 264])
def test_rmsnorm_geometry(d):
    k = RmsNorm(d, 1e-6, True)
    assert k.tpr >= d // 8 and k.threads % 32 == 0 and k.threads <= 1024
    assert k.tpr < 32 and k.threads == 128 or k.tpr % 32 == 0
    assert _row_threads(1) == 1 and _row_threads(12) == 16 and _row_threads(33) == 64



def test_rmsnorm_limits():
    from dsv4.ops.cute_glue import _RMS_MAX_DIM
    from dsv4_kernels.rmsnorm import MAX_DIM
    assert _RMS_MAX_DIM == MAX_DIM
    for bad in (8200, 60, 0):
        with pytest.raises(ValueError):
            RmsNorm(bad, 1e-6, True)


@pytest.mark.parametrize("d", [4096, 512, 64])
@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("has_weight", [True, False])
def test_rmsnorm_compiles(d, dtype, has_weight):
    cute.compile(RmsNorm(d, 1e-6, has_weight), _fake(dtype, 2), _fake(F32, 1), _fake(dtype, 2), make_fake_stream())


@pytest.mark.parametrize("d", [1024, 128, 8192, 96])
def test_rmsnorm_other_dims_compile(d):
    cute.compile(RmsNorm(d, 1e-5, True), _fake(BF, 2), _fake(F32, 1), _fake(BF, 2), make_fake_stream())


@pytest.mark.parametrize("dtype,out", [(BF, BF), (F32, BF), (F32, F32)])
@pytest.mark.parametrize("limit", [0.0, 10.0])
def test_swiglu_compiles(dtype, out, limit):
    cute.compile(Swiglu(limit), _fake(dtype, 2), _fake(dtype, 2), _fake(out, 2), make_fake_stream())


@pytest.mark.parametrize("n", [4, 2])
@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("sum_y", [False, True])
def test_hc_post_compiles(n, dtype, sum_y):
    cute.compile(HcPost(n, sum_y=sum_y), _fake(BF, 2), _fake(BF, 2), _fake(dtype, 3), _fake(F32, 2, False),
                 _fake(F32, 2, False), _fake(dtype, 3), make_fake_stream())


@pytest.mark.parametrize("n,splits", [(4, 2), (4, 8), (2, 3)])
@pytest.mark.parametrize("dtype", [BF, F32])
def test_hc_post_of_split_partials_compiles(n, splits, dtype):
    cute.compile(HcPost(n, splits=splits), _fake(F32, 2), _fake(F32, 2), _fake(dtype, 3), _fake(F32, 2, False),
                 _fake(F32, 2, False), _fake(dtype, 3), make_fake_stream())


def test_hc_post_takes_split_partials_or_a_two_part_output_not_both():
    with pytest.raises(ValueError, match="split partials"):
        HcPost(4, sum_y=True, splits=2)


# --- the engine's host path: Launcher, fake tensors built from torch tensors, --enable-tvm-ffi -----------------------

def _glue():
    pytest.importorskip("tvm_ffi")
    from dsv4.ops import cute_attention as ca
    from dsv4.ops import cute_glue as cg
    if not ca.TVM_FFI:
        pytest.skip("TVM-FFI disabled by DSV4_CUTE_NO_TVM_FFI")
    return ca, cg


@pytest.mark.parametrize("d,has_weight", [(4096, True), (512, False), (64, True)])
def test_rmsnorm_tvm_ffi_compile_path(d, has_weight):
    import torch
    ca, cg = _glue()
    x = torch.empty((1, d), dtype=torch.bfloat16)
    ex = [x, torch.empty(d), x]
    launcher = cg._rms_launcher(d, 1e-6, has_weight, 1, *ex)
    key = ("glue-rms", d, 1e-6, has_weight, torch.bfloat16, ca.chain_pdl(1), ca.hoist(1), True)
    assert launcher.tvm and launcher.fn is ca._COMPILED[key]


@pytest.mark.parametrize("limit", [0.0, 10.0])
def test_swiglu_tvm_ffi_compile_path(limit):
    import torch
    _, cg = _glue()
    g = torch.empty((1, 64), dtype=torch.bfloat16)
    assert cg._swiglu_launcher(limit, g, g, g).tvm


@pytest.mark.parametrize("n", [4, 2])
@pytest.mark.parametrize("sum_y", [False, True])
def test_hc_post_tvm_ffi_compile_path(n, sum_y):
    import torch
    _, cg = _glue()
    y = torch.empty((1, 64), dtype=torch.bfloat16)
    s = torch.empty((1, n, 64), dtype=torch.bfloat16)
    assert cg._hc_post_launcher(n, sum_y, y, y, s, torch.empty((1, n)), torch.empty((1, n * n)), s).tvm


def test_mixin_sits_ahead_of_torch_ops():
    """The lead's composition: the mixin's methods win, and fall back down the MRO (CPU tensors -> TorchOps)."""
    import torch

    from dsv4.ops.cute_glue import CuteGlueMixin
    from dsv4.ops.torch_ops import TorchOps

    class Ops(CuteGlueMixin, TorchOps):
        pass

    ops = Ops("cpu", torch.float32)
    ref = TorchOps("cpu", torch.float32)
    x = torch.randn(3, 64)
    w = torch.rand(64) + 0.5
    assert torch.equal(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    w1, w2, w3 = (torch.randn(32, 64), torch.randn(64, 32), torch.randn(32, 64))
    assert torch.equal(ops.swiglu_mlp(x, (w1, w3), w2, 7.0), ref.swiglu_mlp(x, (w1, w3), w2, 7.0))
    y, s = torch.randn(3, 64), torch.randn(3, 4, 64)
    post, comb = torch.rand(3, 4), torch.rand(3, 4, 4)
    assert torch.equal(ops.hc_post(y, s, post, comb), ref.hc_post(y, s, post, comb))
