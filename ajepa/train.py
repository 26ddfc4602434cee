"""`python -m ajepa.train` (also under torchrun): the options of `ajepa train`.

    torchrun --nproc_per_node=8 -m ajepa.train --preset base --data /audio --out runs/b

The training code lives in ajepa/trainer.py (the run) and ajepa/step.py (one step); this module
re-exports its public names for `from ajepa.train import train`.
"""

from __future__ import annotations

import sys

from ajepa.step import TrainStep, lr_at, momentum_at, param_groups, wd_at
from ajepa.trainer import NonFiniteLossError, Trainer, TrainResult, train

__all__ = ["NonFiniteLossError", "TrainResult", "TrainStep", "Trainer", "lr_at", "main", "momentum_at",
           "param_groups", "train", "wd_at"]


def main(argv: list[str] | None = None) -> int:
    from ajepa.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
