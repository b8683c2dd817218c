"""Bulk L2 prefetch of a byte range: a probe of whether idle HBM time at decode can pull the next weights into L2.

A batch-1 decode layer alternates between kernels that stream a weight (HBM-bound) and chains of small kernels
(mHC mixes, norms, RoPE, routing, attention over a short cache) during which HBM sits idle. The idea: launched on a
side stream before such a chain, this kernel asks the TMA units to pull the next weight into L2
(`cp.async.bulk.prefetch.L2`: no registers, no shared memory, nothing to wait for; each lane one prefetch of `chunk`
bytes, CTAs of one warp), so that the GEMV after the chain reads L2. Measured on H100 (`scripts/l2_prefetch_probe.py`,
docs/PERF.md session 21): issuing is not free (the kernel runs 7-49 us for 8-34 MB), and beside other work the GEMV
after it got slower, not faster. Not used by the model; kept as the probe behind that result.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Int32, Int64

from dsv4_kernels.fp8_gemm import _prefetch_l2
from dsv4_kernels.nvfp4_gemm import _call, _fake, _options, _stream_arg, _TVM_FFI

CHUNK = 8192          # bytes per bulk prefetch (a lane's share)
THREADS = 32
MAX_BYTES = 1 << 30   # per launch (Int32 offsets); longer ranges take several launches


class L2Prefetch:
    """Prefetch [addr, addr + nbytes) into L2, rounded down to 16 bytes (the instruction's granule)."""

    def __init__(self, chunk: int = CHUNK, threads: int = THREADS):
        if chunk % 16 or chunk <= 0 or threads % 32:
            raise ValueError(f"L2 prefetch: chunk ({chunk}) must be a positive multiple of 16 bytes and threads "
                             f"({threads}) whole warps")
        self.chunk, self.threads = chunk, threads

    @cute.jit
    def __call__(self, mBytes: cute.Tensor, stream):
        per_cta = self.chunk * self.threads
        grid = (cute.size(mBytes.shape[0]) + per_cta - 1) // per_cta
        self.kernel(mBytes).launch(grid=[grid, 1, 1], block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mBytes: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        addr = mBytes.iterator.toint()
        nbytes = Int32(cute.size(mBytes.shape[0]))
        off = (bidx * self.threads + tidx) * self.chunk
        if off < nbytes:
            n = nbytes - off
            if n > self.chunk:
                n = Int32(self.chunk)
            n = n // 16 * 16
            if n > 0:
                _prefetch_l2(addr + Int64(off), n)


_COMPILED: dict = {}


def compile_prefetch(chunk: int = CHUNK, threads: int = THREADS):
    key = (chunk, threads, _TVM_FFI)
    fn = _COMPILED.get(key)
    if fn is None:
        fn = cute.compile(L2Prefetch(chunk, threads), _fake(cutlass.Uint8, (cute.sym_int(),)), _stream_arg(),
                          options=_options())
        _COMPILED[key] = fn
    return fn


def l2_prefetch(t: torch.Tensor, chunk: int = CHUNK, threads: int = THREADS) -> None:
    """Launch on the current stream a prefetch of the bytes of `t` (a contiguous CUDA tensor) into L2. Asynchronous,
    reads nothing on the host, CUDA-graph capturable; results are not observable except as speed."""
    if not t.is_cuda or not t.is_contiguous():
        raise ValueError(f"l2_prefetch: needs a contiguous CUDA tensor, got device {t.device}, "
                         f"contiguous={t.is_contiguous()}")
    fn = compile_prefetch(chunk, threads)
    flat = t.reshape(-1).view(torch.uint8)
    for off in range(0, flat.numel(), MAX_BYTES):
        part = flat[off:off + MAX_BYTES]
        if part.numel() >= 16:
            _call(fn, part)
