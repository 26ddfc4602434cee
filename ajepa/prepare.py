"""`ajepa prepare`: decode a corpus once into webdataset tar shards of 16-bit PCM, plus an index.

    prepare("audio/", "shards/", cfg.audio, shard_size=1000, workers=4)   # or: ajepa prepare --data ...
    ajepa train --data shards/ ...                                         # trains from the shards

Every file is decoded once, mixed to mono, resampled to audio.sample_rate and stored as int16 PCM with
its label and original path. Shard k holds the files k*shard_size .. (k+1)*shard_size - 1 in the
corpus' sorted order; it is written under a temporary name and renamed into place, then its sidecar
(`shard-K.tar.json`: its clips, labels, seconds and bad files) is written the same way. A shard is done
when its sidecar exists, so a rerun skips finished shards and a killed run loses at most the shards
in flight. `index.json` (a `wids` dataset descriptor with per-shard counts, plus classes, labels,
original paths, total hours and the bad files with their reasons) is written last.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ajepa.audio import AudioError, load_audio, resample
from ajepa.checkpoint import atomic_write
from ajepa.config import AudioConfig
from ajepa.data import AUDIO_EXTENSIONS, SHARD_FORMAT, SHARD_INDEX, SHARD_VERSION, printable, read_manifest, scan_folder


@dataclass
class ShardInfo:
    url: str  # file name, relative to the index
    nsamples: int
    labels: list[str | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def list_corpus(data: str | Path) -> tuple[list[Path], list[str | None]]:
    """The files (sorted) and labels of an audio folder or a .csv/.jsonl manifest."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    if data.is_dir():
        paths, labels = scan_folder(data)
        if not paths:
            raise ValueError(f"--data {data}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found under it")
        return paths, labels
    if data.is_file() and data.suffix.lower() in (".csv", ".jsonl"):
        return read_manifest(data)
    raise FileNotFoundError(f"--data {data}: expected an audio folder or a .csv/.jsonl manifest")


def write_shard(out: Path, k: int, paths: list[Path], labels: list[str | None], cfg: AudioConfig) -> ShardInfo:
    """Decode `paths` into shard k (atomic), then its sidecar; returns what it holds."""
    import webdataset as wds

    name = f"shard-{k:06d}.tar"
    info = ShardInfo(url=name, nsamples=0)

    def write(fh) -> None:
        writer = wds.TarWriter(fh)
        for path, label in zip(paths, labels):
            try:
                wave, sr = load_audio(path)
                if wave.numel() == 0:
                    raise AudioError("empty waveform (0 samples)")
                if not bool(wave.isfinite().all()):
                    raise AudioError("waveform holds NaN or Inf samples")
                wave = resample(wave, sr, cfg.sample_rate)
            except (AudioError, RuntimeError, ValueError, OSError) as exc:
                info.bad.append((printable(path), printable(str(exc).removeprefix(f"{path}: "))))
                continue
            pcm = (wave.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).numpy()
            writer.write({"__key__": f"{info.nsamples:08d}", "pcm": pcm.tobytes(),
                          "json": {"label": label, "path": str(path), "sample_rate": cfg.sample_rate}})
            info.nsamples += 1
            info.labels.append(label)
            info.paths.append(str(path))
            info.seconds += pcm.size / cfg.sample_rate
        writer.close()

    atomic_write(out / name, write)
    atomic_write(out / f"{name}.json", lambda fh: fh.write(json.dumps(asdict(info)).encode()))
    return info


def _done(out: Path, k: int) -> ShardInfo | None:
    sidecar = out / f"shard-{k:06d}.tar.json"
    if not (sidecar.is_file() and (out / f"shard-{k:06d}.tar").is_file()):
        return None
    try:
        data = json.loads(sidecar.read_text())
        return ShardInfo(**{**data, "bad": [tuple(b) for b in data.get("bad", [])]})
    except (ValueError, TypeError):
        return None  # a damaged sidecar: the shard is written again


def prepare(data: str | Path, out: str | Path, cfg: AudioConfig, shard_size: int = 1000, workers: int = 1,
            progress: bool = True) -> dict:
    """Write the shards and the index (see the module docstring); returns the index."""
    from tqdm import tqdm

    if shard_size < 1 or workers < 1:
        raise ValueError(f"--shard-size ({shard_size}) and --workers ({workers}) must be >= 1")
    paths, labels = list_corpus(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chunks = [(k, paths[i : i + shard_size], labels[i : i + shard_size])
              for k, i in enumerate(range(0, len(paths), shard_size))]
    infos: dict[int, ShardInfo] = {k: info for k, _, _ in chunks if (info := _done(out, k)) is not None}
    todo = [c for c in chunks if c[0] not in infos]
    bar = tqdm(total=len(paths), initial=len(paths) - sum(len(c[1]) for c in todo), desc="prepare",
               unit="file", disable=not progress)
    with bar:
        if workers == 1:
            for k, p, lab in todo:
                infos[k] = write_shard(out, k, p, lab, cfg)
                bar.update(len(p))
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(write_shard, out, k, p, lab, cfg): (k, len(p)) for k, p, lab in todo}
                for future, (k, n) in futures.items():
                    infos[k] = future.result()
                    bar.update(n)
    shards = [infos[k] for k in sorted(infos)]
    all_labels = [lab for s in shards for lab in s.labels]
    index = {
        "format": SHARD_FORMAT, "version": SHARD_VERSION, "name": out.name, "sample_rate": cfg.sample_rate,
        "shardlist": [{"url": s.url, "nsamples": s.nsamples} for s in shards],
        "total_clips": sum(s.nsamples for s in shards),
        "total_hours": sum(s.seconds for s in shards) / 3600.0,
        "classes": sorted({lab for lab in all_labels if lab is not None}),
        "labels": all_labels,
        "paths": [p for s in shards for p in s.paths],
        "bad_files": [list(b) for s in shards for b in s.bad],
    }
    if index["total_clips"] == 0:
        raise ValueError(f"--data {data}: no readable audio file ({len(index['bad_files'])} bad)")
    atomic_write(out / SHARD_INDEX, lambda fh: fh.write(json.dumps(index).encode()))
    return index
