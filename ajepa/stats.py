"""Dataset statistics for normalization: mean and std of the raw fbank over every frame."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ajepa.audio import AudioError
from ajepa.config import Config
from ajepa.data import build_dataset, printable


@dataclass
class DatasetStats:
    mean: float
    std: float
    frames: int
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of each clip skipped


def dataset_stats(cfg: Config, limit: int | None = None, progress: bool = True) -> DatasetStats:
    """Mean, std and frame count of the un-normalized fbank over the dataset's clips (no padding
    counted). A clip that cannot be read or holds NaN/Inf is skipped and listed in `bad`, as
    training skips it; with data.strict the first one is fatal."""
    from tqdm import tqdm

    ds = build_dataset(cfg.data, cfg.audio, cfg.train.seed)
    n = len(ds) if limit is None else min(limit, len(ds))
    total, total_sq, count = 0.0, 0.0, 0
    bad: list[tuple[str, str]] = []
    paths = getattr(ds, "paths", None)
    for i in tqdm(range(n), desc="stats", disable=not progress):
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
        raise ValueError(f"no readable clip to measure: all {n} failed to load" if bad
                         else "the dataset has no frames to measure")
    mean = total / count
    return DatasetStats(mean, math.sqrt(max(total_sq / count - mean * mean, 0.0)), count // cfg.audio.num_mel_bins,
                        bad)
