"""Input-pipeline benchmark: clips/s of one loader process (one core) on three paths, side by side.

    PYTHONPATH=. python -m bench.loader                     # 64 clips of 10.24 s, base preset
    PYTHONPATH=. python -m bench.loader --clips 32 --seconds 30

1. files + CPU fbank: decode each file (soundfile), resample, kaldi fbank per clip, crop (today's
   `--data DIR` path with audio.frontend=cpu);
2. shards + CPU fbank: the same per-clip fbank on int16 PCM read from `ajepa prepare`'s shards;
3. shards, loader only: what the loader does when the fbank runs on the training device
   (audio.frontend=gpu): read and crop PCM, pad the batch;
4. shards + batched fbank on this CPU: path 3 plus `batch_fbank` here, one thread (on a GPU it runs on
   the device instead; on a CPU core it is slower than kaldi's per-clip fbank, whose frames stay in cache).

Each path runs in this one process with one intra-op thread, so the figure is clips/s per core. The
corpus (half of it 16 kHz WAV, half 44.1 kHz FLAC, as the issue's measurement) is written first with
`ajepa`'s own synthesizer; `ajepa prepare` then shards it. One JSON goes to bench/results/ (or $OUT).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import soundfile as sf
import torch

from ajepa.audio import batch_fbank
from ajepa.config import apply_overrides, get_preset
from ajepa.data import ShardDataset, build_dataset, synth_clip
from ajepa.prepare import prepare
from bench import common


def write_corpus(root: Path, clips: int, seconds: float) -> None:
    for i in range(clips):
        sr, ext = (16000, "wav") if i % 2 == 0 else (44100, "flac")
        (root / "x").mkdir(parents=True, exist_ok=True)
        sf.write(str(root / "x" / f"{i:05d}.{ext}"), synth_clip(i, seconds, sr)[0], sr)


def clips_per_s(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def measure_paths(files, shards, audio, batch: int, n: int, device: torch.device | None = None) -> dict:
    """clips/s of one core on each input path over the first `n` clips: `files` (an AudioFileDataset, or
    None to skip that path) and `shards` (a ShardDataset). With a CUDA `device`, also the batched fbank's
    own rate on that device (the loader hands it waveforms; it is not a loader cost)."""
    gen = torch.Generator().manual_seed(0)

    def per_clip(ds):
        for i in range(min(n, len(ds))):
            ds.spectrogram(i, gen)

    def padded_batches():
        for first in range(0, min(n, len(shards)), batch):
            waves = [shards.crop(i, gen) for i in range(first, min(first + batch, n, len(shards)))]
            lengths = torch.tensor([w.numel() for w in waves])
            yield torch.stack([torch.nn.functional.pad(w, (0, int(lengths.max()) - w.numel())) for w in waves]), lengths

    def batched(fbank_here: bool):
        for padded, lengths in padded_batches():
            if fbank_here:
                batch_fbank(padded, lengths, audio)

    count = min(n, len(shards))
    shards.spectrogram(0, gen)  # warm-up: imports, mel bank, page cache
    results = {}
    if files is not None:
        files.spectrogram(0, gen)
        results["files + CPU fbank"] = clips_per_s(lambda: per_clip(files), min(n, len(files)))
    results["shards + CPU fbank"] = clips_per_s(lambda: per_clip(shards), count)
    results["shards, loader only (fbank on the device)"] = clips_per_s(lambda: batched(False), count)
    results["shards + batched fbank on this CPU"] = clips_per_s(lambda: batched(True), count)
    if device is not None and device.type == "cuda":
        on_device = [(w.to(device), lengths.to(device)) for w, lengths in padded_batches()]
        batch_fbank(*on_device[0], audio)  # warm-up: cuFFT plans, mel bank on the device

        def device_fbank():
            for w, lengths in on_device:
                batch_fbank(w, lengths, audio, validate=False)
            common.synchronize(device)
        results["batched fbank alone on the GPU (not a loader cost)"] = clips_per_s(device_fbank, count)
    return results


def run(clips: int, seconds: float, batch: int, preset: str) -> dict:
    torch.set_num_threads(1)
    cfg = get_preset(preset)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_corpus(root / "audio", clips, seconds)
        prepare(root / "audio", root / "shards", cfg.audio, shard_size=max(1, clips // 4), progress=False)
        files = build_dataset(apply_overrides(cfg, [f"data.path={root / 'audio'}"]).data, cfg.audio)
        shards = ShardDataset(root / "shards", cfg.audio)
        results = measure_paths(files, shards, cfg.audio, batch, clips)
    base = results["files + CPU fbank"]
    return {"clips_per_s_per_core": results, "speedup_vs_files": {k: v / base for k, v in results.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=64, help="clips in the corpus (default 64)")
    p.add_argument("--seconds", type=float, default=10.24, help="clip length in seconds (default 10.24)")
    p.add_argument("--batch", type=int, default=32, help="clips per batched fbank call (default 32)")
    p.add_argument("--preset", default="base", help="config preset (default base: 1024 frames)")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON (default: $OUT, else bench/results/)")
    args = p.parse_args(argv)
    if args.clips < 1 or args.seconds <= 0 or args.batch < 1:
        print("bench.loader: error: --clips, --seconds and --batch must be positive", file=sys.stderr)
        return 2
    created = datetime.now(timezone.utc)
    res = run(args.clips, args.seconds, args.batch, args.preset)
    info = common.device_info(torch.device("cpu"))
    payload = {"kind": "loader", "created": created.isoformat(), "device": info, "versions": common.versions(),
               "git": common.git_info(), "config": vars(args) | {"out": None, "threads": 1}, **res}
    path = common.result_path("loader", info["name"], created, args.out or common.out_dir())
    common.write_json(payload, path)
    print("| path | clips/s per core | vs files + CPU fbank |\n|---|---:|---:|")
    for name, value in res["clips_per_s_per_core"].items():
        print(f"| {name} | {value:.1f} | {res['speedup_vs_files'][name]:.2f}x |")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
