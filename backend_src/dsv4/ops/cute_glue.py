"""CuTe DSL kernels for the small element-wise ops between the big ones: `rms_norm`, `swiglu_mlp`, `hc_post`.

Each replaces a chain of 3-7 tiny torch launches with one kernel (decode runs ~5 norms, one shared-expert SwiGLU and
two mHC updates per layer, so these chains were a good share of a decode step's launches):
- `rms_norm`: dsv4_kernels.rmsnorm (fp32 math, one rounding to x's dtype, as F.rms_norm on an fp32 copy);
- `swiglu_mlp`: the projections stay `self.linear_stack` (gate and up) and `self.linear` (down); the activation
  between them is dsv4_kernels.swiglu, which writes x's dtype directly (TorchOps: fp32 activation, then a cast);
- `hc_post`, `hc_post_sum`, `linear_hc_post`: dsv4_kernels.mhc.HcPost (the last one summing an FP8 GEMV's split-K
  partials itself).

`CuteGlueMixin` has the TorchOps signatures and goes ahead of TorchOps in the bases (CuteOps(CuteGlueMixin,
CuteAttentionMixin, TorchOps)); whatever the kernels do not cover (CPU tensors, other dtypes, dims not a multiple of
8, empty inputs) goes down the MRO through `super()`. Kernels compile once per variant through `Launcher` (TVM-FFI
where available). Nothing here reads device memory on the host, so decode steps stay CUDA-graph capturable.
"""

from __future__ import annotations

from typing import Any

import torch

from dsv4.ops.cute_attention import Launcher, chain_pdl, hoist, placeholder, unconverted

Tensor = torch.Tensor

_FLOATS = (torch.bfloat16, torch.float32)
_VEC = 8
_RMS_MAX_DIM = 8192      # dsv4_kernels.rmsnorm.MAX_DIM (one vector per thread; kept here so a call imports nothing)


def _compact(t: Tensor, align: int = 16) -> Tensor:
    """`t` itself when it is row-major compact with every stride exact (the kernels are compiled for that layout;
    torch's is_contiguous() lets a size-1 dim have any stride) and its start `align`-byte aligned; else a copy
    (the caching allocator's blocks are aligned)."""
    want, acc = [], 1
    for n in reversed(t.shape):
        want.append(acc)
        acc *= n
    if tuple(reversed(want)) == t.stride() and t.data_ptr() % align == 0:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _rows(t: Tensor, d: int) -> Tensor:
    """[..., d] -> a compact, 16-byte aligned [R, d] tensor: a view where it can be, a copy where it must."""
    return _compact(t.reshape(-1, d))


class CuteGlueMixin:
    fused_glue = True      # CuteOps sets it per instance (on unless DSV4_CUTE_FUSED_GLUE=0)

    # --- rms_norm ----------------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        """One kernel (dsv4_kernels.rmsnorm) instead of F.rms_norm on an fp32 copy plus a cast."""
        D = x.shape[-1]
        if not (self.fused_glue and x.is_cuda and x.dtype in _FLOATS and D % _VEC == 0 and D <= _RMS_MAX_DIM
                and x.numel()
                and (weight is None or (weight.is_cuda and weight.shape == (D,) and weight.is_floating_point()))):
            return super().rms_norm(x, weight, eps)
        x2 = _rows(x, D)
        if weight is None:
            w = placeholder((_VEC,), torch.float32, x.device)
        else:
            w = weight if weight.dtype == torch.float32 else weight.float()
            w = _compact(w)
        out = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        tokens = x.shape[0] if x.dim() > 1 else 1
        _rms_launcher(D, float(eps), weight is not None, tokens, x2, w, out,
                      constant=unconverted((weight, w)))(x2, w, out)
        return out.view(x.shape)

    # --- swiglu_mlp --------------------------------------------------------------------------------------------
    def swiglu_mlp(self, x: Tensor, w13: Any, w2: Any, swiglu_limit: float) -> Tensor:
        """self.linear_stack / self.linear for the projections (gate and up one GEMV at one token); the activation
        between them one kernel (dsv4_kernels.swiglu)."""
        if not self.fused_glue:
            return super().swiglu_mlp(x, w13, w2, swiglu_limit)
        gate, up = self.linear_stack(x, w13)
        I = gate.shape[-1]
        if not (gate.is_cuda and gate.dtype in _FLOATS and up.dtype == gate.dtype and up.shape == gate.shape
                and x.dtype in _FLOATS and I % _VEC == 0 and gate.numel()):
            # not super().swiglu_mlp: the projections are done already
            h = self._swiglu(gate, up, swiglu_limit)
            return self.linear(h.to(x.dtype), w2)
        g2, u2 = _rows(gate, I), _rows(up, I)
        h = torch.empty(g2.shape, dtype=x.dtype, device=g2.device)
        limit = float(swiglu_limit) if swiglu_limit > 0 else 0.0
        _swiglu_launcher(limit, g2, u2, h)(g2, u2, h)
        return self.linear(h.view(*gate.shape[:-1], I), w2)

    # --- hc_post -----------------------------------------------------------------------------------------------
    def hc_post(self, y: Tensor, streams: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """One kernel (dsv4_kernels.mhc.HcPost) instead of TorchOps' ~6 launches."""
        if not self._hc_post_fits(y, streams, post, comb):
            return super().hc_post(y, streams, post, comb)
        return self._hc_post_kernel(y, None, streams, post, comb)

    def hc_post_sum(self, y: Tensor, y2: Tensor, streams: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """hc_post(y + y2, ...) with the add inside the HcPost kernel (the MoE's routed + shared outputs)."""
        if not (self._hc_post_fits(y, streams, post, comb) and y2.shape == y.shape and y2.dtype == y.dtype
                and y2.device == y.device):
            return super().hc_post_sum(y, y2, streams, post, comb)
        return self._hc_post_kernel(y, y2, streams, post, comb)

    def linear_hc_post(self, x: Tensor, w: Any, streams: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """An FP8 output projection whose decode GEMV splits K: its partials go to HcPost, which sums them as the
        split reduce would (same bits): one launch less on the decode chain (wo_b, every layer)."""
        from dsv4_kernels.fp8_gemm import PackedFP8, fp8_gemv_partials
        if (isinstance(w, PackedFP8) and self.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.dim() == 2
                and streams.dim() == 3 and streams.shape[2] == w.n
                and self._hc_post_fits(streams[:, 0], streams, post, comb)):
            part = fp8_gemv_partials(x if x.is_contiguous() else x.contiguous(), w)
            if part is not None:
                return self._hc_post_kernel(part.view(-1, w.n), None, streams, post, comb, splits=part.shape[0])
        return super().linear_hc_post(x, w, streams, post, comb)

    def _hc_post_fits(self, y: Tensor, streams: Tensor, post: Tensor, comb: Tensor) -> bool:
        if not self.fused_glue or streams.dim() != 3 or y.dim() != 2:
            return False
        T, n, D = streams.shape
        return (streams.is_cuda and streams.dtype in _FLOATS and y.dtype in _FLOATS and y.shape == (T, D)
                and 1 <= n <= 8 and D % _VEC == 0 and T and D and post.shape == (T, n) and comb.shape == (T, n, n)
                and post.is_floating_point() and comb.is_floating_point())

    def _hc_post_kernel(self, y: Tensor, y2: Tensor | None, streams: Tensor, post: Tensor, comb: Tensor,
                        splits: int = 0) -> Tensor:
        """The HcPost launch; with `splits`, y is the output projection's fp32 split partials [splits * T, D]."""
        T, n, D = streams.shape
        ya = _rows(y, D)
        yb = ya if y2 is None else _rows(y2, D)
        s3 = _rows(streams, D).view(T, n, D)
        p2 = _compact(post.float(), 4)
        c2 = _compact(comb.float().reshape(T, n * n), 4)
        out = torch.empty((T, n, D), dtype=streams.dtype, device=streams.device)
        _hc_post_launcher(n, y2 is not None, ya, yb, s3, p2, c2, out, splits=splits)(ya, yb, s3, p2, c2, out)
        return out


_RMS_SPEC = (("t", True), ("t", True), ("t", True))
_SWIGLU_SPEC = (("t", True), ("t", True), ("t", True))
_HC_POST_SPEC = (("t", True), ("t", True), ("t", True), ("t", False), ("t", False), ("t", True))


def _rms_launcher(dim: int, eps: float, has_weight: bool, tokens: int, *example: Tensor,
                  constant: bool = True) -> Launcher:
    """constant: the weight is no kernel's output in this step, so the kernel may load it before its wait."""
    def make():
        from dsv4_kernels.rmsnorm import RmsNorm
        return RmsNorm(dim, eps, has_weight, pdl, early)
    pdl, early = chain_pdl(tokens), hoist(tokens) and constant
    return Launcher(("glue-rms", dim, eps, has_weight, example[0].dtype, pdl, early), make, _RMS_SPEC,
                    list(example))


def _swiglu_launcher(limit: float, *example: Tensor) -> Launcher:
    def make():
        from dsv4_kernels.swiglu import Swiglu
        return Swiglu(limit, pdl)
    pdl = chain_pdl(example[0].shape[0])
    return Launcher(("glue-swiglu", limit, example[0].dtype, example[2].dtype, pdl), make, _SWIGLU_SPEC,
                    list(example))


def _hc_post_launcher(n: int, sum_y: bool, *example: Tensor, splits: int = 0) -> Launcher:
    def make():
        from dsv4_kernels.mhc import HcPost
        return HcPost(n, pdl, sum_y, splits)
    pdl = chain_pdl(example[2].shape[0])          # streams: one row per token
    return Launcher(("glue-hc-post", n, sum_y, splits, example[0].dtype, example[2].dtype, pdl), make, _HC_POST_SPEC,
                    list(example))

