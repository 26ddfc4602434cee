"""Dataset statistics for normalization: mean and std of the raw fbank over every frame."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ajepa.audio import AudioError
from ajepa.config import Config, DataConfig
from ajepa.data import SpecDataset, build_dataset, printable

AUTO_NORM_CLIPS = 256  # clips audio.auto_norm measures, spread evenly over the dataset


@dataclass
class DatasetStats:
    mean: float
    std: float
    frames: int
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of each clip skipped


def dataset_stats(cfg: Config, limit: int | None = None, progress: bool = True, spread: bool = False,
                  dataset: SpecDataset | None = None) -> DatasetStats:
    """Mean, std and frame count of the un-normalized fbank over the dataset's clips (no padding
    counted): the first `limit` clips, or with `spread` `limit` clips evenly spaced over the dataset.
    A clip that cannot be read or holds NaN/Inf is skipped and listed in `bad`, as training skips it;
    with data.strict the first one is fatal. `dataset`: cfg.data's dataset when the caller has built it
    (raw_fbank does not depend on the normalization)."""
    from tqdm import tqdm

    ds = build_dataset(cfg.data, cfg.audio, cfg.train.seed) if dataset is None else dataset
    n = len(ds) if limit is None else min(limit, len(ds))
    items = np.linspace(0, len(ds) - 1, n).round().astype(int).tolist() if spread and n > 1 else range(n)
    total, total_sq, count = 0.0, 0.0, 0
    bad: list[tuple[str, str]] = []
    paths = getattr(ds, "paths", None)
    for i in tqdm(items, desc="stats", disable=not progress):
        name = printable(paths[i]) if paths is not None else f"item {i}"
        try:
            fb = ds.raw_fbank(i).double()
            if not bool(fb.isfinite().all()):
                raise AudioError("spectrogram holds NaN or Inf values")
        except (AudioError, RuntimeError, ValueError, OSError) as exc:
            reason = printable(str(exc).removeprefix(f"{paths[i]}: ") if paths is not None else str(exc))
            if cfg.data.strict:
                raise AudioError(f"{name}: {reason} (data.strict / --strict: a bad file is fatal)") from None
            bad.append((name, reason))
            continue
        total += float(fb.sum())
        total_sq += float((fb * fb).sum())
        count += fb.numel()
    if count == 0:
        if bad:  # the words of training's loader, which meets the same files
            name, reason = bad[-1]
            raise AudioError(f"no readable audio: all {len(bad)} files failed to load (e.g. {name}: {reason})")
        raise ValueError("the dataset has no frames to measure")
    mean = total / count
    return DatasetStats(mean, math.sqrt(max(total_sq / count - mean * mean, 0.0)), count // cfg.audio.num_mel_bins,
                        bad)


def resolve_auto_norm(cfg: Config, data: DataConfig | None = None,
                      dataset: SpecDataset | None = None) -> tuple[Config, DatasetStats | None]:
    """With audio.auto_norm: `cfg` with norm_mean/norm_std set to the fbank statistics of `data` (default:
    cfg.data) over up to AUTO_NORM_CLIPS clips spread across it, and auto_norm false, so the result is a
    complete record of the normalization used; plus the statistics. Without it: (cfg, None). `dataset`: the
    dataset of `data` (or cfg.data), when the caller has built it already."""
    if not cfg.audio.auto_norm:
        return cfg, None
    stats = dataset_stats(cfg if data is None else replace(cfg, data=data), limit=AUTO_NORM_CLIPS, progress=False,
                          spread=True, dataset=dataset)
    if not stats.std > 1e-3:  # NaN-safe: constant (e.g. all-silent) data has nothing to scale by
        raise ValueError(f"audio.auto_norm: the fbank of the {stats.frames} frames measured has std {stats.std:.3g}; "
                         "is the data silent? Set audio.norm_mean/norm_std yourself with audio.auto_norm=false")
    audio = replace(cfg.audio, norm_mean=stats.mean, norm_std=stats.std, auto_norm=False)
    return replace(cfg, audio=audio), stats
