"""Random, deterministic weights for every tensor of `model_specs(cfg)`.

Each tensor draws from its own `torch.Generator`, seeded from (seed, tensor name): a tensor's values do not depend on
which other tensors are generated or in which order, so checkpoints of the same seed in different storage formats
hold the same underlying weights, and one tensor can be regenerated alone (tests do).

Initialisations (`TensorSpec.init`):
    normal   N(0, spec.std)                      (projections: std = gain / sqrt(fan_in), set in names.py)
    ones     1 + N(0, 0.02)                      (RMSNorm weights)
    zeros    0
    hc_base  mHC bias [(2+n)*n]: pre and post parts ~0, comb part +2 on the diagonal logits (the stream mixer starts
             near identity: softmax over 4 logits with +2 on the diagonal gives ~0.71 on the diagonal), + N(0, 0.02)
    sink     N(0, 0.5) per head (attention-sink logits of the same order as the attention logits)
    tid2eid  [vocab, k]: for each token id, k distinct experts drawn uniformly

Dtypes yielded: float32 for `linear`, `expert` and `fp32` roles (the writer quantises the float32 master), bfloat16
for the `bf16` role (what is stored), int64 for `table`.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import torch

from dsv4.checkpoint.names import TensorSpec, model_specs
from dsv4.config import ModelConfig
from dsv4.errors import ConfigError

NORM_JITTER = 0.02
HC_COMB_DIAG = 2.0
HC_JITTER = 0.02
SINK_STD = 0.5
_CHUNK_ELEMS = 1 << 24   # large tensors are drawn in row chunks of about this many elements (bounds peak memory)


def tensor_seed(seed: int, name: str) -> int:
    """The 63-bit seed of one tensor: a hash of the checkpoint seed and the tensor's name."""
    digest = hashlib.sha256(f"dsv4/{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(tensor_seed(seed, name))
    return g


def _normal(shape: tuple[int, ...], std: float, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """std * N(0, 1) in `dtype`, drawn in fixed row chunks (the chunking depends on the shape only)."""
    out = torch.empty(shape, dtype=dtype)
    if out.numel() == 0:
        return out
    rows = out.view(shape[0], -1) if len(shape) > 1 else out.view(1, -1)
    per_row = rows.shape[1]
    step = max(1, _CHUNK_ELEMS // max(per_row, 1))
    for r in range(0, rows.shape[0], step):
        chunk = torch.randn((min(step, rows.shape[0] - r), per_row), generator=g, dtype=torch.float32)
        rows[r:r + chunk.shape[0]] = chunk.mul_(std)
    return out


def _tid2eid(vocab: int, n_experts: int, k: int, g: torch.Generator) -> torch.Tensor:
    out = torch.empty((vocab, k), dtype=torch.int64)
    step = max(1, _CHUNK_ELEMS // n_experts)
    for r in range(0, vocab, step):
        n = min(step, vocab - r)
        keys = torch.rand((n, n_experts), generator=g)
        out[r:r + n] = keys.argsort(dim=-1, stable=True)[:, :k]
    return out


def generate_tensor(cfg: ModelConfig, spec: TensorSpec, seed: int = 0) -> torch.Tensor:
    """The dense value of one tensor (see the module docstring for dtypes and initialisations)."""
    g = _generator(seed, spec.param_name)
    dtype = torch.bfloat16 if spec.role == "bf16" else torch.float32
    shape = spec.shape
    if spec.init == "normal":
        return _normal(shape, spec.std, g, dtype)
    if spec.init == "ones":
        return _normal(shape, NORM_JITTER, g, torch.float32).add_(1.0).to(dtype)
    if spec.init == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if spec.init == "sink":
        return _normal(shape, spec.std or SINK_STD, g, dtype)
    if spec.init == "hc_base":
        n = cfg.hc_mult
        if shape != ((2 + n) * n,):
            raise ConfigError(f"{spec.name}: hc_base init expects shape [{(2 + n) * n}], got {list(shape)}")
        base = _normal(shape, HC_JITTER, g, torch.float32)
        comb = base[2 * n:].view(n, n)
        comb.diagonal().add_(HC_COMB_DIAG)
        return base.to(dtype)
    if spec.init == "tid2eid":
        vocab, k = shape
        if k > cfg.n_routed_experts:
            raise ConfigError(f"{spec.name}: {k} experts per token exceeds n_routed_experts={cfg.n_routed_experts}")
        return _tid2eid(vocab, cfg.n_routed_experts, k, g)
    raise ConfigError(f"{spec.name}: unknown init {spec.init!r}")


def generate_tensors(cfg: ModelConfig, seed: int = 0,
                     specs: Iterable[TensorSpec] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(param_name, dense tensor) for every spec, in `model_specs` order, one at a time (lazy)."""
    for spec in (model_specs(cfg) if specs is None else specs):
        yield spec.param_name, generate_tensor(cfg, spec, seed)


__all__ = ["generate_tensor", "generate_tensors", "tensor_seed"]
