"""`ajepa bench`: the training-step benchmark (bench/step.py), or with `--data PATH` the end-to-end one
from disk (bench/e2e.py: the whole training loop beside the synthetic-input step), run from the source tree.

bench/ is the layer above ajepa/ (it imports ajepa; ajepa never imports it) and ships with the
source tree, not the installed package, so this command runs `python -m bench.step` in a child
process with the tree on its path and passes every option through (`ajepa bench --help` lists them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cmd_bench(args) -> int:
    if not (ROOT / "bench" / "step.py").is_file():
        raise FileNotFoundError(
            "the benchmark suite (bench/) is part of the source tree, not of the installed package; run it from "
            "a git checkout installed with `pip install -e .`, or `PYTHONPATH=. python -m bench.step`")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    module = "bench.e2e" if any(o == "--data" or o.startswith("--data=") for o in args.options) else "bench.step"
    return subprocess.run([sys.executable, "-m", module, *args.options], env=env).returncode


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", add_help=False, prefix_chars="\0",
        help="benchmark the training step: samples/s, tokens/s, peak memory, MFU (options: ajepa bench --help); "
        "with --data PATH, the whole loop from disk beside it (options: ajepa bench --data PATH --help)",
        description="Time whole A-JEPA training steps (the step `ajepa train` runs) for the reference and the fused "
        "(Triton) paths; with --data, the end-to-end loop from disk. Kernel benchmarks: `pytest bench/`.",
    )
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of python -m bench.step")
    p.set_defaults(func=cmd_bench)
