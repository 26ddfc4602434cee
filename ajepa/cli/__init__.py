"""The `ajepa` command line. Each module registers its commands on one parser:

    cli/train.py   train, synth, stats
    cli/eval.py    embed, probe, finetune, export, masks, plot
    cli/bench.py   bench (runs bench/step.py from the source tree)
    cli/common.py  the flags they share, and the one-line error format
"""

from __future__ import annotations

import argparse
import sys

from ajepa.cli import bench, eval, train
from ajepa.cli.common import one_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ajepa", description="A-JEPA audio pretraining with Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, eval, bench):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # ConfigError, AudioError, missing files, unwritable folders, full disks
        print(f"ajepa {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2

