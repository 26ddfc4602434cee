"""Block geometry on the (time x frequency) patch grid: how target and context blocks are drawn.

Shared by the mask sampler (ajepa/masks.py) and the config check that refuses, before a run starts,
target settings that would rarely or never leave `masks.min_keep` context patches.
Token n of a sample sits at grid cell (n // F, n % F): time-major, F frequency patches per row.
"""

from __future__ import annotations

import functools
import math

import numpy as np

Block = tuple[int, int, int, int]  # (top, left, height, width) in patches


def fit_block(area: float, h: float, w: float, grid: tuple[int, int]) -> tuple[int, int]:
    """Round a block to whole patches inside the grid, keeping its area when one side is clipped."""
    H, W = grid
    h, w = max(1, round(h)), max(1, round(w))
    if w > W:
        w, h = W, max(1, round(area / W))
    if h > H:
        h, w = H, min(W, max(1, round(area / H)))
    return min(h, H), w


def _place(rng: np.random.Generator, h: int, w: int, grid: tuple[int, int]) -> Block:
    # Corners may land on the last row and column (I-JEPA's randint(0, H - h) could not).
    H, W = grid
    return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w


def sample_block(rng: np.random.Generator, grid: tuple[int, int], scale, aspect) -> Block:
    """A block of `scale` * grid area and aspect ratio (time / frequency) drawn from `aspect`."""
    H, W = grid
    area = rng.uniform(*scale) * H * W
    ar = rng.uniform(*aspect)
    h, w = fit_block(area, math.sqrt(area * ar), math.sqrt(area / ar), grid)
    return _place(rng, h, w, grid)


def sample_tf_block(rng: np.random.Generator, grid: tuple[int, int], scale, time_share: float = 0.5) -> Block:
    """A time-frequency block: with probability `time_share` a time strip over every frequency row,
    else a frequency band over a contiguous stretch of time (band height 1..max(1, F // 4) patches).
    A-JEPA does not publish its exact geometry; this is ours."""
    H, W = grid
    area = rng.uniform(*scale) * H * W
    if rng.random() < time_share:  # time strip
        h, w = min(H, max(1, round(area / W))), W
    else:  # frequency band
        w = int(rng.integers(1, max(1, W // 4) + 1))
        h = min(H, max(1, round(area / w)))
    return _place(rng, h, w, grid)


def block_indices(block: Block, grid: tuple[int, int]) -> np.ndarray:
    top, left, h, w = block
    rows = np.arange(top, top + h)[:, None]
    cols = np.arange(left, left + w)[None, :]
    return (rows * grid[1] + cols).reshape(-1)


def sample_targets(rng: np.random.Generator, grid: tuple[int, int], use_tf: bool, num: int, scale,
                   aspect, time_share: float = 0.5) -> list[np.ndarray]:
    """`num` target blocks as sorted int64 token indices (time-frequency blocks when `use_tf`, a
    `time_share` of them time strips)."""
    if use_tf:
        blocks = [sample_tf_block(rng, grid, scale, time_share) for _ in range(num)]
    else:
        blocks = [sample_block(rng, grid, scale, aspect) for _ in range(num)]
    return [np.sort(block_indices(b, grid)).astype(np.int64) for b in blocks]


FEASIBILITY_DRAWS = 64


@functools.lru_cache(maxsize=256)
def context_room(grid: tuple[int, int], use_tf: bool, num: int, scale: tuple[float, float],
                 aspect: tuple[float, float], min_keep: int, time_share: float = 0.5) -> float:
    """The share of target sets (FEASIBILITY_DRAWS of them, from a fixed seed) that leave at least
    `min_keep` uncovered patches for the context. The sampler redraws the others, so a share near 0
    means a run would stall; the config check refuses those settings up front."""
    rng = np.random.default_rng(0x6D61736B)
    n = grid[0] * grid[1]
    ok = 0
    for _ in range(FEASIBILITY_DRAWS):
        covered = np.zeros(n, dtype=bool)
        for t in sample_targets(rng, grid, use_tf, num, scale, aspect, time_share):
            covered[t] = True
        ok += int(n - covered.sum() >= min_keep)
    return ok / FEASIBILITY_DRAWS
