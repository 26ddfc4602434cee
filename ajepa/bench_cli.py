"""`ajepa bench`: the end-to-end training-step benchmark (bench/step.py) on the command line.

Argument definitions live here (no torch import, so `ajepa --help` stays fast); the work is done
by bench/step.py, which ships with the source tree (a checkout installed with `pip install -e .`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ajepa.cli import add_set_option


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        nargs="+",
        default=None,
        metavar="NAME",
        help="presets to run (default: tiny base on a GPU, tiny on the CPU)",
    )
    p.add_argument(
        "--impl",
        nargs="+",
        default=None,
        choices=("reference", "triton"),
        help="kernel paths to run (default: reference triton on a GPU; reference on the CPU, where triton is skipped)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per step for every preset (default on a GPU: tiny 1024, base 128; CPU: 8); "
        "halved automatically on out-of-memory",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 10 on a GPU, 3 on the CPU)")
    p.add_argument(
        "--distinct",
        type=int,
        default=None,
        help="distinct mask batches, drawn by the real sampler at steps spread over the run "
        "(default: 4 on a GPU, 2 on the CPU)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default: one per distinct batch, so every shape is compiled)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after timing, profile this many more steps with torch.profiler (GPU only) and record each "
        "kind of kernel's share of the device time and the top kernels (default: 0, no profile)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed for the model, the masks and the random inputs")
    add_set_option(p, "config override applied to every preset, e.g. --set model.depth=2 (repeatable)")
    p.add_argument(
        "--out", type=Path, default=None, help="folder for the JSON result (default: $OUT if set, else bench/results/)"
    )
    p.add_argument("--no-json", action="store_true", help="print the table, write no JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _step_module():
    """Import bench.step from the source tree this ajepa package lives in."""
    try:
        return importlib.import_module("bench.step")
    except ImportError:
        pass
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "step.py").is_file():
        raise FileNotFoundError(
            "ajepa bench: the benchmark suite (bench/) is part of the source tree, not of the installed package; "
            "run it from a git checkout installed with `pip install -e .`, or `PYTHONPATH=. python -m bench.step`"
        )
    sys.path.insert(0, str(root))
    return importlib.import_module("bench.step")


def cmd_bench(args) -> int:
    return _step_module().run_from_args(args)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the training step: samples/s, tokens/s, peak memory, MFU",
        description="Time whole A-JEPA training steps (forward, backward, AdamW, EMA) for the reference and the "
        "fused (Triton) paths, on masks from the real sampler and random spectrograms. Writes one JSON "
        "file and prints a Markdown table last. Kernel benchmarks: `pytest bench/`.",
    )
    add_step_arguments(p)
    p.set_defaults(func=cmd_bench)
