"""End-to-end training throughput from disk, beside the synthetic-input step and the loader alone.

    ajepa bench --data SHARDS/ --preset base                   # or: PYTHONPATH=. python -m bench.e2e ...
    ajepa bench --data /audio --preset tiny --device cpu --steps 20

Three measurements, one JSON in bench/results/ (or $OUT, or --out):

1. end to end: `ajepa.trainer.train` itself on --data (its loader workers, the device fbank where
   audio.frontend resolves to gpu, the step, the log syncs with their health statistics) for
   --warmup + --steps steps. samples/s, the data-wait share and the loader's clips/s come from the
   run's own metrics.jsonl, over the log windows after the warm-up (time-weighted). The log sync runs
   once per --steps steps, so its health statistics cost what they cost a run logging that rarely.
2. synthetic input: bench.step's timing of the same `TrainStep` (preset, batch, kernel path, --set)
   on spectrograms already on the device: what the step alone consumes.
3. loader only, clips/s of one core over the first --loader-clips clips of --data
   (bench.loader.measure_paths): files + CPU fbank (when --data holds audio files; shards for the
   other paths are then written from those clips), shards + CPU fbank, shards read + crop only (the
   loader's whole job when the fbank runs on the device), and the batched fbank on the device.

end-to-end / synthetic is the share of the step's speed the input pipeline lets through. Issue #15's
GPU targets: at least 0.95 with the default worker count, and a data wait under 5%.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from ajepa.cli.common import add_progress_flag, add_set_option
from ajepa.config import apply_overrides, get_preset
from ajepa.data import AudioFileDataset, ShardDataset, build_dataset
from ajepa.device import resolve_device
from ajepa.prepare import prepare
from ajepa.trainer import train
from bench import common
from bench.loader import measure_paths
from bench.step import CPU_BATCH, GPU_BATCH, run_with_oom_retry

E2E_TARGET, WAIT_TARGET = 0.95, 0.05  # issue #15, on a GPU


def _windows(rows: list[dict], warmup: int, log_every: int, batch: int) -> dict:
    """Time-weighted means over the log windows after the warm-up."""
    timed = [r for r in rows if r["step"] > warmup and r.get("samples_per_s")]
    if not timed:
        raise ValueError("no log window after the warm-up: raise --steps")
    seconds = [log_every * batch / r["samples_per_s"] for r in timed]
    total = sum(seconds)

    def weighted(key):
        vals = [(r[key], s) for r, s in zip(timed, seconds) if isinstance(r.get(key), (int, float))]
        return sum(v * s for v, s in vals) / sum(s for _, s in vals) if vals else None
    return {"samples_per_s": len(timed) * log_every * batch / total, "data_wait": weighted("data_wait"),
            "loader_clips_per_s": weighted("loader_clips_per_s"),
            "loader_clips_per_s_worker": weighted("loader_clips_per_s_worker"), "windows": len(timed),
            "seconds": total}


def end_to_end(cfg, warmup: int, progress: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(cfg, run, progress=progress)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return _windows(rows, warmup, cfg.train.log_every, cfg.train.batch_size)


def loader_paths(cfg, clips: int, device: torch.device) -> dict:
    """bench.loader's per-core paths on the first `clips` clips of cfg.data.path."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as one loader worker has
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = build_dataset(cfg.data, cfg.audio)
            files = None
            if isinstance(data, ShardDataset):
                shards = data
            else:
                files = AudioFileDataset(data.paths[:clips], [None] * min(clips, len(data.paths)), cfg.audio,
                                         cfg.data.random_crop)
                manifest = Path(tmp) / "clips.csv"
                with manifest.open("w", newline="") as fh:
                    writer = csv.writer(fh)
                    writer.writerow(["path"])
                    writer.writerows([[str(p.resolve())] for p in files.paths])
                prepare(manifest, Path(tmp) / "shards", cfg.audio, shard_size=max(1, clips // 4), progress=False)
                shards = ShardDataset(Path(tmp) / "shards", cfg.audio, cfg.data.random_crop)
            return measure_paths(files, shards, cfg.audio, min(32, cfg.train.batch_size), clips, device)
    finally:
        torch.set_num_threads(torch_threads)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (GPU_BATCH.get(args.preset, 64) if cuda else CPU_BATCH)
    impl = args.impl or ("triton" if cuda else "reference")
    # One log window per --steps: the log sync (health statistics, metrics) runs once per window, as
    # rarely as a long run's log_every makes it; the warm-up is whole windows.
    log_every = args.steps
    warmup = -(-args.warmup // log_every) * log_every
    cfg = apply_overrides(get_preset(args.preset), [
        f"data.path={args.data}", f"train.steps={warmup + args.steps}", f"train.batch_size={batch}",
        f"train.impl={impl}", f"train.device={args.device}", f"train.num_workers={args.workers}",
        f"train.log_every={log_every}", f"train.ckpt_every={warmup + args.steps}", "train.keep_last=1",
        *args.overrides])
    print(f"[e2e] {args.preset} B={batch} {impl} on {device}; {warmup} warm-up + {args.steps} timed steps from "
          f"{args.data}", flush=True)
    e2e = end_to_end(cfg, warmup, not args.no_progress)
    print(f"[e2e] end to end: {e2e['samples_per_s']:.1f} samples/s, data wait {e2e['data_wait']:.1%}", flush=True)
    syn = run_with_oom_retry(cfg, args.preset, impl, batch, device, steps=max(3, args.steps // 2),
                             distinct=4 if cuda else 2, warmup=None, seed=cfg.train.seed,
                             progress=not args.no_progress)
    synthetic = syn.batch_size / (statistics.median(syn.step_ms) * 1e-3)
    print(f"[e2e] synthetic input: {synthetic:.1f} samples/s (B={syn.batch_size})", flush=True)
    paths = loader_paths(cfg, args.loader_clips, device) if args.loader_clips > 0 else {}
    ratio = e2e["samples_per_s"] / synthetic if syn.batch_size == batch else None
    return {
        "end_to_end": e2e,
        "synthetic": {"samples_per_s": synthetic, "batch_size": syn.batch_size, "step_ms": syn.step_ms},
        "e2e_over_synthetic": ratio,
        "loader_clips_per_s_per_core": paths,
        "frontend": cfg.audio.frontend if cfg.audio.frontend != "auto" else ("gpu" if cuda else "cpu"),
        "workers": args.workers,
        "targets": {
            "e2e_over_synthetic >= 0.95": None if ratio is None else ratio >= E2E_TARGET,
            "data_wait < 0.05": e2e["data_wait"] is not None and e2e["data_wait"] < WAIT_TARGET,
            "measured_on_gpu": cuda,
        },
    }


def report(res: dict) -> str:
    e2e, ratio = res["end_to_end"], res["e2e_over_synthetic"]
    lines = ["| measure | value |", "|---|---:|",
             f"| end to end, samples/s | {e2e['samples_per_s']:.1f} |",
             f"| synthetic-input step, samples/s | {res['synthetic']['samples_per_s']:.1f} |",
             f"| end to end / synthetic | {'-' if ratio is None else f'{ratio:.2f}'} |",
             f"| data wait (share of step time) | {e2e['data_wait']:.1%} |",
             f"| loader clips/s (all workers, from the run) | {e2e['loader_clips_per_s'] or float('nan'):.1f} |"]
    lines += [f"| loader path: {name}, clips/s per core | {v:.1f} |"
              for name, v in res["loader_clips_per_s_per_core"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ajepa bench --data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="audio folder, manifest or `ajepa prepare` shards")
    p.add_argument("--preset", default="base", help="config preset (default base)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch (default: {GPU_BATCH} on a GPU, {CPU_BATCH} on the CPU)")
    p.add_argument("--impl", choices=("reference", "triton"), default=None,
                   help="kernel path (default: triton on a GPU, reference on the CPU)")
    p.add_argument("--workers", type=int, default=-1, help="loader workers (default -1: the trainer's default)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps (default 30)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed first steps (default 10; rounded up to a multiple of --steps)")
    p.add_argument("--loader-clips", type=int, default=64,
                   help="clips for the per-core loader paths (default 64; 0 skips them)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_set_option(p, "config override for the run (repeatable), e.g. --set audio.frontend=cpu")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON (default: $OUT, else bench/results/)")
    p.add_argument("--no-json", action="store_true", help="print the table, write no JSON file")
    add_progress_flag(p)
    args = p.parse_args(argv)
    if args.steps < 3 or args.warmup < 0 or args.loader_clips < 0 or (args.batch_size or 1) < 1:
        p.error("--steps must be >= 3, --warmup and --loader-clips >= 0, --batch-size >= 1")
    if not Path(args.data).exists():
        p.error(f"--data {args.data}: no such file or folder")
    created = datetime.now(timezone.utc)
    try:
        res = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ajepa bench --data: error: {exc}", file=sys.stderr)
        return 2
    print(report(res))
    if not args.no_json:
        info = common.device_info(resolve_device(args.device))
        payload = {"kind": "e2e", "created": created.isoformat(), "device": info, "versions": common.versions(),
                   "git": common.git_info(), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in vars(args).items()}, **res}
        path = common.result_path("e2e", info["name"], created, args.out or common.out_dir())
        common.write_json(payload, path)
        print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
