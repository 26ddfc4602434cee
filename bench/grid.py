"""How much of each attention launch's grid is dead programs: the case for (or against) an exact work list.

    PYTHONPATH=. python -m bench.grid                       # base preset, batch 128, both mask kinds
    PYTHONPATH=. python -m bench.grid --preset tiny --batch 16 --no-json

Every varlen-attention kernel launches (cdiv(max_seqlen, BLOCK), H, S) programs; those whose block lies past
their sequence's end return after reading two offsets. For the masks the sampler draws (multiblock targets
at step 0, time-frequency targets at the end of the curriculum), this counts, per kernel and its tile from
the built-in table (bf16, the preset's head dim), the live programs (the sum over sequences of
cdiv(length, BLOCK)) against the grid. No GPU: it measures the grid, not time.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from ajepa.config import ConfigError, get_preset
from ajepa.masks import MaskSampler
from bench import common
from kernels.attention import fused, tiles

# the tile dimension that splits each kernel's grid: query blocks (fwd, dq) or key blocks (dk/dv)
_GRID_BLOCK = {"fwd": "BLOCK_M", "dq": "BLOCK_M", "dkdv": "BLOCK_N"}


def grid_use(lengths: list[int], max_seqlen: int, block: int) -> tuple[int, int]:
    """(live programs, grid programs) per head of one launch over sequences of these lengths."""
    live = sum(math.ceil(n / block) for n in lengths)
    return live, len(lengths) * math.ceil(max_seqlen / block)


def measure(preset: str, batch: int) -> list[dict]:
    cfg = get_preset(preset)
    block_d = fused._block_d(cfg.model.embed_dim // cfg.model.num_heads)
    pred_block_d = fused._block_d(cfg.model.pred_dim // cfg.model.pred_heads)
    total = cfg.train.steps
    rows = []
    for masks, step in (("multiblock", 0), ("tf", total)):
        m = MaskSampler(cfg.masks, cfg.grid, total)(step, batch)
        seqs = (("context encoder", m.cu_ctx, m.max_ctx, block_d), ("predictor", m.cu_pred, m.max_pred, pred_block_d))
        for where, cu, max_len, bd in seqs:
            lengths = cu.diff().tolist()
            for kind, field in _GRID_BLOCK.items():
                block = getattr(tiles.tile(kind, bd, torch.bfloat16), field)
                live, grid = grid_use(lengths, max_len, block)
                rows.append(dict(masks=masks, sequences=where, kernel=kind, block=block, n_seq=len(lengths),
                                 max_seqlen=max_len, live=live, grid=grid, dead_share=1.0 - live / grid))
    return rows


def table(rows: list[dict]) -> str:
    out = ["| masks | sequences | kernel | block | S | max len | live / grid programs | dead |", "|" + "---|" * 8]
    for r in rows:
        out.append(f"| {r['masks']} | {r['sequences']} | {r['kernel']} | {r['block']} | {r['n_seq']} | "
                   f"{r['max_seqlen']} | {r['live']} / {r['grid']} | {r['dead_share']:.1%} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base", help="config preset whose masks and head dims are counted")
    p.add_argument("--batch", type=int, default=128, help="clips per batch (default 128)")
    p.add_argument("--no-json", action="store_true", help="print the table, write no JSON file")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch={args.batch} must be >= 1")
    try:
        rows = measure(args.preset, args.batch)
    except ConfigError as exc:
        p.error(str(exc))
    print(table(rows))
    if not args.no_json:
        cpu = common.device_info(torch.device("cpu"))
        payload = {"kind": "grid", "preset": args.preset, "batch": args.batch, "git": common.git_info(), "rows": rows}
        print("wrote", common.write_json(payload, common.result_path("grid", cpu["name"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
