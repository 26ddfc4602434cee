"""Score pretraining runs on a labelled probe set, for the ablation in docs/learning.md.

    python scripts/learn_eval.py --probe /work/data/speech/probe RUN_DIR [RUN_DIR ...] [--random 0 1 2] [--mel]
                                [--set KEY=VALUE]

For each encoder: linear-probe accuracy of mean-pooled target-encoder features (the probe of
`ajepa probe`: padding-aware mean, stratified 70/30 split, split seed 0; also the mean over split
seeds 0-2, and acc_mean_all: the mean over every token, the old pooling), and the
health statistics of its token features over the probe clips (RankMe, mean per-dimension std,
pos_share), rankme_audio: RankMe over the tokens that hold audio only, and rankme_clip: RankMe of the pooled
clip embeddings the probe sees (one row per clip, as Garrido et al. compute it on pooled representations).
With --group-by COLUMN --group-manifest MANIFEST (e.g. speaker, the probe.csv `ajepa speech` writes): also
acc_group, the mean accuracy over group split seeds 0-4, each holding out whole groups (unseen speakers).
One JSON line per encoder goes to stdout and to --log.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ajepa.config import DataConfig, apply_overrides, get_preset
from ajepa.data import build_dataset
from ajepa.eval.embed import audio_token_mask, load_encoder, random_encoder
from ajepa.eval.probe import group_split, linear_probe, manifest_column, stratified_split
from ajepa.model.health import health_stats, rankme
from ajepa.stats import resolve_auto_norm

SPLIT_SEEDS = (0, 1, 2)
GROUP_SEEDS = (0, 1, 2, 3, 4)  # held-out speakers vary more from split to split than clips do


def probe_acc(x: torch.Tensor, y: np.ndarray, folds: int = 1) -> tuple[float, float]:
    accs = []
    for s in SPLIT_SEEDS:
        tr, te = stratified_split(y, 0.3, s)
        accs.append(linear_probe(x[tr], y[tr], x[te], y[te], seed=s, val_folds=folds).metrics["accuracy"])
    return accs[0], float(np.mean(accs))


def val_seed_accs(x: torch.Tensor, y: np.ndarray, n: int, folds: int = 1) -> list[float]:
    """Split 0's accuracy with the probe's validation draw (the quarter, or the folds, that pick the L2) made with
    seeds 0..n-1: how much of one encoder's figure is the probe's own choice."""
    tr, te = stratified_split(y, 0.3, 0)
    return [linear_probe(x[tr], y[tr], x[te], y[te], seed=v, val_folds=folds).metrics["accuracy"] for v in range(n)]


def group_acc(x: torch.Tensor, y: np.ndarray, groups: np.ndarray, folds: int = 1) -> float:
    accs = []
    for s in GROUP_SEEDS:
        tr, te = group_split(groups, 0.3, s)
        accs.append(linear_probe(x[tr], y[tr], x[te], y[te], seed=s, val_folds=folds).metrics["accuracy"])
    return float(np.mean(accs))


def score_encoder(enc, specs: torch.Tensor, y: np.ndarray, name: str, groups: np.ndarray | None = None,
                  val_seeds: int = 0, folds: int = 1) -> dict:
    with torch.no_grad():
        tokens = torch.cat([enc(specs[i:i + 64]) for i in range(0, len(specs), 64)])
    keep = audio_token_mask(specs, enc.cfg).float()
    pooled = (tokens * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    acc0, acc = probe_acc(pooled, y, folds)
    acc_all = probe_acc(tokens.mean(1), y, folds)[0]
    audio = tokens[keep.bool()]  # [n_audio_tokens, D]: padding tokens left out
    extra = {} if groups is None else {"acc_group": round(group_acc(pooled, y, groups, folds), 4)}
    if val_seeds:
        extra["acc_val_seeds"] = [round(a, 4) for a in val_seed_accs(pooled, y, val_seeds, folds)]
    if folds > 1:
        extra["val_folds"] = folds
    return {"name": name, "acc": round(acc0, 4), "acc_mean3": round(acc, 4), "acc_mean_all": round(acc_all, 4),
            **extra,
            "rankme_audio": round(rankme(audio), 4), "rankme_clip": round(rankme(pooled), 4),
            **{k: round(v, 4) for k, v in health_stats(tokens, max_rows=1 << 30).items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--probe", required=True)
    p.add_argument("--random", type=int, nargs="*", default=[])
    p.add_argument("--mel", action="store_true")
    p.add_argument("--which", default="target")
    p.add_argument("--log", type=Path, default=Path("/work/runs/results.jsonl"))
    p.add_argument("--group-by", default=None, metavar="COLUMN",
                   help="also score on held-out groups named by this column of --group-manifest (e.g. speaker)")
    p.add_argument("--group-manifest", type=Path, default=None,
                   help="a manifest listing --probe's clips (path relative to its folder) with the --group-by column")
    p.add_argument("--val-seeds", type=int, default=0, metavar="N",
                   help="also report split 0's accuracy with the probe's validation draw made with seeds 0..N-1")
    p.add_argument("--val-folds", type=int, default=1, metavar="K",
                   help="choose every probe's L2 by K-fold cross-validation (default 1: one held-out quarter)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the --random encoders and the probe's spectrograms (repeatable)")
    args = p.parse_args(argv)
    if args.val_folds < 1:
        p.error(f"--val-folds must be at least 1, got {args.val_folds}")
    torch.set_num_threads(2)
    try:
        cfg = apply_overrides(get_preset("tiny"), args.overrides)
        # audio.auto_norm (the tiny default): the random encoders normalize by the probe set's own statistics, as
        # `ajepa probe --random-init` does; pin the pretraining set's with --set audio.auto_norm=false
        # --set audio.norm_mean=M --set audio.norm_std=S (what `ajepa stats --data PRETRAIN` prints)
        cfg, _ = resolve_auto_norm(cfg, DataConfig(path=args.probe, random_crop=False))
    except ValueError as e:  # ConfigError or unreadable data: one line, no traceback
        p.error(str(e))
    ds = build_dataset(DataConfig(path=args.probe, random_crop=False), cfg.audio)
    y = np.asarray(ds.labels)
    groups = None
    if (args.group_by is None) != (args.group_manifest is None):
        p.error("--group-by and --group-manifest go together")
    if args.group_by is not None:
        try:
            from ajepa.data import read_manifest

            listed = {q.resolve(): g for q, g in zip(read_manifest(args.group_manifest)[0],
                                                      manifest_column(args.group_manifest, args.group_by))}
        except (OSError, ValueError) as e:
            p.error(str(e))
        missing = [q for q in ds.paths if Path(q).resolve() not in listed]
        if missing:
            p.error(f"--group-manifest {args.group_manifest} misses {len(missing)} of --probe's clips, "
                    f"e.g. {missing[0]}")
        groups = np.asarray([listed[Path(q).resolve()] for q in ds.paths])
    specs = torch.stack([ds.spectrogram(i) for i in range(len(ds))])
    rows = []
    if args.mel:
        feats = []
        for i in range(len(ds)):
            fb = ds.raw_fbank(i)
            feats.append(torch.cat([fb.mean(0), fb.std(0)]))
        x = torch.stack(feats)
        acc0, acc = probe_acc(x, y, args.val_folds)
        rows.append({"name": "log-mel mean+std", "acc": round(acc0, 4), "acc_mean3": round(acc, 4),
                     **({} if groups is None else {"acc_group": round(group_acc(x, y, groups, args.val_folds), 4)}),
                     **({"acc_val_seeds": [round(a, 4) for a in val_seed_accs(x, y, args.val_seeds, args.val_folds)]}
                        if args.val_seeds else {}),
                     **({"val_folds": args.val_folds} if args.val_folds > 1 else {})})
    for seed in args.random:
        name = (f"random init seed {seed}" + "".join(f" {o}" for o in args.overrides)
                + f" (norm {cfg.audio.norm_mean:.3f}/{cfg.audio.norm_std:.3f})")
        rows.append(score_encoder(random_encoder(cfg, seed), specs, y, name, groups, args.val_seeds, args.val_folds))
    for run in args.runs:
        try:
            enc = load_encoder(run / "checkpoint.pt", args.which)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        if enc.cfg.audio != cfg.audio:
            specs_r = torch.stack([build_dataset(DataConfig(path=args.probe, random_crop=False), enc.cfg.audio)
                                   .spectrogram(i) for i in range(len(ds))])
        else:
            specs_r = specs
        rows.append(score_encoder(enc, specs_r, y, f"{run.name} ({args.which})", groups, args.val_seeds,
                                 args.val_folds))
    with args.log.open("a") as fh:
        for r in rows:
            line = json.dumps(r)
            print(line)
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
