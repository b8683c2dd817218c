"""CuTe DSL MoE gate for CuteOps: `route` as the gate matmul (cuBLAS, as TorchOps, or for decode-sized batches
mhc_pre.HcMix's partial sums) plus one kernel (kernels/dsv4_kernels/moe_route.py) for scores, top-k / hash lookup
and weights, instead of ~10 launches per layer.

`CuteRouteMixin` has the TorchOps signature; CuteOps mixes it in ahead of TorchOps. CPU tensors and gates the kernel
does not cover (E not a multiple of 32 or above 1024, top-k above 32, unknown score functions, a tid2eid table whose
width is not top-k) go to the TorchOps implementation through `super()`. Nothing is read back to the host, so the
call is CUDA-graph capturable. Ties in the biased scores go to the lower expert index (torch.topk leaves their order
unspecified).
"""

from __future__ import annotations

import torch

from dsv4.ops.cute_attention import Launcher, chain_pdl, hoist, placeholder, unconverted

Tensor = torch.Tensor

_ROUTE_SPEC = (("t", False),) * 6
# Up to this many tokens the gate GEMV is mhc_pre.HcMix (partials MoeRoute sums) instead of a cast and cuBLAS.
# HcMix reads the whole fp32 gate (4 MB for V4-Flash) from L2 once per token: on the H100 route() took 0.35-0.63x
# cuBLAS's time up to 16 tokens and 1.07x / 1.70x at 32 / 64 (docs/PERF.md, session 22).
GATE_MIX_MAX_TOKENS = 16


def _launcher(E: int, topk: int, score_func: str, route_scale: float, hashed: bool, num_partials: int,
              example: list, constant: bool = True) -> Launcher:
    """constant: the bias is no kernel's output in this step, so the kernel may load it before its wait."""
    from dsv4_kernels.moe_route import MoeRoute
    pdl, early = chain_pdl(example[0].shape[0]), hoist(example[0].shape[0]) and constant
    return Launcher(("moe_route", E, topk, score_func, float(route_scale), hashed, num_partials, pdl, early),
                    lambda: MoeRoute(E, topk, score_func, float(route_scale), hashed, num_partials, pdl, early),
                    _ROUTE_SPEC, example)


def gate_logits(x: Tensor, gate: Tensor) -> tuple[Tensor, int]:
    """-> (logits [T, E], 0) or, for decode-sized batches, (HcMix partials [T, S, E + 1], S)."""
    T, K = x.shape
    if (T <= GATE_MIX_MAX_TOKENS and K % 8 == 0 and x.dtype in (torch.bfloat16, torch.float32)
            and gate.dtype == torch.float32):
        from dsv4.ops.cute import _mix_launcher
        from dsv4_kernels.mhc_pre import num_chunks
        xc = x if x.is_contiguous() else x.contiguous()
        g = gate if gate.is_contiguous() else gate.contiguous()
        part = torch.empty((T, num_chunks(K), gate.shape[0] + 1), dtype=torch.float32, device=x.device)
        _mix_launcher(gate.shape[0], xc, g, part)(xc, g, part)
        return part, part.shape[1]
    logits = x.float() @ gate.T          # the same expression as TorchOps, so the logits are the same
    return (logits if logits.is_contiguous() else logits.contiguous()), 0


def covers(x: Tensor, gate: Tensor, gate_bias: Tensor | None, tid2eid: Tensor | None, token_ids: Tensor, topk: int,
           score_func: str) -> bool:
    if not (x.is_cuda and x.dim() == 2 and gate.dim() == 2 and x.shape[0] > 0 and x.shape[1] == gate.shape[1]):
        return False
    from dsv4_kernels.moe_route import supported
    E = gate.shape[0]
    if not supported(E, topk, score_func) or topk > E:
        return False
    if tid2eid is not None:
        return (tid2eid.dim() == 2 and tid2eid.shape[1] == topk and tid2eid.dtype == torch.int64
                and token_ids.shape == (x.shape[0],) and not token_ids.is_floating_point())
    return gate_bias is not None and gate_bias.numel() == E


def route(x: Tensor, gate: Tensor, gate_bias: Tensor | None, tid2eid: Tensor | None, token_ids: Tensor, topk: int,
          score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
    """The kernel path of Ops.route (callers check `covers` first)."""
    logits, num_partials = gate_logits(x, gate)
    T, E = x.shape[0], gate.shape[0]
    dev = logits.device
    hashed = tid2eid is not None
    if hashed:
        bias = placeholder((1,), torch.float32, dev)
        table = tid2eid if tid2eid.is_contiguous() else tid2eid.contiguous()
        tok = token_ids if token_ids.dtype == torch.int64 else token_ids.long()
        tok = tok if tok.is_contiguous() else tok.contiguous()
    else:
        bias = gate_bias.reshape(E)
        bias = bias if bias.dtype == torch.float32 and bias.is_contiguous() else bias.float().contiguous()
        table = placeholder((1, topk), torch.int64, dev)
        tok = placeholder((1,), torch.int64, dev)
    ids = torch.empty((T, topk), dtype=torch.int64, device=dev)
    weights = torch.empty((T, topk), dtype=torch.float32, device=dev)
    args = [logits, bias, table, tok, ids, weights]
    own = hashed or unconverted((gate_bias, bias))
    _launcher(E, topk, score_func, route_scale, hashed, num_partials, args, constant=own)(*args)
    return ids, weights


class CuteRouteMixin:
    """`route` through dsv4_kernels.moe_route where it applies; mixed in ahead of TorchOps."""

    def route(self, x: Tensor, gate: Tensor, gate_bias: Tensor | None, tid2eid: Tensor | None, token_ids: Tensor,
              topk: int, score_func: str, route_scale: float) -> tuple[Tensor, Tensor]:
        if getattr(self, "fused_glue", True) and covers(x, gate, gate_bias, tid2eid, token_ids, topk, score_func):
            return route(x, gate, gate_bias, tid2eid, token_ids, topk, score_func, route_scale)
        return super().route(x, gate, gate_bias, tid2eid, token_ids, topk, score_func, route_scale)
