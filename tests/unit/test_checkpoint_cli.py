"""Specification of `dsv4 make-checkpoint` (dsv4.cli)."""

from __future__ import annotations

import json

import pytest

from dsv4.checkpoint.loader import load_checkpoint
from dsv4.cli import SUBCOMMANDS, build_parser, main


def test_make_checkpoint_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    rc = main(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--format", "fp8-mxfp4", "--layers", "2",
               "--seed", "4", "--quiet"])
    assert rc == 0 and "wrote tiny (2 layers + 1 MTP, fp8-mxfp4, seed 4)" in capsys.readouterr().out
    ck = load_checkpoint(out, progress=False)
    assert ck.config.n_layers == 2 and ck.config.compress_ratios == (0, 4, 4)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


def test_defaults_are_nvfp4_and_seed_0():
    args = build_parser().parse_args(["make-checkpoint", "--preset", "small", "--out", "x"])
    assert (args.fmt, args.seed, args.layers) == ("nvfp4", 0, None)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["make-checkpoint", "--preset", "huge", "--out", str(tmp_path)])
    assert main(["make-checkpoint", "--preset", "flash-layers", "--layers", "99", "--out", str(tmp_path)]) == 1
    assert "at most 43" in capsys.readouterr().err


def test_subcommands_are_registered_in_one_table():
    assert "make-checkpoint" in SUBCOMMANDS
