"""`ajepa train | synth | stats`: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ajepa.config import IMPLS, PRESETS, ConfigError, apply_overrides, get_preset, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="named config preset to start from (default: tiny, CPU-friendly)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config file applied on top of the preset (same layout as a run's config.yaml)")
    p.add_argument("--data", default=None,
                   help="audio folder (searched recursively; subfolders are labels) or a .csv/.jsonl manifest "
                        "with a 'path' column and an optional 'label'; default: the built-in synthetic corpus")
    add_set_option(p, "override one config field, e.g. --set train.steps=100 --set masks.mode=tf (repeatable)")


def add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--set SECTION.KEY=VALUE` override flag, collected into args.overrides."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def _resolve_config(args):
    cfg = get_preset(args.preset)
    if args.config is not None:
        cfg = load_config(args.config, base=cfg)
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    for flag, key in (("steps", "train.steps"), ("batch_size", "train.batch_size"), ("impl", "train.impl"),
                      ("device", "train.device"), ("seed", "train.seed"), ("workers", "train.num_workers")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "compile", False):
        overrides.append("train.compile=true")
    return apply_overrides(cfg, overrides + _run_overrides(args))


def _run_overrides(args) -> list[str]:
    """Options that may change on --resume: --strict, --parallel, --keep-last."""
    overrides = ["data.strict=true"] if getattr(args, "strict", False) else []
    for flag, key in (("parallel", "train.parallel"), ("keep_last", "train.keep_last")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def cmd_train(args) -> int:
    from ajepa.train import NonFiniteLossError, train

    cfg = _resolve_config(args)
    if args.resume:  # continue with the run's own saved config, plus any explicit overrides
        saved = args.out / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} not found; nothing to resume in {args.out}")
        cfg = load_config(saved)
        cfg = apply_overrides(cfg, args.overrides + _run_overrides(args))
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


def cmd_stats(args) -> int:
    from ajepa.stats import dataset_stats

    cfg = _resolve_config(args)
    mean, std, frames = dataset_stats(cfg, limit=args.limit, progress=not args.no_progress)
    print(json.dumps({"norm_mean": mean, "norm_std": std, "frames": frames}))
    print(f"use with: --set audio.norm_mean={mean:.7g} --set audio.norm_std={std:.7g}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ajepa", description="A-JEPA audio pretraining with Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (train.device)")
    p.add_argument("--seed", type=int, default=None, help="seed for init, data order and masks (train.seed)")
    p.add_argument("--workers", type=int, default=None, help="data loader worker processes (train.num_workers)")
    p.add_argument("--compile", action="store_true", help="run the model under torch.compile (train.compile)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest complete checkpoint, with its saved config.yaml")
    p.add_argument("--strict", action="store_true",
                   help="a bad audio file (corrupt, empty, NaN, unsupported) is fatal; by default it is skipped, "
                        "logged once and counted (data.strict)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default=None,
                   help="under torchrun: ddp (replicate the model) or fsdp (FSDP2 fully_shard) (train.parallel)")
    p.add_argument("--keep-last", type=int, default=None,
                   help="keep this many numbered checkpoints, 0 keeps all (train.keep_last, default 3)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("synth", help="write the built-in synthetic corpus as labelled WAV files")
    p.add_argument("--out", type=Path, required=True, help="folder to write <class>/<index>.wav into")
    p.add_argument("--clips", type=int, default=256, help="number of clips (default 256)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="preset whose clip length to use")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("stats", help="compute a dataset's fbank mean and std for audio.norm_mean/norm_std")
    _add_config_args(p)
    p.add_argument("--limit", type=int, default=None, help="use at most this many clips")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_stats)

    from ajepa.cli_eval import add_commands as add_eval_commands  # embed, probe, finetune, export, masks, plot

    add_eval_commands(sub)

    from ajepa.speech import add_command as add_speech_command  # speech

    add_speech_command(sub)

    from ajepa.bench_cli import add_commands as add_bench_commands  # bench

    add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"ajepa {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
