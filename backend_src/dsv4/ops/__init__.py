"""Op implementations and the choice between them."""

from __future__ import annotations

import torch

from dsv4.errors import ConfigError
from dsv4.ops.base import ForwardBatch, LayerCache, Ops
from dsv4.ops.torch_ops import TorchOps


def cute_available(device: torch.device) -> tuple[bool, str]:
    """Whether the CuTe DSL ops can run here, and why not."""
    if device.type != "cuda":
        return False, "the device is not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return False, f"the GPU is sm_{major}{minor}; the CuTe DSL kernels are built for Hopper (sm_90) only"
    try:
        import dsv4.ops.cute  # noqa: F401  (imports dsv4_kernels and CuTe DSL)
    except ImportError as e:
        return False, f"the CuTe DSL kernels are not importable: {e}"
    return True, ""


def select_ops(backend: str, device: torch.device, dtype: torch.dtype) -> Ops:
    """`auto`: CuTe DSL on a Hopper GPU when the kernels import, else torch. `cute` where it cannot run is an error."""
    if backend == "torch":
        return TorchOps(device, dtype)
    ok, why = cute_available(device)
    if backend == "cute" and not ok:
        raise ConfigError(f"ops_backend 'cute' was requested but {why}; use ops_backend 'torch' or 'auto'")
    if ok:
        from dsv4.ops.cute import CuteOps
        return CuteOps(device, dtype)
    return TorchOps(device, dtype)


__all__ = ["ForwardBatch", "LayerCache", "Ops", "TorchOps", "select_ops", "cute_available"]
