"""Does the predictor use the context? (docs/learning.md, third pass)

    python scripts/predictor_context.py --data speech/pretrain RUN_DIR [...]

For a checkpoint and 64 clips of its pretraining data, the mean squared error of the predictions to the
(layer-normed) targets at two mask draws: with each clip's own context, with the next clip's context at the
same positions, and of the best position-only guess (each position's mean target over the 64 clips).
A predictor that ignores the context scores the same in the first two; collapsed targets make the third ~0.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ajepa.config import DataConfig
from ajepa.data import build_dataset
from ajepa.eval.embed import config_from_checkpoint, read_checkpoint
from ajepa.masks import MaskSampler
from ajepa.model.ajepa import AJEPA


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--data", required=True, help="the unlabelled pretraining folder")
    p.add_argument("--clips", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    for run in args.runs:
        path = f"{run}/checkpoint.pt"
        try:
            state = read_checkpoint(path)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        cfg = config_from_checkpoint(state, path)
        model = AJEPA(cfg, impl="reference")
        model.load_state_dict(state["model"], strict=False)
        model.eval()
        ds = build_dataset(DataConfig(path=args.data, random_crop=False), cfg.audio)
        n = min(args.clips, len(ds))
        spec = torch.stack([ds.spectrogram(i) for i in range(n)])
        out = {"run": run}
        for step in (100, cfg.train.steps - 50):
            masks = MaskSampler(cfg.masks, cfg.grid, cfg.train.steps, seed=0)(step, n)
            with torch.no_grad():
                tgt = model.targets(spec, masks).float()
                own = model.predict(spec, masks).float()
                other = torch.roll(torch.arange(n), 1)
                ctx = model.encoder.forward_packed(spec[other], masks.ctx_index, masks.cu_ctx, masks.max_ctx,
                                                   "reference")
                shuffled = model.predictor(ctx, masks, "reference").float()
                dense = model.target_encoder.forward_dense(spec, "reference").float()
                dense = torch.nn.functional.layer_norm(dense, dense.shape[-1:], eps=1e-6)
                by_position = dense.mean(0)[masks.tgt_index % masks.num_patches]
            guesses = (("own context", own), ("another clip's context", shuffled), ("position-only guess", by_position))
            errors = {name: round(float(((x - tgt) ** 2).mean()), 4) for name, x in guesses}
            out[f"step {step} ({'tf' if masks.use_tf else 'multiblock'} masks)"] = errors
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
