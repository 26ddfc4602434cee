"""Datasets (audio folder, CSV/JSONL manifest, built-in synthetic corpus), step-indexed batches, collate.

Batches are a pure function of (seed, step): `StepBatchSampler` yields, for each step, the sample
indices of that step, and the collator draws that step's masks. A resumed run sees the same data.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ajepa.audio import (
    AUDIO_EXTENSIONS,
    AudioError,
    audio_rows,
    crop_wave,
    fbank,
    file_to_crop,
    file_to_spec,
    kaldi_frames,
    load_audio,
    resample,
    waveform_to_spec,
    window_span,
)
from ajepa.config import AudioConfig, DataConfig
from ajepa.masks import MaskSampler, PackedMasks


def printable(name: str) -> str:
    """A file name safe for one log line: control characters (a newline in a name) are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(name))


# ---------------------------------------------------------------------------- built-in corpus

SYNTH_CLASSES = ("tone", "chirp", "harmonic", "am_noise", "fm_tone", "clicks", "noise_band")


def synth_clip(index: int, seconds: float, sr: int = 16000, seed: int = 0) -> tuple[np.ndarray, int]:
    """Clip `index` of the built-in corpus: float32 [S] in [-1, 1] and its class id.

    Procedural and deterministic (no download): tones, chirps, harmonic stacks of varied timbre,
    AM noise, FM tones, click trains and band-limited noise, with random pitch, envelope and level.
    """
    rng = np.random.default_rng([seed, index, 0x53594E54])
    label = index % len(SYNTH_CLASSES)
    kind = SYNTH_CLASSES[label]
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    f0 = rng.uniform(80.0, 2000.0)
    if kind == "tone":
        x = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
    elif kind == "chirp":
        f1 = rng.uniform(80.0, 6000.0)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-3)))
        x = np.sin(phase)
    elif kind == "harmonic":
        k = np.arange(1, int(rng.integers(3, 12)) + 1)
        k = k[k * f0 < sr / 2] if (k * f0 < sr / 2).any() else k[:1]
        amps = rng.uniform(0.2, 1.0, k.size) / k ** rng.uniform(0.5, 2.0)  # timbre: spectral tilt
        x = (amps[:, None] * np.sin(2 * np.pi * f0 * k[:, None] * t[None, :])).sum(0)
    elif kind == "am_noise":
        x = rng.standard_normal(n) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1.0, 16.0) * t))
    elif kind == "fm_tone":
        beta, fm = rng.uniform(1.0, 10.0), rng.uniform(2.0, 40.0)
        x = np.sin(2 * np.pi * f0 * t + beta * np.sin(2 * np.pi * fm * t))
    elif kind == "clicks":
        x = np.zeros(n)
        period = max(1, int(sr / rng.uniform(2.0, 40.0)))
        x[int(rng.integers(0, period)) :: period] = 1.0
        x = np.convolve(x, np.exp(-np.arange(64) / rng.uniform(2.0, 16.0)), mode="same")
    else:  # noise_band
        spec = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / sr)
        lo = rng.uniform(50.0, 4000.0)
        spec[(freqs < lo) | (freqs > lo * rng.uniform(1.2, 2.0))] = 0
        x = np.fft.irfft(spec, n)
    env = np.clip(np.minimum(t / rng.uniform(0.005, 0.3), 1.0), 0, 1) * np.exp(-t * rng.uniform(0.0, 2.0))
    x = x * env
    x = x / (np.abs(x).max() + 1e-8) * rng.uniform(0.1, 0.9)
    return x.astype(np.float32), label


def synth_seconds(cfg: AudioConfig) -> float:
    """Clip length that gives exactly cfg.target_frames fbank frames."""
    return ((cfg.target_frames - 1) * cfg.frame_shift_ms + cfg.frame_length_ms) / 1000.0


def write_synth_corpus(
    out: str | Path, num_clips: int, cfg: AudioConfig, seed: int = 0, progress: bool = True
) -> list[Path]:
    """Write the built-in corpus as labelled WAV files: out/<class>/<index>.wav."""
    import soundfile as sf
    from tqdm import tqdm

    out = Path(out)
    paths = []
    for i in tqdm(range(num_clips), desc="synth", disable=not progress):
        wave, label = synth_clip(i, synth_seconds(cfg), cfg.sample_rate, seed)
        path = out / SYNTH_CLASSES[label] / f"{i:06d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wave, cfg.sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- datasets


class SpecDataset(torch.utils.data.Dataset):
    """Base: item i -> normalized spectrogram [1, frames, mel]; `labels[i]` is a class id or -1."""

    classes: tuple[str, ...] = ()
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def spectrogram(self, i: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def raw_fbank(self, i: int) -> torch.Tensor:
        """Un-normalized, uncropped fbank [frames, mel] of item i (for dataset statistics)."""
        raise NotImplementedError

    def crop(self, i: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The waveform under item i's crop [S] at audio.sample_rate, S <= crop_samples: what the
        loader hands over when the fbank runs batched on the device (audio.frontend)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.spectrogram(i)


class SyntheticDataset(SpecDataset):
    """The built-in procedural corpus, computed on first use and cached per process."""

    classes = SYNTH_CLASSES

    def __init__(self, num_clips: int, audio: AudioConfig, seed: int = 0):
        self.audio, self.seed = audio, seed
        self.labels = [i % len(SYNTH_CLASSES) for i in range(num_clips)]
        self._cache: dict[int, torch.Tensor] = {}

    def spectrogram(self, i: int, generator=None) -> torch.Tensor:
        if i not in self._cache:
            wave, _ = synth_clip(i, synth_seconds(self.audio), self.audio.sample_rate, self.seed)
            self._cache[i] = waveform_to_spec(torch.from_numpy(wave), self.audio.sample_rate, self.audio).unsqueeze(0)
        return self._cache[i]

    def raw_fbank(self, i: int) -> torch.Tensor:
        wave, _ = synth_clip(i, synth_seconds(self.audio), self.audio.sample_rate, self.seed)
        return fbank(torch.from_numpy(wave), self.audio)

    def crop(self, i: int, generator=None) -> torch.Tensor:
        return torch.from_numpy(synth_clip(i, synth_seconds(self.audio), self.audio.sample_rate, self.seed)[0])


class AudioFileDataset(SpecDataset):
    """Audio files with optional labels; long clips are cropped at a seeded random offset."""

    def __init__(self, paths: list[Path], labels: list[str | None], audio: AudioConfig, random_crop: bool = True):
        if not paths:
            raise ValueError("the dataset is empty")
        self.paths, self.audio, self.random_crop = paths, audio, random_crop
        names = sorted({lab for lab in labels if lab is not None})
        self.classes = tuple(names)
        lookup = {name: i for i, name in enumerate(names)}
        self.labels = [lookup[lab] if lab is not None else -1 for lab in labels]

    def spectrogram(self, i: int, generator=None) -> torch.Tensor:
        offset = None if (self.random_crop and generator is not None) else 0
        return file_to_spec(self.paths[i], self.audio, crop_offset=offset, generator=generator).unsqueeze(0)

    def raw_fbank(self, i: int) -> torch.Tensor:
        wave, sr = load_audio(self.paths[i])
        if wave.numel() == 0:  # as training's loader: such a file is bad, not one frame of silence
            raise AudioError(f"{self.paths[i]}: empty waveform (0 samples)")
        return fbank(resample(wave, sr, self.audio.sample_rate), self.audio)

    def crop(self, i: int, generator=None) -> torch.Tensor:
        offset = None if (self.random_crop and generator is not None) else 0
        return file_to_crop(self.paths[i], self.audio, crop_offset=offset, generator=generator)


def scan_folder(root: Path) -> tuple[list[Path], list[str | None]]:
    """Audio files found recursively; a file's label is its top-level subfolder, if any.

    Symlinks with an audio extension are kept even when broken or looping: loading them then fails,
    so they are reported and counted as bad files rather than silently left out."""
    paths = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in AUDIO_EXTENSIONS and (p.is_symlink() or p.is_file()))
    labels = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths]
    return paths, labels


def read_manifest(path: Path) -> tuple[list[Path], list[str | None]]:
    """CSV with a header (columns `path`, optional `label`) or JSONL ({"path": ..., "label": ...}).

    Relative paths are taken from the manifest's folder.
    """
    rows: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: the manifest is not UTF-8 text (byte {exc.start})") from None
    if path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ValueError(f"{path}: a CSV manifest needs a header with a 'path' column")
            rows = list(reader)
        except csv.Error as exc:
            raise ValueError(f"{path}: not a readable CSV manifest ({exc})") from None
        for lineno, row in enumerate(rows, 2):
            if not row.get("path"):
                raise ValueError(f"{path}:{lineno}: empty 'path'")
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict) or "path" not in row:
                    raise ValueError(f"{path}:{lineno}: each line needs a 'path' field")
                if not isinstance(row["path"], str) or not row["path"]:
                    raise ValueError(f"{path}:{lineno}: 'path' must be a non-empty string, got {row['path']!r:.60}")
                rows.append(row)
    paths = [(path.parent / r["path"]) if not Path(r["path"]).is_absolute() else Path(r["path"]) for r in rows]
    labels = [str(r["label"]) if r.get("label") not in (None, "") else None for r in rows]
    return paths, labels


SHARD_INDEX = "index.json"  # written by `ajepa prepare` (ajepa/prepare.py)
SHARD_FORMAT = "ajepa-shards"
SHARD_VERSION = 1


def read_index(path: str | Path) -> dict:
    """A shard folder's (or its index.json's) index, checked; one-line errors."""
    path = Path(path)
    path = path / SHARD_INDEX if path.is_dir() else path
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable shard index ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: not an ajepa shard index (format {SHARD_FORMAT!r} expected)")
    if index.get("version", 0) > SHARD_VERSION:
        raise ValueError(f"{path}: shard index version {index['version']} is newer than this ajepa; upgrade")
    return index


class ShardDataset(SpecDataset):
    """Clips from `ajepa prepare`'s shards: int16 PCM at the index's sample rate, read by index through
    webdataset's `wids` (random access, so batches stay a pure function of (seed, step))."""

    def __init__(self, folder: Path, audio: AudioConfig, random_crop: bool = True):
        import contextlib

        import wids

        index = read_index(folder)
        self.folder = folder if folder.is_dir() else folder.parent
        if index["sample_rate"] != audio.sample_rate:
            raise ValueError(f"--data {folder}: shards hold {index['sample_rate']} Hz audio, the config wants "
                             f"audio.sample_rate={audio.sample_rate}; run ajepa prepare again with it")
        self.audio, self.random_crop = audio, random_crop
        self.paths = [Path(p) for p in index["paths"]]
        self.classes = tuple(index["classes"])
        lookup = {name: i for i, name in enumerate(self.classes)}
        self.labels = [lookup[lab] if lab is not None else -1 for lab in index["labels"]]
        shards = [{"url": str(self.folder / s["url"]), "nsamples": s["nsamples"]} for s in index["shardlist"]]
        quiet = io.StringIO()  # wids prints its shard list on construction
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            self.reader = wids.ShardListDataset(shards, transformations=[])

    def _pcm(self, i: int) -> np.ndarray:
        return np.frombuffer(self.reader[i][".pcm"].getbuffer(), dtype=np.int16)  # no copy

    def waveform(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._pcm(i).astype(np.float32) / 32767.0)

    def spectrogram(self, i: int, generator=None) -> torch.Tensor:
        wave = self.waveform(i)
        offset = None if (self.random_crop and generator is not None) else 0
        wave, offset = crop_wave(wave, self.audio, offset, generator)
        return waveform_to_spec(wave, self.audio.sample_rate, self.audio, offset, generator).unsqueeze(0)

    def raw_fbank(self, i: int) -> torch.Tensor:
        return fbank(self.waveform(i), self.audio)

    def crop(self, i: int, generator=None) -> torch.Tensor:
        offset = None if (self.random_crop and generator is not None) else 0
        pcm = self._pcm(i)  # only the crop is converted to float
        return torch.from_numpy(pcm[window_span(pcm.size, self.audio, offset, generator)].astype(np.float32) / 32767.0)


def build_dataset(data: DataConfig, audio: AudioConfig, seed: int = 0) -> SpecDataset:
    """`data.path` None -> built-in corpus; a folder -> audio files in it; .csv/.jsonl -> a manifest."""
    if data.path is None:
        return SyntheticDataset(data.synth_clips, audio, seed)
    path = Path(data.path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if (path / SHARD_INDEX).is_file() or path.name == SHARD_INDEX:
        return ShardDataset(path, audio, data.random_crop)
    if path.is_dir():
        paths, labels = scan_folder(path)
        if not paths:
            raise ValueError(f"--data {path}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found under it")
    elif path.suffix.lower() in (".csv", ".jsonl"):
        paths, labels = read_manifest(path)
        if not paths:
            raise ValueError(f"--data {path}: the manifest lists no files")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--data {path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
    else:
        raise ValueError(f"--data {path}: expected a folder, a .csv or a .jsonl manifest")
    return AudioFileDataset(paths, labels, audio, data.random_crop)


# ---------------------------------------------------------------------------- step-indexed batches


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields [(step, sample index), ...] for steps start..steps-1.

    The global sample stream is a new permutation each epoch, seeded by (seed, epoch); rank r of
    `world` takes its own slice of each step's global batch, so ranks never share a sample.
    """

    def __init__(self, num_samples: int, batch_size: int, steps: int, seed: int = 0, start_step: int = 0,
                 rank: int = 0, world: int = 1):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.n, self.b, self.steps, self.seed = num_samples, batch_size, steps, seed
        self.start, self.rank, self.world = start_step, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        first = (step * self.world + self.rank) * self.b
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + self.b)]

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield [(step, i) for i in self.indices(step)]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


MAX_SUBSTITUTE_TRIES = 64


class StepDataset(torch.utils.data.Dataset):
    """(step, i) -> (spectrogram, label, step, bad); crops are seeded by (seed, step, i).

    A clip that cannot be read (corrupt, empty, zero-length, NaN/Inf, unsupported format) is
    replaced by another clip drawn from a generator seeded by (seed, step, i), so batches stay full
    and the same on every run; `bad` lists ((path, reason), ...) for the clips replaced. Known-bad
    clips are remembered and never decoded twice. With `strict`, the first bad clip raises.
    """

    def __init__(self, base: SpecDataset, seed: int = 0, strict: bool = False, waves: bool = False):
        """`waves`: hand over the waveform under each crop instead of its spectrogram (the fbank then
        runs batched on the device, `ajepa.audio.batch_fbank`)."""
        self.base, self.seed, self.strict, self.waves = base, seed, strict, waves
        self._bad: dict[int, str] = {}  # index -> reason, per process (each loader worker has its own)

    def __len__(self) -> int:
        return len(self.base)

    def _name(self, i: int) -> str:
        paths = getattr(self.base, "paths", None)
        return printable(paths[i]) if paths is not None else f"item {i}"

    def _load(self, step: int, i: int) -> torch.Tensor | None:
        """The clip's spectrogram, or None (and remembered as bad) if it cannot be read."""
        if i in self._bad:
            return None
        gen = torch.Generator().manual_seed(hash((self.seed, step, i)) & 0x7FFFFFFF)
        try:
            spec = self.base.crop(i, gen) if self.waves else self.base.spectrogram(i, gen)
            if spec.numel() == 0:
                raise AudioError("empty waveform (0 samples)")
            if not torch.isfinite(spec).all():
                raise AudioError(f"{'waveform' if self.waves else 'spectrogram'} holds NaN or Inf values")
            return spec
        except (AudioError, RuntimeError, ValueError, OSError) as exc:
            name = self._name(i)
            paths = getattr(self.base, "paths", None)
            reason = printable(str(exc).removeprefix(f"{paths[i]}: ") if paths is not None else str(exc))
            if self.strict:
                raise AudioError(f"{name}: {reason} (data.strict / --strict: a bad file is fatal)") from exc
            self._bad[i] = f"{type(exc).__name__}: {reason}"
            return None

    def __getitem__(self, key: tuple[int, int]):
        """(spectrogram or waveform, label, step, bad clips, seconds spent), or a LoaderFailure."""
        t0 = time.perf_counter()
        try:
            return (*self._item(key), time.perf_counter() - t0)
        except AudioError as exc:  # reaches the main process as one line (see LoaderFailure)
            return LoaderFailure(exc)

    def _item(self, key: tuple[int, int]):
        step, i = key
        spec = self._load(step, i)
        if spec is not None:
            return spec, self.base.labels[i], step, ()
        bad = [(self._name(i), self._bad[i])]
        n = len(self.base)
        rng = np.random.default_rng([self.seed, step, i, 0x5B1F])
        for _ in range(MAX_SUBSTITUTE_TRIES):
            if len(self._bad) >= n:
                break
            j = int(rng.integers(n))
            spec = self._load(step, j)
            if spec is not None:
                return spec, self.base.labels[j], step, tuple(bad)
            if (self._name(j), self._bad[j]) not in bad:
                bad.append((self._name(j), self._bad[j]))
        if len(self._bad) >= n:
            raise AudioError(f"no readable audio: all {n} files failed to load (e.g. {bad[-1][0]}: {bad[-1][1]})")
        raise AudioError(
            f"no readable audio: {len(self._bad)} of {n} files failed to load so far, and the "
            f"{MAX_SUBSTITUTE_TRIES} substitutes drawn for {self._name(i)} were all bad "
            f"(last: {bad[-1][0]}: {bad[-1][1]})"
        )


@dataclass
class LoaderFailure:
    """An error met in a loader worker, carried to the main process as the exception itself.

    PyTorch re-raises a worker's exception with the worker's whole traceback pasted into its
    message; a user error (a bad file under --strict, no readable audio, impossible masks) should
    read as one line, as it does with --workers 0. Bugs (other exception types) still propagate."""

    error: BaseException


@dataclass
class Batch:
    spec: torch.Tensor  # [B, 1, frames, mel]
    labels: torch.Tensor  # int64 [B], -1 where unlabelled
    step: int
    masks: PackedMasks
    target_count: torch.Tensor | None = None  # float32 [] number of target tokens (for the global loss mean)
    bad: tuple[tuple[str, str], ...] = ()  # (file, reason) for each bad clip met while building the batch
    skipped: int = 0  # samples of this batch that were replaced because their clip was bad
    lengths: torch.Tensor | None = None  # int64 [B]: `spec` holds padded waveforms [B, S] (audio.frontend)
    error: BaseException | None = None  # a user error met in the loader worker: raise it in the main process
    load_s: float = 0.0  # seconds the loader spent building this batch (read, decode, fbank, masks)

    @classmethod
    def failed(cls, error: BaseException) -> Batch:
        empty = torch.zeros(0)
        return cls(empty, empty.long(), -1, None, None, error=error)

    def to(self, device, non_blocking: bool = False) -> Batch:
        if self.error is not None:
            return self

        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return replace(self, spec=move(self.spec), labels=move(self.labels), masks=self.masks.to(device, non_blocking),
                       target_count=move(self.target_count), lengths=move(self.lengths))

    def pin_memory(self) -> Batch:
        if self.error is not None:
            return self

        def pin(t):
            return None if t is None else t.pin_memory()
        return replace(self, spec=pin(self.spec), labels=pin(self.labels), masks=self.masks.pin_memory(),
                       target_count=pin(self.target_count), lengths=pin(self.lengths))


class ClipRows:
    """model.clip_tokens_only: the patch rows that hold each sample's own audio, from the normalized
    spectrograms (ajepa.audio.audio_rows) or, for the device fbank, from the waveforms' lengths."""

    def __init__(self, cfg: AudioConfig, patch_frames: int):
        self.cfg, self.patch_frames = cfg, patch_frames

    def __call__(self, batch: torch.Tensor, lengths: torch.Tensor | None) -> list[int]:
        """batch: the stacked spectrograms [B, 1, frames, mel], or padded waveforms [B, S] with their `lengths`."""
        p, frames = self.patch_frames, self.cfg.target_frames
        if lengths is not None:
            return [-(-min(kaldi_frames(int(n), self.cfg), frames) // p) for n in lengths]
        return audio_rows(batch, self.cfg, p).tolist()


class MaskCollator:
    """Stacks spectrograms and draws + packs the step's masks (in the loader workers); with `clip_rows`
    (model.clip_tokens_only), each sample's masks stay inside its clip's own rows."""

    def __init__(self, sampler: MaskSampler, clip_rows: ClipRows | None = None):
        self.sampler, self.clip_rows = sampler, clip_rows

    def __call__(self, items) -> Batch:
        failed = [item.error for item in items if isinstance(item, LoaderFailure)]
        if failed:
            return Batch.failed(failed[0])
        t0 = time.perf_counter()
        specs, labels, steps, bads, seconds = zip(*items)
        step = steps[0]
        lengths = None
        if specs[0].dim() == 1:  # waveforms of their own lengths: pad to the longest
            lengths = torch.tensor([w.numel() for w in specs], dtype=torch.long)
            specs = [torch.nn.functional.pad(w, (0, int(lengths.max()) - w.numel())) for w in specs]
        batch = torch.stack(specs)
        try:
            rows = None if self.clip_rows is None else self.clip_rows(batch, lengths)
            masks = self.sampler(step, len(items), rows)
        except ValueError as exc:
            return Batch.failed(exc)
        count = torch.tensor(float(masks.tgt_index.numel()))
        bad = tuple(dict.fromkeys(b for group in bads for b in group))
        return Batch(batch, torch.tensor(labels, dtype=torch.long), step, masks, count, bad,
                     sum(1 for group in bads if group), lengths, load_s=sum(seconds) + time.perf_counter() - t0)


def default_workers(local_world: int = 1) -> int:
    """Loader processes per rank when train.num_workers is -1: this rank's share of the cores the
    process may use, less one for the training loop itself, between 1 and 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, local_world) - 1))


def make_loader(dataset: SpecDataset, sampler: MaskSampler, batch_size: int, steps: int, seed: int,
                start_step: int = 0, num_workers: int = 0, rank: int = 0, world: int = 1, pin_memory: bool = False,
                strict: bool = False, waves: bool = False, clip_rows: ClipRows | None = None):
    """Batches of `batch_size` samples (this rank's share) for steps start_step..steps-1; with `waves`,
    padded waveforms and their lengths instead of spectrograms; with `clip_rows`, masks inside each clip."""
    batches = StepBatchSampler(len(dataset), batch_size, steps, seed, start_step, rank, world)
    return torch.utils.data.DataLoader(
        StepDataset(dataset, seed, strict, waves),
        batch_sampler=batches,
        collate_fn=MaskCollator(sampler, clip_rows),
        num_workers=num_workers,
        prefetch_factor=4 if num_workers > 0 else None,  # batches in flight per worker
        pin_memory=pin_memory,
        persistent_workers=False,
    )


__all__ = [
    "AudioError",
    "AudioFileDataset",
    "Batch",
    "ClipRows",
    "MaskCollator",
    "StepBatchSampler",
    "StepDataset",
    "SyntheticDataset",
    "build_dataset",
    "make_loader",
    "synth_clip",
    "write_synth_corpus",
]
