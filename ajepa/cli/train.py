"""`ajepa train | synth | speech | prepare | stats`: pretraining and its data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ajepa.cli.common import (
    add_data_flag,
    add_device_flag,
    add_preset_flag,
    add_progress_flag,
    add_set_option,
)
from ajepa.config import (
    IMPLS,
    Config,
    ConfigError,
    apply_overrides,
    get_preset,
    load_config,
    set_fields,
    to_dict,
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    add_preset_flag(p, None, "named config preset to start from (default: tiny, CPU-friendly)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config file applied on top of the preset (same layout as a run's config.yaml)")
    add_data_flag(p)
    add_set_option(p, "override one config field, e.g. --set train.steps=100 --set masks.mode=tf (repeatable)")


# Flags that set one config field each: (attribute, field). The value keeps its argparse type;
# --data stays the exact string typed (a path is never parsed).
FIELD_FLAGS = (("data", "data.path"), ("steps", "train.steps"), ("batch_size", "train.batch_size"),
               ("impl", "train.impl"), ("device", "train.device"), ("seed", "train.seed"),
               ("workers", "train.num_workers"), ("parallel", "train.parallel"), ("keep_last", "train.keep_last"))
# On --resume these would make the run a different one (data order, masks): they must match.
RESUME_FIXED = ("train.seed", "train.batch_size")


def _flag_values(args) -> dict[str, object]:
    values = {key: getattr(args, flag) for flag, key in FIELD_FLAGS if getattr(args, flag, None) is not None}
    if getattr(args, "compile", False):
        values["train.compile"] = True
    if getattr(args, "strict", False):
        values["data.strict"] = True
    return values


def _resolve_config(args, saved: Config | None = None) -> Config:
    """preset -> --config -> --set -> flags; or, with `saved` (a run's config.yaml on --resume),
    saved -> --set -> flags, refusing the flags that would change what the run is."""
    flags = _flag_values(args)
    if saved is None:
        cfg = get_preset(args.preset or "tiny")
        if args.config is not None:
            cfg = load_config(args.config, base=cfg)
    else:
        for name in ("preset", "config"):
            if getattr(args, name, None) is not None:
                raise ConfigError(f"--{name} cannot be combined with --resume: the run continues with its own "
                                  "config.yaml (change single fields with --set)")
        cfg = saved
        current = to_dict(saved)
        for key in RESUME_FIXED:
            section, field = key.split(".")
            if key in flags and flags[key] != current[section][field]:
                raise ConfigError(f"--resume: {key}={flags[key]} differs from the run's "
                                  f"{key}={current[section][field]}; a resumed run keeps it (data order and masks "
                                  "depend on it)")
    cfg = apply_overrides(cfg, args.overrides)
    return set_fields(cfg, flags)


def cmd_train(args) -> int:
    from ajepa.trainer import NonFiniteLossError, train

    if args.resume:  # continue with the run's own saved config, plus the flags that may change
        saved = args.out / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} not found; nothing to resume in {args.out}")
        cfg = _resolve_config(args, load_config(saved))
    else:
        cfg = _resolve_config(args)
    try:
        result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except NonFiniteLossError as exc:  # raised on every rank alike; one message is enough
        if _is_main_rank():
            print(f"ajepa train: stopped: {exc}", file=sys.stderr)
        return 3
    if not _is_main_rank():
        return 0
    c = result.counters
    notes = "".join(f", {c[k]} {k.replace('_', ' ')}" for k in ("skipped_steps", "bad_samples", "bad_files")
                    if c.get(k))
    if result.stopped_by:
        print(f"{result.stopped_by}: stopped at step {result.steps} with a checkpoint in {args.out}{notes}; "
              f"continue with --resume", file=sys.stderr)
        return 128 + (15 if result.stopped_by == "SIGTERM" else 2)
    if result.losses:
        first, last = result.losses[0][1], result.losses[-1][1]
        print(f"trained {result.steps} steps in {result.seconds:.0f}s: loss {first:.4f} -> {last:.4f}; "
              f"checkpoint {args.out / 'checkpoint.pt'}, metrics {args.out / 'metrics.jsonl'}{notes}")
    else:
        print(f"nothing to do: {args.out} already finished {result.steps} steps")
    return 0


def _is_main_rank() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def cmd_synth(args) -> int:
    from ajepa.data import write_synth_corpus

    cfg = get_preset(args.preset)
    paths = write_synth_corpus(args.out, args.clips, cfg.audio, seed=args.seed, progress=not args.no_progress)
    print(f"wrote {len(paths)} labelled WAV files under {args.out}")
    return 0


def cmd_speech(args) -> int:
    from ajepa.speech import build

    clips = build(args.out, args.seed, args.pretrain_clips, args.per_word, args.jobs, not args.no_progress)
    n_probe = sum(c.label is not None for c in clips)
    print(f"wrote {len(clips) - n_probe} pretraining clips to {args.out / 'pretrain'} and {n_probe} probe clips "
          f"to {args.out / 'probe'} (and as {args.out / 'probe.csv'}, with each clip's speaker)")
    return 0


def cmd_prepare(args) -> int:
    from ajepa.prepare import prepare

    if args.data is None:
        raise ValueError("--data is required: the audio folder or manifest to decode into shards")
    cfg = _resolve_config(args)
    index = prepare(args.data, args.out, cfg.audio, args.shard_size, args.workers, not args.no_progress)
    for name, reason in index["bad_files"]:
        print(f"ajepa prepare: skipped bad audio {name}: {reason}", file=sys.stderr)
    print(f"wrote {index['total_clips']} clips ({index['total_hours']:.2f} h) in {len(index['shardlist'])} shards "
          f"to {args.out}; {len(index['bad_files'])} bad files skipped; train with --data {args.out}")
    return 0


def cmd_stats(args) -> int:
    from ajepa.stats import dataset_stats

    cfg = _resolve_config(args)
    stats = dataset_stats(cfg, limit=args.limit, progress=not args.no_progress)
    for name, reason in stats.bad:
        print(f"ajepa stats: skipped bad audio {name}: {reason}", file=sys.stderr)
    print(json.dumps({"norm_mean": stats.mean, "norm_std": stats.std, "frames": stats.frames,
                      "bad_files": len(stats.bad)}))
    print(f"use with: --set audio.norm_mean={stats.mean:.7g} --set audio.norm_std={stats.std:.7g}", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    """Register train, synth, speech, prepare and stats."""

    p = sub.add_parser("train", help="pretrain an A-JEPA encoder",
                       description="Pretrain an A-JEPA encoder. Writes config.yaml, metrics.jsonl and checkpoints to "
                                   "--out. Under torchrun, run `torchrun --nproc_per_node=N -m ajepa.train` with "
                                   "these same options. SIGTERM/SIGINT save a checkpoint and exit (143/130); "
                                   "K consecutive non-finite steps stop the run (exit 3).")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="run folder for config, metrics and checkpoints")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (train.batch_size)")
    p.add_argument("--impl", choices=IMPLS, default=None,
                   help="kernel path: auto (Triton on CUDA, reference on CPU), triton, or reference (train.impl)")
    add_device_flag(p, None, "train.device")
    p.add_argument("--seed", type=int, default=None, help="seed for init, data order and masks (train.seed)")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader worker processes; -1: derived from the cores (train.num_workers)")
    p.add_argument("--compile", action="store_true", help="run the model under torch.compile (train.compile)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest complete checkpoint, with its saved config.yaml; "
                        "--steps, --data, --device, --workers, --impl, --strict, --keep-last, --parallel and --set "
                        "apply, --seed and --batch-size must match the run's")
    p.add_argument("--strict", action="store_true",
                   help="a bad audio file (corrupt, empty, NaN, unsupported) is fatal; by default it is skipped, "
                        "logged once and counted (data.strict)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default=None,
                   help="under torchrun: ddp (replicate the model) or fsdp (FSDP2 fully_shard) (train.parallel)")
    p.add_argument("--keep-last", type=int, default=None,
                   help="keep this many numbered checkpoints, 0 keeps all (train.keep_last, default 3)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("synth", help="write the built-in synthetic corpus as labelled WAV files")
    p.add_argument("--out", type=Path, required=True, help="folder to write <class>/<index>.wav into")
    p.add_argument("--clips", type=int, default=256, help="number of clips (default 256)")
    add_preset_flag(p, "tiny", "preset whose clip length to use")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("speech", help="synthesize a spoken-word benchmark with espeak-ng + sox",
                       description="Write OUT/pretrain/*.wav (unlabelled phrases) and OUT/probe/<word>/*.wav "
                                   "(labelled words; other words and other voices than pretraining).")
    p.add_argument("--out", type=Path, required=True, help="benchmark folder")
    p.add_argument("--seed", type=int, default=0, help="seed of texts, voices, speeds and pitches (default 0)")
    p.add_argument("--pretrain-clips", type=int, default=1200,
                   help="unlabelled phrases (default 1200); the probe clips are drawn after them from the same "
                        "seeded stream, so another count gives another probe set")
    p.add_argument("--per-word", type=int, default=42, help="probe clips per word, 10 words (default 42)")
    p.add_argument("--jobs", type=int, default=2, help="parallel synthesis processes (default 2)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_speech)

    p = sub.add_parser("prepare", help="decode a corpus once into webdataset shards of 16-bit PCM (+ index.json)",
                       description="Decode every file once (mono, resampled to audio.sample_rate, int16) into tar "
                                   "shards that `ajepa train --data SHARDS/` reads. Resumable: finished shards are "
                                   "skipped; each shard is written under a temporary name, then renamed.")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder for shard-*.tar and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="clips per shard (default 1000)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="parallel decoding processes (default: every core)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("stats", help="compute a dataset's fbank mean and std for audio.norm_mean/norm_std")
    _add_config_args(p)
    p.add_argument("--strict", action="store_true", help="a bad audio file is fatal (default: skipped and listed)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many clips")
    add_progress_flag(p)
    p.set_defaults(func=cmd_stats)
