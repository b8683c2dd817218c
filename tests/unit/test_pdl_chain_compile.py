"""Decode's chain kernels keep the programmatic-dependent-launch protocol (dsv4_kernels.pdl), read off the sm_90a PTX
compiled on the CPU (CUTE_DSL_ARCH=sm_90a):
- compiled for PDL, a kernel touches no global memory before `griddepcontrol.wait`, except the kernels that read
  constant weights or the step's inputs there (the FP8 GEMV's first iteration, HcMix's mixing weights; with
  dsv4_kernels.pdl.HOIST the norms' weights, RoPE's positions and angles, the routing's bias / hash table, the
  combine's sinks), and those only load;
- compiled without PDL, the kernel never waits (griddepcontrol.wait), as before the chain: a split attention kernel
  still lets its combine launch early, as it always has;
- the MoE ring gate_up waits before anything else (the down kernel it lets launch reads the routing early)."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
import cutlass  # noqa: E402  - a hard requirement: CI must compile every kernel, never skip
import cutlass.cute as cute  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream  # noqa: E402

from dsv4_kernels import fp8_gemm  # noqa: E402
from dsv4_kernels.attention_decode import MODE_WINDOW, SparseDecodeAttention, SplitCombineRope  # noqa: E402
from dsv4_kernels.attention_decode_wgmma import SparseDecodeAttentionWgmma  # noqa: E402
from dsv4_kernels.indexer import VisibleEntries  # noqa: E402
from dsv4_kernels.kv_write import KVScatter  # noqa: E402
from dsv4_kernels.mhc import HcCoefficients, HcPost  # noqa: E402
from dsv4_kernels.mhc_pre import HcCollapse, HcMix  # noqa: E402
from dsv4_kernels.moe_route import MoeRoute  # noqa: E402
from dsv4_kernels.rmsnorm import RmsNorm  # noqa: E402
from dsv4_kernels.rope import RopeTail  # noqa: E402
from dsv4_kernels.swiglu import Swiglu  # noqa: E402

BF, I32, I64, F32 = cutlass.BFloat16, cutlass.Int32, cutlass.Int64, cutlass.Float32
GLOBAL_ACCESS = re.compile(r"\b(ld|st|cp\.async|red|atom)\.[\w.]*global")
GLOBAL_WRITE = re.compile(r"\b(st|red|atom)\.[\w.]*global")
PREFETCH_WEIGHTS = {"hc_mix"}          # its fn rows go out before the wait
# with pdl.HOIST: weights, tables and the step's positions / token ids before the wait
HOISTED = {"rmsnorm", "rope", "route", "hc_collapse", "combine_rope"}


def _t(dtype, rank, rows=True):
    shape = tuple(cute.sym_int(divisibility=8 if (rows and i == rank - 1) else 1) for i in range(rank))
    return make_fake_compact_tensor(dtype, shape, stride_order=tuple(range(rank - 1, -1, -1)),
                                    assumed_align=16 if rows else dtype.width // 8)


def _chain_kernels(pdl: bool):
    """(name, kernel object, fake arguments) of every chain kernel a window layer's decode step launches."""
    s = make_fake_stream()
    return [
        ("rmsnorm", RmsNorm(512, 1e-6, True, pdl), (_t(BF, 2), _t(F32, 1), _t(BF, 2), s)),
        ("rope", RopeTail(512, 64, False, "weight", 1e-6, pdl),
         (_t(BF, 2), _t(I64, 1, False), _t(F32, 2, False), _t(F32, 2, False), _t(F32, 1, False), _t(BF, 2), I32(1),
          s)),
        ("kv_scatter", KVScatter(512, pdl), (_t(BF, 2), _t(I64, 1, False), _t(BF, 2), s)),
        ("swiglu", Swiglu(10.0, pdl), (_t(BF, 2), _t(BF, 2), _t(BF, 2), s)),
        ("visible_entries", VisibleEntries(pdl), (_t(I32, 1, False), _t(I64, 2, False), I32(512), s)),
        ("route", MoeRoute(256, 6, "sqrtsoftplus", 2.5, False, 4, pdl),
         (_t(F32, 3, False), _t(F32, 1, False), _t(I64, 2, False), _t(I64, 1, False), _t(I64, 2, False),
          _t(F32, 2, False), s)),
        ("hc_coefficients", HcCoefficients(4, 20, 1e-6, 1e-6, True, 4, pdl),
         (_t(F32, 3, False), _t(F32, 1, False), _t(F32, 1, False), _t(F32, 1, False), _t(F32, 2, False),
          _t(F32, 2, False), _t(F32, 2, False), F32(1.0), s)),
        ("hc_post", HcPost(4, pdl), (_t(BF, 2), _t(BF, 2), _t(BF, 3), _t(F32, 2, False), _t(F32, 2, False),
                                     _t(BF, 3), s)),
        ("hc_post_sum", HcPost(4, pdl, sum_y=True), (_t(BF, 2), _t(BF, 2), _t(BF, 3), _t(F32, 2, False),
                                                     _t(F32, 2, False), _t(BF, 3), s)),
        ("hc_mix", HcMix(24, pdl), (_t(BF, 2), _t(F32, 2), _t(F32, 3, False), s)),
        ("hc_collapse", HcCollapse(4, 4096, 16, 1e-6, 1e-6, 1e-6, pdl),
         (_t(BF, 2), _t(F32, 3, False), _t(F32, 1, False), _t(F32, 1, False), _t(F32, 1, False), _t(BF, 2),
          F32(1.0), s)),
        ("combine_rope", SplitCombineRope(512, 64, pdl),
         (_t(F32, 4), _t(F32, 4, False), _t(F32, 1, False), _t(I64, 1, False), _t(F32, 2, False), _t(F32, 2, False),
          _t(BF, 3), I32(2), s)),
        ("attention", SparseDecodeAttention(512, 64, MODE_WINDOW, 128, 128, 128, 64, True, pdl=pdl),
         (_t(BF, 3), _t(BF, 2), _t(BF, 2), _t(I32, 1, False), _t(I32, 1, False), _t(I32, 2, False),
          _t(I32, 2, False), _t(I32, 2, False), _t(F32, 1, False), _t(BF, 3), _t(BF, 4), _t(F32, 4, False),
          F32(0.1), I32(1), I32(1), s)),
        ("attention_wgmma", SparseDecodeAttentionWgmma(512, MODE_WINDOW, 128, 128, 128, 64, False, cluster=2, pdl=pdl),
         (_t(BF, 3), _t(BF, 2), _t(BF, 2), _t(I32, 1, False), _t(I32, 1, False), _t(I32, 2, False),
          _t(I32, 2, False), _t(I32, 2, False), _t(F32, 1, False), _t(BF, 3), _t(F32, 4), _t(F32, 4, False),
          F32(0.1), I32(1), I32(1), s)),
    ]


def _ptx(tmp_path, kernel, args) -> str:
    return cute.compile(kernel, *args, options=f"--keep-ptx --dump-dir={tmp_path}").artifacts.PTX


def _before_wait(ptx: str) -> str:
    assert ptx.count("griddepcontrol.wait") >= 1, "a PDL kernel must wait for its predecessor"
    return ptx.split("griddepcontrol.wait")[0]


@pytest.mark.parametrize("index", range(len(_chain_kernels(False))))
def test_a_chain_kernel_waits_before_it_touches_memory(index, tmp_path):
    name, kernel, args = _chain_kernels(True)[index]
    head = _before_wait(_ptx(tmp_path, kernel, args))
    if name in PREFETCH_WEIGHTS | HOISTED:
        assert "ld.global" in head and not GLOBAL_WRITE.search(head), f"{name}: weight loads only, before the wait"
    else:
        assert not GLOBAL_ACCESS.search(head), f"{name}: global memory access before griddepcontrol.wait"
    assert "griddepcontrol.launch_dependents" in head, f"{name}: the next kernel should launch while this one runs"


@pytest.mark.parametrize("name", sorted(HOISTED))
def test_without_hoisting_a_chain_kernel_loads_nothing_before_its_wait(name, tmp_path, monkeypatch):
    """pdl.HOIST off (the A/B variant): the kernels that load weights and step inputs early wait first."""
    from dsv4_kernels import pdl
    monkeypatch.setattr(pdl, "HOIST", False)
    _, kernel, args = next(k for k in _chain_kernels(True) if k[0] == name)
    assert not GLOBAL_ACCESS.search(_before_wait(_ptx(tmp_path, kernel, args))), name


@pytest.mark.parametrize("index", range(len(_chain_kernels(False))))
def test_without_pdl_a_chain_kernel_never_waits(index, tmp_path):
    name, kernel, args = _chain_kernels(False)[index]
    ptx = _ptx(tmp_path, kernel, args)
    if name == "combine_rope":
        # the split combine has always waited unconditionally (a no-op without PDL); it lets nothing launch early
        assert "griddepcontrol.launch_dependents" not in ptx
        return
    assert "griddepcontrol.wait" not in ptx, name
    if name != "attention":
        assert "griddepcontrol" not in ptx, name


def _gemv_ptx(tmp_path, pdl: bool, groups: int = 1) -> str:
    n, k = 4096, 1024
    splits, unroll, prefetch = fp8_gemm.fp8_gemv_plan(n, k)
    obj = fp8_gemm._Gemv(n, k, 1, splits, unroll, prefetch, (128, 128), groups, pdl)
    m = cute.sym_int()
    args = (*fp8_gemm._weight_fakes(n, k, (128, 128)), fp8_gemm._fake(I32, (m, groups * k // 16, 8)),
            fp8_gemm._fake(BF, (m, n), 2), fp8_gemm._fake(F32, (splits, m, n), 4), I32(1), make_fake_stream())
    return cute.compile(obj.launch, *args, options=f"--keep-ptx --dump-dir={tmp_path}").artifacts.PTX


@pytest.mark.parametrize("groups", [1, 4])
def test_the_fp8_gemv_loads_weights_before_it_waits_and_x_after(groups, tmp_path):
    ptx = _gemv_ptx(tmp_path, True, groups)
    head = _before_wait(ptx)
    loads = re.findall(r"ld\.global[\w.]*", head)
    assert loads, "the weight loads should be in flight before griddepcontrol.wait"
    # x is read only after the wait; before it there are only the weight (v4) and scale loads
    assert "st.global" not in head
    tail = ptx.split("griddepcontrol.wait")[1]
    assert "griddepcontrol.launch_dependents" in tail and re.search(r"ld\.global", tail)


def test_the_fp8_gemv_without_pdl_has_no_griddepcontrol(tmp_path):
    assert "griddepcontrol" not in _gemv_ptx(tmp_path, False)


def _moe_ring_ptx(tmp_path, mode: str, pdl: bool) -> str:
    from dsv4_kernels import nvfp4_moe_ring as ring
    e, d, inter, topk = 8, 1024, 512, 6
    n, k = (2 * inter, d) if mode == "gateup_h" else (d, inter)
    obj = ring._DecodeRing(mode, n, k, 1, 1, topk, 4, 4, pdl)
    a = cute.sym_int()
    xin = ring._fake(I32, (a if mode == "down" else cute.sym_int(), k // 16, 8))
    out = ring._fake(BF, (a, n // 2), 2) if mode == "gateup_h" else ring._fake(F32, (1, a, n), 4)
    args = (ring._fake(I32, (e, n // 16, k // 64, 32, 4)), ring._fake(cutlass.Int16, (e, n // 16, k // 64, 32), 2),
            ring._fake(I64, (a,), 4), xin, ring._fake(F32, (a,), 2), ring._fake(F32, (e, 3), 4), out, I32(1),
            F32(0.0), make_fake_stream())
    return cute.compile(obj.launch, *args, options=f"--keep-ptx --dump-dir={tmp_path}").artifacts.PTX


def test_the_moe_gate_up_waits_for_the_routing_before_it_reads_ids_or_lets_the_down_kernel_launch(tmp_path):
    """The down kernel reads the expert ids before its own wait, so gate_up, launched early behind the routing
    kernel, may only let it launch after gate_up's wait has returned."""
    ptx = _moe_ring_ptx(tmp_path, "gateup_h", True)
    head = _before_wait(ptx)
    assert not GLOBAL_ACCESS.search(head) and "griddepcontrol.launch_dependents" not in head
    assert "griddepcontrol.launch_dependents" in ptx.split("griddepcontrol.wait")[1]


def test_the_moe_down_kernel_streams_weights_before_it_waits_for_h(tmp_path):
    head = _before_wait(_moe_ring_ptx(tmp_path, "down", True))
    assert "cp.async" in head and not GLOBAL_WRITE.search(head)


def test_the_moe_gate_up_without_pdl_never_waits(tmp_path):
    assert "griddepcontrol.wait" not in _moe_ring_ptx(tmp_path, "gateup_h", False)


def test_the_token_limit_comes_from_the_environment_or_says_what_is_wrong(monkeypatch):
    from dsv4_kernels import pdl
    monkeypatch.setenv("DSV4_CHAIN_PDL_MAX_TOKENS", "16")
    assert pdl.max_tokens_setting() == 16
    monkeypatch.delenv("DSV4_CHAIN_PDL_MAX_TOKENS")
    assert pdl.max_tokens_setting() == 8
    for bad in ("eight", "-1", "2.5"):
        monkeypatch.setenv("DSV4_CHAIN_PDL_MAX_TOKENS", bad)
        with pytest.raises(ValueError, match="DSV4_CHAIN_PDL_MAX_TOKENS"):
            pdl.max_tokens_setting()


def test_only_steps_up_to_the_limit_take_the_chain(monkeypatch):
    from dsv4_kernels import pdl
    monkeypatch.setattr(pdl, "MAX_TOKENS", 8)
    monkeypatch.setattr(pdl, "CHAIN", True)
    assert pdl.chain(1) and pdl.chain(8) and not pdl.chain(9)
    monkeypatch.setattr(pdl, "CHAIN", False)
    assert not pdl.chain(1)


def test_only_the_callers_own_weights_count_as_loadable_before_the_wait():
    """A cast or contiguous copy made for the call is written by a kernel of the step, so the launchers build the
    kernel with its loads after the wait for it (dsv4.ops.cute_attention.unconverted); a view of the caller's own
    tensor, or no weight, is fine."""
    import torch
    from dsv4.ops.cute_attention import unconverted
    w = torch.ones(64)
    assert unconverted((w, w), (w, w.reshape(8, 8)), (None, torch.zeros(1)))
    assert not unconverted((w, w), (w.to(torch.float64), w.to(torch.float64).float()))
    assert not unconverted((w.half(), w.half().float()))
