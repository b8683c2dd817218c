"""The read-only gather peer (dsv4_kernels.gather_read, the ceiling `dsv4 bench attention --gather-peer` compares
the attention kernel with) reads exactly the rows it is given: its XOR fold equals torch's over the same rows."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Hopper); CPU CI compiles the kernel (tests/unit/test_attention_kernels_compile.py)",
                allow_module_level=True)

from dsv4_kernels.gather_read import THREADS, gather_read, gather_read_reference  # noqa: E402


@pytest.mark.parametrize("row_words,rows_per_cta,n", [(256, 16, 4096), (256, 32, 40960), (256, 64, 640),
                                                      (128, 32, 3200), (64, 16, 1024)])
@pytest.mark.parametrize("pattern", ["random", "consecutive", "repeated"])
def test_gather_read_folds_exactly_the_rows_it_is_given(row_words, rows_per_cta, n, pattern):
    pool = torch.randint(-2 ** 31, 2 ** 31 - 1, (50_000, row_words), dtype=torch.int32, device="cuda")
    if pattern == "random":
        idx = torch.randint(0, pool.shape[0], (n,), dtype=torch.int32, device="cuda")
    elif pattern == "consecutive":
        idx = torch.arange(7, 7 + n, dtype=torch.int32, device="cuda")
    else:
        idx = torch.full((n,), 123, dtype=torch.int32, device="cuda")
    out = torch.full((n // rows_per_cta * THREADS,), 0x7F7F7F7F, dtype=torch.int32, device="cuda")   # poison
    gather_read(pool, idx, rows_per_cta, out)
    assert torch.equal(out, gather_read_reference(pool, idx, rows_per_cta))


def test_gather_read_refuses_a_row_count_it_cannot_split():
    pool = torch.zeros(64, 256, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="multiple of 32"):
        gather_read(pool, torch.zeros(40, dtype=torch.int32, device="cuda"), 32)
