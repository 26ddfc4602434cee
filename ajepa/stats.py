"""Dataset statistics for normalization: mean and std of the raw fbank over every frame."""

from __future__ import annotations

import math

from ajepa.config import Config
from ajepa.data import build_dataset


def dataset_stats(cfg: Config, limit: int | None = None, progress: bool = True) -> tuple[float, float, int]:
    """(mean, std, frames) of the un-normalized fbank over the dataset's clips (no padding counted)."""
    from tqdm import tqdm

    ds = build_dataset(cfg.data, cfg.audio, cfg.train.seed)
    n = len(ds) if limit is None else min(limit, len(ds))
    total, total_sq, count = 0.0, 0.0, 0
    for i in tqdm(range(n), desc="stats", disable=not progress):
        fb = ds.raw_fbank(i).double()
        total += float(fb.sum())
        total_sq += float((fb * fb).sum())
        count += fb.numel()
    if count == 0:
        raise ValueError("the dataset has no frames to measure")
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0)), count // cfg.audio.num_mel_bins
