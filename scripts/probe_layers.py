"""Per-layer linear probes of encoders on a labelled probe set (docs/learning.md, third pass).

    python scripts/probe_layers.py --probe speech/probe RUN_DIR[:context] [...] [--random 0 1 2] [--set KEY=VALUE]

For each encoder, the probe accuracy (the mean over split seeds 0-2 of `ajepa probe`'s linear probe) of
the padding-aware mean of: the patch embedding plus positions (L0), each block's output (L1..Ld), the final
LayerNorm's output (the features `ajepa probe` uses), and, last, mean + std pooling of the final tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from ajepa.config import DataConfig, apply_overrides, get_preset
from ajepa.data import build_dataset
from ajepa.eval.embed import audio_token_mask, load_encoder, random_encoder
from ajepa.eval.probe import linear_probe, stratified_split
from ajepa.stats import resolve_auto_norm


def acc3(x: torch.Tensor, y: np.ndarray) -> float:
    accs = []
    for s in (0, 1, 2):
        tr, te = stratified_split(y, 0.3, s)
        accs.append(linear_probe(x[tr], y[tr], x[te], y[te], seed=s).metrics["accuracy"])
    return round(float(np.mean(accs)), 3)


def layer_outputs(vit, spec: torch.Tensor) -> list[torch.Tensor]:
    x = vit.patch_embed(spec) + vit.pos_embed
    outs = [x]
    for blk in vit.blocks:
        x = blk(x)
        outs.append(x)
    outs.append(vit.norm(x))
    return outs


def score(enc, specs: torch.Tensor, y: np.ndarray, name: str) -> dict:
    keep = audio_token_mask(specs, enc.cfg).float()[..., None]
    with torch.no_grad():
        per = [layer_outputs(enc.vit, specs[i:i + 100]) for i in range(0, len(specs), 100)]
    row = {"name": name}
    n = len(per[0])
    for k in range(n):
        t = torch.cat([p[k] for p in per])
        mean = (t * keep).sum(1) / keep.sum(1)
        label = "final_norm" if k == n - 1 else f"L{k}"
        row[label] = acc3(mean, y)
        if k == n - 1:
            std = (((t - mean[:, None]) ** 2 * keep).sum(1) / keep.sum(1)).sqrt()
            row["final_mean_std"] = acc3(torch.cat([mean, std], 1), y)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run folders, each optionally :context for the context encoder")
    p.add_argument("--probe", required=True)
    p.add_argument("--random", type=int, nargs="*", default=[])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    try:
        cfg = apply_overrides(get_preset("tiny"), args.overrides)
        # audio.auto_norm: random encoders normalize by the probe set's own statistics (as `ajepa probe --random-init`)
        cfg, _ = resolve_auto_norm(cfg, DataConfig(path=args.probe, random_crop=False))
    except ValueError as e:  # ConfigError or unreadable data: one line, no traceback
        p.error(str(e))

    def specs_for(c):
        ds = build_dataset(DataConfig(path=args.probe, random_crop=False), c.audio)
        return torch.stack([ds.spectrogram(i) for i in range(len(ds))]), np.asarray(ds.labels)

    for seed in args.random:
        specs, y = specs_for(cfg)
        print(json.dumps(score(random_encoder(cfg, seed), specs, y, f"random init seed {seed}")), flush=True)
    for run in args.runs:
        folder, which = (run.split(":") + ["target"])[:2]
        try:
            enc = load_encoder(f"{folder}/checkpoint.pt", which)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        specs, y = specs_for(enc.cfg)
        print(json.dumps(score(enc, specs, y, f"{folder} ({which})")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
