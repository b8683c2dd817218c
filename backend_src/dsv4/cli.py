"""`dsv4` command line.

One function per subcommand registers it on the argparse sub-parsers and sets `func`; `SUBCOMMANDS` lists them.
To add a subcommand, write `add_parser(sub)` (calling `p.set_defaults(func=run)` with `run(args) -> int`) in its
own module and add it to `SUBCOMMANDS`, e.g. `"generate": _from_module("dsv4.generate_cmd")`; modules are imported
only when the parser is built.

    dsv4 make-checkpoint --preset tiny --out /models/dsv4-tiny [--format nvfp4|fp8-mxfp4|bf16] [--layers N] [--seed S]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Callable, Sequence

from dsv4.errors import DSV4Error

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# ----------------------------------------------------------------------------------------------------------------
# make-checkpoint
# ----------------------------------------------------------------------------------------------------------------
def add_make_checkpoint(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from dsv4.checkpoint.presets import PRESETS
    from dsv4.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, FORMATS

    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint with the real DeepSeek-V4 layout",
                       description="Write a checkpoint of random weights (deterministic in --seed) with the exact "
                                   "file layout, tensor names, dtypes and quantisation of DeepSeek-V4 releases.")
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="model shape")
    p.add_argument("--out", required=True, help="output directory (created; old shards in it are removed)")
    p.add_argument("--format", default="nvfp4", choices=list(FORMATS), dest="fmt",
                   help="nvfp4: NVIDIA's NVFP4 experts (default); fp8-mxfp4: DeepSeek's release; bf16: unquantised")
    p.add_argument("--layers", type=int, default=None, help="number of main layers (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2 ** 20,
                   help=f"shard size limit in MiB of tensor data (default {DEFAULT_MAX_SHARD_BYTES // 2 ** 20})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_make_checkpoint)


def run_make_checkpoint(args: argparse.Namespace) -> int:
    from dsv4.checkpoint.presets import preset
    from dsv4.checkpoint.writer import checkpoint_bytes, make_checkpoint

    cfg = preset(args.preset, args.layers)
    t0 = time.perf_counter()
    out = make_checkpoint(cfg, args.out, fmt=args.fmt, seed=args.seed,
                          max_shard_bytes=max(1, int(args.max_shard_mb * 2 ** 20)), progress=not args.quiet)
    size = checkpoint_bytes(out)
    print(f"wrote {args.preset} ({cfg.n_layers} layers + {cfg.n_mtp_layers} MTP, {args.fmt}, seed {args.seed}) "
          f"to {out}: {size / 2 ** 20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------
def _from_module(module: str) -> Register:
    """A subcommand defined by `add_parser(sub)` in another module (imported when the parser is built)."""
    def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
        importlib.import_module(module).add_parser(sub)
    return register


def add_bench(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("bench", help="GPU benchmarks: gemm, moe, attention kernels; the decode step (tables + JSON)")
    group = p.add_subparsers(dest="bench_what", required=True, metavar="KERNEL")
    importlib.import_module("dsv4.bench_cmd").add_parser(group)
    importlib.import_module("dsv4.bench_attention_cmd").add_parser(group)
    importlib.import_module("dsv4.bench_decode_cmd").add_parser(group)


SUBCOMMANDS: dict[str, Register] = {
    "make-checkpoint": add_make_checkpoint,
    "generate": _from_module("dsv4.generate_cmd"),
    "bench": add_bench,
}



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 serving tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS.values():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DSV4Error as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
