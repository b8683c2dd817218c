#!/usr/bin/env python3
"""The ceiling peer of decode attention's row gathers: how fast this GPU reads N rows of 1 KiB picked at random from
a large pool (and, for reference, N consecutive rows), with a read-only kernel (`dsv4_kernels.gather_read`) that
keeps many rows in flight on every SM. Same timing as `dsv4 bench attention` (L2 flushed before each repeat, the
host's launch cost hidden), and the same HBM copy bandwidth as the yardstick.

    python3 scripts/gather_peer.py [--rows 40960 81920 163840] [--row-bytes 1024] [--rows-per-cta 16 32 64]
        [--json OUT.json]

Batch 64 of CSA or HCA decode at 8k-64k context reads 64 x 640 rows of 1 KiB (40 960).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "backend_src"), str(REPO / "kernels")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[40960, 81920, 163840])
    ap.add_argument("--row-bytes", type=int, default=1024)
    ap.add_argument("--rows-per-cta", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--pool-gib", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from dsv4.bench_attention_cmd import _flush_buffer, _time, hbm_bandwidth
    from dsv4_kernels.gather_read import gather_read, gather_read_reference

    flush = _flush_buffer()
    bw = hbm_bandwidth(flush)
    words = args.row_bytes // 4
    pool_rows = int(args.pool_gib * (1 << 30)) // args.row_bytes
    pool = torch.randint(-2 ** 31, 2 ** 31 - 1, (pool_rows, words), dtype=torch.int32, device="cuda")
    print(json.dumps({"device": torch.cuda.get_device_name(), "hbm_copy_gbps": round(bw / 1e9, 1),
                      "pool_gib": args.pool_gib}), flush=True)
    results = []
    for n in args.rows:
        for pattern in ("random", "consecutive"):
            if pattern == "random":
                idx = torch.randint(0, pool_rows, (n,), dtype=torch.int32, device="cuda")
            else:
                start = int(torch.randint(0, pool_rows - n, (1,)))
                idx = torch.arange(start, start + n, dtype=torch.int32, device="cuda")
            for rpc in args.rows_per_cta:
                out = gather_read(pool, idx, rpc)
                ok = bool(torch.equal(out, gather_read_reference(pool, idx, rpc)))
                us = _time(lambda: gather_read(pool, idx, rpc, out), args.reps, flush)
                nbytes = n * args.row_bytes + n * 4
                r = {"rows": n, "pattern": pattern, "rows_per_cta": rpc, "us": round(us, 2),
                     "gbps": round(nbytes / (us * 1e-6) / 1e9, 1), "pct_hbm": round(100 * nbytes / (us * 1e-6) / bw, 1),
                     "checked": ok}
                results.append(r)
                print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["checked"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
