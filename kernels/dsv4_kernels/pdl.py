"""Programmatic dependent launch (PDL) along decode's chain of kernels.

A batch-1 decode layer is ~40 dependent kernels, most of them 1-3 us, and each waits for its predecessor to finish
before the GPU even starts launching it (docs/PERF.md, session 21: ~60 us of a flash layer's ~170 are small
kernels in one dependent chain). With PDL a kernel is launched while its predecessor still runs, does what depends
on nothing (its prologue; a GEMV issues its first weight loads) and then blocks in `griddepcontrol.wait` until the
predecessor has completed and its writes are visible.

The protocol every kernel launched with `use_pdl=True` keeps (`chain_entry` for kernels that need nothing early):
- it calls `griddepcontrol.wait` before it reads anything an earlier kernel writes and before it writes anything
  (a later-launched kernel must not overwrite what a running one still reads), in every thread that reads or writes;
- only constant data (weights, scales) is read before the wait. "Constant" means no kernel of the step writes it:
  a kernel two launches back may still be running, since the predecessor let this one launch at its own start.
  That excludes the step's own inputs (positions, token ids) and a weight's copy made during the step (a dtype
  cast): with positions read before the wait, level-3 logits changed (session 31);
- `griddepcontrol.launch_dependents` says when the next kernel may be launched: at the start for small kernels
  (their dependents are resident and waiting by the time they finish), after the weight loads for GEMVs (at their
  start, back-to-back GEMVs would all prefetch at once: slower in session 16, and in session 26 it undid the
  chain's whole gain at batch 1).
Since a kernel completes only after its own wait returned, completion is transitive along the chain: a kernel's
wait also covers every earlier kernel in the stream. Kernels launched without PDL (torch's, cuBLAS) wait for full
completion as usual, and a PDL kernel after them starts when they end.

Where it pays (H100, flash-layers decode graphs, docs/PERF.md session 26): per layer 0.94x the time at batch 1,
0.97x at 4, 0.98x at 8, but 1.04x at 16 and 1.02x at 32, where the kernels are no longer latency-bound and the early
CTAs only hold SM slots. So a launch takes part in the chain only for steps of at most `MAX_TOKENS` tokens (env
DSV4_CHAIN_PDL_MAX_TOKENS, default 8).

`CHAIN` (env DSV4_CHAIN_PDL=0 turns it off) and `MAX_TOKENS` are read at every launch, so a benchmark can capture one
CUDA graph with and one without the chain in one process; the kernels compile once per setting.
"""

from __future__ import annotations

import os

import cutlass.cute as cute


def max_tokens_setting() -> int:
    """DSV4_CHAIN_PDL_MAX_TOKENS (default 8): the largest step, in tokens, whose chain kernels launch as PDL."""
    raw = os.environ.get("DSV4_CHAIN_PDL_MAX_TOKENS", "8")
    value = int(raw) if raw.strip().isdigit() else -1
    if value < 0:
        raise ValueError(f"DSV4_CHAIN_PDL_MAX_TOKENS must be a whole number of tokens >= 0 (0 keeps every step off the "
                         f"PDL chain), got {raw!r}")
    return value


CHAIN = os.environ.get("DSV4_CHAIN_PDL", "1") != "0"
# chain kernels load their weights before their wait, not after it where they cost an L2 round trip behind their own
# reductions (`hoist`); env DSV4_PDL_HOIST=0: after (an A/B option of scripts/decode_ab.py),
# DSV4_PDL_HOIST_MAX_TOKENS: the largest step that does (default 1).
HOIST = os.environ.get("DSV4_PDL_HOIST", "1") != "0"
HOIST_MAX_TOKENS = int(os.environ.get("DSV4_PDL_HOIST_MAX_TOKENS", "1"))
MAX_TOKENS = max_tokens_setting()


def chain(tokens: int) -> bool:
    """Whether a chain kernel of a step with `tokens` tokens launches as a programmatic dependent."""
    return CHAIN and tokens <= MAX_TOKENS


def hoist(tokens: int) -> bool:
    """Whether a chain kernel of a step with `tokens` tokens loads its weights before its wait: RmsNorm's and
    RopeTail's norm weights, HcCollapse's (which also loads its streams together with its partials, not after its
    barrier), MoeRoute's bias, the split combine's sinks. The callers pass only the model's own tensors (no copy
    made in the step) as hoisted. docs/PERF.md session 31 has the measurements."""
    return HOIST and tokens <= HOIST_MAX_TOKENS


def chain_entry(pdl: bool) -> None:
    """Kernel prologue for a chain kernel that needs nothing before its inputs: let the next kernel launch, then
    wait for the previous one. Emits nothing where `pdl` is False (the kernel's non-PDL variant is unchanged)."""
    if pdl:
        cute.arch.griddepcontrol_launch_dependents()
        cute.arch.griddepcontrol_wait()
