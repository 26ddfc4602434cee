"""`ajepa embed | probe | finetune | export | masks | plot`: using and looking at what was learned."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ajepa.cli.common import (
    add_data_flag,
    add_dataclass_options,
    add_device_flag,
    add_preset_flag,
    add_progress_flag,
    add_set_option,
    dataclass_from_args,
)
from ajepa.config import DataConfig, apply_overrides, get_preset

WHICH_HELP = "which encoder of a training checkpoint: target (the EMA encoder, default, as I-JEPA evaluates) or context"


def _add_encoder_args(p: argparse.ArgumentParser, data_required: bool = False) -> None:
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a training checkpoint (run/checkpoint.pt) or an exported encoder (.safetensors)",
    )
    p.add_argument("--which", choices=("target", "context"), default="target", help=WHICH_HELP)
    p.add_argument(
        "--random-init",
        action="store_true",
        help="use an untrained encoder of the same shape (the baseline that shows what pretraining bought); "
        "the shape comes from --preset, else from --checkpoint's config",
    )
    add_preset_flag(p, None, "encoder shape for --random-init")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the --random-init weights (default 0)")
    add_data_flag(p, required=data_required)
    p.add_argument(
        "--clips", type=int, default=280, help="clips of the built-in corpus when --data is not given (default 280)"
    )
    p.add_argument(
        "--corpus-seed",
        type=int,
        default=1,
        help="seed of the built-in corpus when --data is not given (default 1: clips pretraining, "
        "which uses seed 0, never saw)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="clips per forward pass (default 32)")
    add_device_flag(p)
    add_progress_flag(p)


def _encoder(args):
    from ajepa.device import resolve_device
    from ajepa.eval.embed import encoder_for

    if not args.random_init and args.preset is not None:
        raise ValueError("--preset only sets the shape of a --random-init encoder; add --random-init or drop --preset")
    if args.checkpoint is None and not args.random_init:
        raise ValueError("no encoder: give --checkpoint C, or --random-init --preset P")
    return encoder_for(
        args.checkpoint, args.random_init, args.preset, args.which, args.init_seed, resolve_device(args.device)
    )


def _dataset(enc, data: str | None, clips: int, corpus_seed: int):
    from ajepa.data import build_dataset

    if clips < 1:
        raise ValueError(f"--clips must be >= 1, got {clips}")
    data_cfg = DataConfig(path=data, synth_clips=clips, random_crop=False)
    if enc.cfg.audio.auto_norm:  # a --random-init encoder from a preset: normalize by this data's own statistics,
        from ajepa.stats import resolve_auto_norm  # once (a later --test-data reuses them)

        resolved, _ = resolve_auto_norm(replace(enc.cfg, train=replace(enc.cfg.train, seed=corpus_seed)), data_cfg)
        enc.cfg = replace(enc.cfg, audio=resolved.audio)
    return build_dataset(data_cfg, enc.cfg.audio, seed=corpus_seed)


def _source(args) -> str:
    if args.random_init:
        return f"random-init ({args.preset or args.checkpoint}, seed {args.init_seed})"
    return f"{args.checkpoint} ({args.which} encoder)"


def cmd_embed(args) -> int:
    from ajepa.eval.embed import dataset_features, dataset_paths

    if args.out.suffix != ".npz":
        raise ValueError(f"--out {args.out}: embeddings are written as .npz; give a path ending in .npz")
    enc = _encoder(args)
    ds = _dataset(enc, args.data, args.clips, args.corpus_seed)
    if getattr(ds, "paths", None) is not None and args.pooling != "none":  # whole files, every window
        feats = enc.embed_files(ds.paths, args.batch_size, args.pooling, progress=not args.no_progress,
                                hop_frames=args.hop_frames)
    else:
        feats = dataset_features(enc, ds, args.batch_size, not args.no_progress, args.pooling)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        args.out,
        embeddings=feats.numpy().astype(np.float32),
        paths=np.array(dataset_paths(ds)),
        labels=np.asarray(ds.labels, dtype=np.int64),
        classes=np.array(list(ds.classes), dtype=str),
        source=np.array(_source(args)),
    )
    print(
        f"wrote {tuple(feats.shape)} embeddings of {len(ds)} clips to {args.out} "
        f"({'with' if any(lab >= 0 for lab in ds.labels) else 'without'} labels)"
    )
    return 0


def _probe_split(args, enc, featurize=None):
    """(x_train, y_train, x_test, y_test, targets) from --data (stratified split) or --data + --test-data.

    `featurize(dataset, desc)` gives the features (default: `enc`'s embeddings)."""
    from ajepa.eval.embed import dataset_features
    from ajepa.eval.probe import (
        Targets,
        group_split,
        manifest_column,
        random_split,
        require_two_classes,
        stratified_split,
        targets_for,
    )

    progress = not args.no_progress
    if featurize is None:
        def featurize(dataset, desc):
            return dataset_features(enc, dataset, args.batch_size, progress, args.pooling, desc=desc)
    ds = _dataset(enc, args.data, args.clips, args.corpus_seed)
    tg = targets_for(ds, args.data)
    require_two_classes(tg.y, tg.multilabel, tg.classes, f"--data {args.data or 'built-in corpus'}")
    x = featurize(ds, "embed train" if args.test_data else "embed")
    keep = np.flatnonzero(tg.labelled())
    if keep.size == 0:
        raise ValueError(f"--data {args.data}: no labels (use class subfolders or a 'label' column)")
    if args.test_data is None:
        y = tg.y[keep]
        if args.group_by is not None:
            split = group_split(manifest_column(args.data, args.group_by)[keep], args.test_fraction, args.seed)
        elif tg.multilabel:
            split = random_split(len(keep), args.test_fraction, args.seed)
        else:
            split = stratified_split(y, args.test_fraction, args.seed)
        tr, te = keep[split[0]], keep[split[1]]
        return x[tr], tg.y[tr], x[te], tg.y[te], tg
    test = _dataset(enc, args.test_data, args.clips, args.corpus_seed)
    tt = targets_for(test, args.test_data)
    if tt.classes != tg.classes or tt.multilabel != tg.multilabel:
        # Re-index the test labels by name onto the training classes.
        lookup = {c: i for i, c in enumerate(tg.classes)}
        unknown = sorted(set(tt.classes) - set(lookup))
        if unknown:
            raise ValueError(f"--test-data {args.test_data}: labels not in --data: {', '.join(unknown[:5])}")
        if tg.multilabel:
            y = np.zeros((len(tt.y), len(tg.classes)), dtype=np.float32)
            y[:, [lookup[c] for c in tt.classes]] = tt.y
        else:
            y = np.array([lookup[tt.classes[v]] if v >= 0 else -1 for v in tt.y])
        tt = Targets(y, tg.classes, tg.multilabel)
    xt = featurize(test, "embed test")
    kt = np.flatnonzero(tt.labelled())
    return x[keep], tg.y[keep], xt[kt], tt.y[kt], tg


def _check_group_by(args) -> None:
    """Refuse --group-by that cannot work before any clip is embedded."""
    from ajepa.eval.probe import manifest_column

    if args.group_by is None:
        return
    if args.test_data is not None:
        raise ValueError("--group-by splits --data itself; drop it or --test-data")
    if args.data is None:
        raise ValueError("--group-by needs --data: a .csv or .jsonl manifest with that column")
    groups = manifest_column(args.data, args.group_by)
    if len(set(groups)) < 2:
        raise ValueError(f"--group-by {args.group_by}: --data {args.data} names only one group")


def cmd_probe(args) -> int:
    from ajepa.eval.probe import linear_probe, logmel_features

    _check_group_by(args)
    if args.val_folds < 1:
        raise ValueError(f"--val-folds must be at least 1, got {args.val_folds}")
    enc = _encoder(args)
    x_tr, y_tr, x_te, y_te, tg = _probe_split(args, enc)
    if args.val_folds > len(x_tr):
        k = args.val_folds
        raise ValueError(f"--val-folds {k} needs at least {k} training clips, got {len(x_tr)}")
    res = linear_probe(x_tr, y_tr, x_te, y_te, tg.classes, tg.multilabel, seed=args.seed, val_folds=args.val_folds)
    report = {
        "source": _source(args),
        "data": args.data or f"built-in corpus ({args.clips} clips, seed {args.corpus_seed})",
        "test_data": args.test_data,
        "group_by": args.group_by,
        **res.to_dict(),
        "rankme": _clip_rankme(x_tr, x_te),
    }
    side = [("this encoder", res)]
    ranks = [("this encoder", report["rankme"])]
    if args.baseline == "mel":
        # Same splits, same probe: an untrained encoder of the same shape, and no network at all.
        baselines = {}
        if not args.random_init:
            from ajepa.eval.embed import random_encoder

            rnd = random_encoder(enc.cfg, args.init_seed, enc.device)
            rx_tr, ry_tr, rx_te, ry_te = _probe_split(args, rnd)[:4]
            r = linear_probe(rx_tr, ry_tr, rx_te, ry_te, tg.classes, tg.multilabel, seed=args.seed,
                             val_folds=args.val_folds)
            baselines["random_init"] = {"source": f"random-init (seed {args.init_seed})", **r.to_dict(),
                                        "rankme": _clip_rankme(rx_tr, rx_te)}
            side.append((f"random init (seed {args.init_seed})", r))
            ranks.append((f"random init (seed {args.init_seed})", baselines["random_init"]["rankme"]))
        m = linear_probe(*_probe_split(args, enc, lambda ds, desc: logmel_features(ds, enc.cfg.audio))[:4],
                         tg.classes, tg.multilabel, seed=args.seed, val_folds=args.val_folds)
        baselines["mel"] = {"source": "log-mel mean+std over time (no network)", **m.to_dict()}
        side.append(("log-mel mean+std", m))
        report["baselines"] = baselines
    out = args.report
    if out is None:
        name = "probe_random_init.json" if args.random_init else "probe.json"
        out = (args.checkpoint.parent if args.checkpoint is not None else Path(".")) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    metric = ", ".join(f"{k} {v:.3f}" for k, v in res.metrics.items())
    if len(side) > 1:
        key = next(iter(res.metrics))
        metric = f"{key} " + " | ".join(f"{name} {r.metrics[key]:.3f}" for name, r in side)
    rank_line = " | ".join(f"{name} {v:.1f}" for name, v in ranks)
    held_out = f" of '{args.group_by}' groups the probe never trained on" if args.group_by else ""
    print(
        f"linear probe of {_source(args)}: {metric} on {res.n_test} test clips{held_out} "
        f"({res.n_train} train, {len(tg.classes)} classes, L2 {res.l2:g}"
        f"{f' by {res.val_folds}-fold cross-validation' if res.val_folds > 1 else ''}); "
        f"RankMe of the clip embeddings: {rank_line}; report {out}"
    )
    return 0


def _clip_rankme(x_train, x_test) -> float:
    """RankMe (Garrido et al., 2023) of the probed clip embeddings, train and test clips together: the
    effective rank of the representation the probe sees (ajepa.model.health.rankme)."""
    import torch

    from ajepa.model.health import rankme

    return round(rankme(torch.cat([torch.as_tensor(x_train), torch.as_tensor(x_test)])), 4)


def cmd_finetune(args) -> int:
    from ajepa.eval.finetune import FinetuneOptions, finetune

    enc = _encoder(args)
    ds = _dataset(enc, args.data, args.clips, args.corpus_seed)
    opts = dataclass_from_args(FinetuneOptions, args)
    vit = enc.vit
    res = finetune(enc.cfg, vit, ds, args.out, opts, progress=not args.no_progress, source=_source(args))
    print(
        f"fine-tuned {_source(args)} for {args.epochs} epochs in {res.seconds:.0f}s: best validation accuracy "
        f"{res.best_accuracy:.3f} at epoch {res.best_epoch}; wrote {args.out / 'best.pt'}, "
        f"{args.out / 'best.safetensors'}, {args.out / 'finetune.json'}"
    )
    return 0


def cmd_export(args) -> int:
    from ajepa.eval.embed import load_encoder

    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: give a path ending in .safetensors")
    enc = load_encoder(args.checkpoint, args.which)
    enc.save_safetensors(args.out, {"source": f"{args.checkpoint} ({args.which} encoder)"})
    print(f"wrote the {args.which} encoder ({sum(p.numel() for p in enc.parameters()):,} parameters) to {args.out}")
    return 0


def cmd_masks(args) -> int:
    from ajepa.plots import plot_masks

    cfg = get_preset(args.preset)
    if args.overrides:
        cfg = apply_overrides(cfg, args.overrides)
    if args.steps is not None:
        cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
    out = plot_masks(cfg, args.out, seed=args.seed, examples=args.examples)
    print(f"wrote {out}")
    return 0


def cmd_plot(args) -> int:
    from ajepa.plots import plot_run

    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0


def add_commands(sub) -> None:
    """Register embed, probe, finetune, export, masks and plot."""
    from ajepa.eval.finetune import FinetuneOptions

    p = sub.add_parser(
        "embed",
        help="write frozen-encoder embeddings of a dataset to .npz",
        description="Embed every clip (mean over tokens, or the token map with --pooling none). "
        "The .npz holds embeddings, paths, labels (-1 if none) and classes.",
    )
    _add_encoder_args(p)
    p.add_argument("--out", type=Path, required=True, help="output .npz file")
    p.add_argument(
        "--pooling", choices=("mean", "mean_all", "none"), default="mean",
        help="mean (default): over the patches holding the clip's own audio, not its zero-padding; "
        "mean_all: over every patch (the old behaviour); none: [N, D] per clip"
    )
    p.add_argument("--hop-frames", type=int, default=None,
                   help="whole files are embedded in windows of audio.target_frames every this many frames "
                        "(a multiple of the patch size; default: back to back)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "probe",
        help="linear probe of a frozen encoder (accuracy, or mAP for multi-label)",
        description="Logistic regression on standardized frozen features, L2 tuned on a held-out part "
        "of the training split (or by --val-folds K cross-validation over it). Compare --checkpoint with "
        "--random-init to see what pretraining bought.",
    )
    _add_encoder_args(p)
    p.add_argument(
        "--test-data",
        default=None,
        help="a separate test set (folder or manifest); default: a stratified split of --data",
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.3, help="test share of --data without --test-data (default 0.3)"
    )
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument(
        "--val-folds", type=int, default=1, metavar="K",
        help="choose the probe's L2 by K-fold cross-validation over the training split (K times the fits, far "
        "steadier on small sets); default 1: on one held-out quarter of it, drawn with --seed",
    )
    p.add_argument(
        "--group-by", default=None, metavar="COLUMN",
        help="hold out whole groups named by this column of the --data manifest (a speaker, a session): the test "
        "clips come from groups the probe never trained on (`ajepa speech` writes probe.csv with 'speaker')",
    )
    p.add_argument(
        "--pooling", choices=("mean", "mean_all"), default="mean",
        help="mean (default): over the patches holding the clip's own audio; mean_all: over every patch (old)",
    )
    p.add_argument(
        "--baseline",
        choices=("none", "mel"),
        default="none",
        help="mel: also probe, on the same splits, an untrained encoder of the same shape (seed --init-seed) "
        "and the mean+std over time of the log-mel spectrogram (no network); all side by side in the report",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="JSON report path (default: probe.json / probe_random_init.json beside the checkpoint, or here)",
    )
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "finetune",
        help="fine-tune encoder + mean pooling + linear head on labelled data",
        description="End-to-end fine-tuning with layer-wise LR decay, SpecAugment, optional mixup and "
        "A-JEPA's regularized masking. Keeps the best validation epoch in --out.",
    )
    _add_encoder_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder for best.pt, best.safetensors and finetune.json")
    add_dataclass_options(p, FinetuneOptions, skip=("batch_size", "device"))
    p.set_defaults(batch_size=FinetuneOptions.batch_size)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="write a checkpoint's encoder as .safetensors (weights + config metadata)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (run/checkpoint.pt)")
    p.add_argument("--which", choices=("target", "context"), default="target", help=WHICH_HELP)
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file (load it with ajepa.load_encoder)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("masks", help="draw multiblock and time-frequency masks and the curriculum to a PNG")
    add_preset_flag(p, "tiny", "config whose grid and masks to draw")
    add_set_option(p, "override one config field, e.g. --set masks.tf_num_targets=2 (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="training length for the curriculum curve (train.steps)")
    p.add_argument("--examples", type=int, default=2, help="spectrograms to draw (default 2)")
    p.add_argument("--seed", type=int, default=0, help="mask seed (default 0)")
    p.add_argument("--out", type=Path, default=Path("masks.png"), help="output PNG (default masks.png)")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("plot", help="draw a run's loss, learning rate, momentum and samples/s to a PNG")
    p.add_argument("run_dir", type=Path, help="an `ajepa train --out` folder (reads metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="output PNG (default RUN_DIR/training.png)")
    p.set_defaults(func=cmd_plot)
