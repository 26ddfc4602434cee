import math

import numpy as np
import pytest
import torch

from ajepa.config import MaskConfig, get_preset
from ajepa.masks import (
    MaskSampler,
    block_indices,
    curriculum_prob,
    pack_masks,
    sample_block,
    sample_masks,
    sample_tf_block,
)

GRIDS = [(16, 8), (64, 8), (7, 5)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("use_tf", [False, True])
def test_context_and_targets_disjoint_and_min_keep(grid, use_tf):
    cfg = MaskConfig(min_keep=4)
    rng = np.random.default_rng(0)
    n = grid[0] * grid[1]
    for _ in range(200):
        ctx, targets = sample_masks(rng, grid, cfg, use_tf)
        assert len(targets) == (cfg.tf_num_targets if use_tf else cfg.num_targets)
        assert ctx.size >= cfg.min_keep
        assert np.all(np.diff(ctx) > 0) and ctx.min() >= 0 and ctx.max() < n
        for t in targets:
            assert t.size >= 1 and t.max() < n
            assert np.intersect1d(ctx, t).size == 0


@pytest.mark.parametrize("grid", GRIDS)
def test_multiblock_scale_and_aspect_in_range(grid):
    H, W = grid
    rng = np.random.default_rng(1)
    scale = (0.15, 0.2)
    for _ in range(500):
        top, left, h, w = sample_block(rng, grid, scale, (0.75, 1.5))
        assert 0 <= top <= H - h and 0 <= left <= W - w
        # rounding each side to whole patches moves the area by at most half a row and half a column
        slack = (h + w) / 2 + 1
        assert scale[0] * H * W - slack <= h * w <= scale[1] * H * W + slack


def test_tf_blocks_are_time_strips_or_frequency_bands():
    grid = (64, 8)
    rng = np.random.default_rng(2)
    kinds = set()
    for _ in range(300):
        top, left, h, w = sample_tf_block(rng, grid, (0.05, 0.075))
        if w == grid[1]:
            kinds.add("strip")
        else:
            assert 1 <= w <= grid[1] // 4
            kinds.add("band")
        assert 0.05 * 512 - (h + w) <= h * w <= 0.075 * 512 + (h + w)
    assert kinds == {"strip", "band"}


@pytest.mark.parametrize("share,kind", [(1.0, "strip"), (0.0, "band")])
def test_tf_time_share_picks_the_block_kind(share, kind):
    grid = (16, 8)
    rng = np.random.default_rng(4)
    for _ in range(200):
        _, _, _, w = sample_tf_block(rng, grid, (0.1, 0.2), share)
        assert (w == grid[1]) == (kind == "strip")


@pytest.mark.parametrize("sampler", [lambda r, g: sample_block(r, g, (0.15, 0.2), (0.75, 1.5)),
                                     lambda r, g: sample_tf_block(r, g, (0.05, 0.075))])
def test_last_row_and_column_reachable(sampler):
    grid = (16, 8)
    rng = np.random.default_rng(3)
    hit = np.zeros(grid[0] * grid[1], dtype=bool)
    for _ in range(2000):
        hit[block_indices(sampler(rng, grid), grid)] = True
    cells = hit.reshape(grid)
    assert cells[-1, :].any() and cells[:, -1].any() and cells[-1, -1]


def test_curriculum_probability():
    c0, total = 0.01, 1000
    assert curriculum_prob(0, total, c0) == pytest.approx(c0)
    assert curriculum_prob(total, total, c0) == 1.0
    assert curriculum_prob(total * 2, total, c0) == 1.0
    assert curriculum_prob(250, total, c0) == pytest.approx(math.sqrt(0.25 * (1 - c0**2) + c0**2))
    probs = [curriculum_prob(s, total, c0) for s in range(0, total + 1, 10)]
    assert all(a < b for a, b in zip(probs, probs[1:]))


def test_sampler_modes_and_curriculum_frequency():
    grid = (16, 8)
    assert not any(MaskSampler(MaskConfig(mode="multiblock"), grid, 100)(s, 2).use_tf for s in range(20))
    assert all(MaskSampler(MaskConfig(mode="tf"), grid, 100)(s, 2).use_tf for s in range(20))
    cur = MaskSampler(MaskConfig(mode="curriculum"), grid, 1000)
    early = sum(cur(s, 1).use_tf for s in range(0, 100))
    late = sum(cur(s, 1).use_tf for s in range(900, 1000))
    assert early < 50 < late  # p(s) ~ 0.01..0.32 early, ~0.95..1 late


def test_sampler_deterministic_per_step_and_rank():
    cfg = get_preset("tiny")
    s = MaskSampler(cfg.masks, cfg.grid, 100, seed=7)
    a, b = s(5, 8), s(5, 8)
    assert torch.equal(a.ctx_index, b.ctx_index) and torch.equal(a.tgt_index, b.tgt_index)
    assert not torch.equal(s(6, 8).ctx_index, a.ctx_index)
    other_rank = MaskSampler(cfg.masks, cfg.grid, 100, seed=7, rank=1)(5, 8)
    assert not torch.equal(other_rank.ctx_index, a.ctx_index)


def test_packing_keeps_every_samples_own_lengths():
    cfg = get_preset("tiny")
    N = cfg.num_patches
    rng = np.random.default_rng(4)
    per = [sample_masks(rng, cfg.grid, cfg.masks, False) for _ in range(6)]
    pm = pack_masks(per, N, False)
    ctx_lens = np.diff(pm.cu_ctx.numpy())
    assert ctx_lens.tolist() == [c.size for c, _ in per]
    assert len(set(ctx_lens.tolist())) > 1, "the draw should give unequal context lengths"
    assert pm.cu_ctx.dtype == torch.int32 and pm.cu_pred.dtype == torch.int32
    assert pm.max_ctx == ctx_lens.max() and pm.max_pred == np.diff(pm.cu_pred.numpy()).max()
    # flat context indices are b*N + n, in sample order
    expect = np.concatenate([c + b * N for b, (c, _) in enumerate(per)])
    assert np.array_equal(pm.ctx_index.numpy(), expect)
    # each predictor sequence = its sample's context followed by one target block
    cu = pm.cu_pred.numpy()
    k = 0
    for b, (c, targets) in enumerate(per):
        for t in targets:
            seq = pm.pred_index.numpy()[cu[k]:cu[k + 1]]
            assert np.array_equal(seq, np.concatenate([c, t]) + b * N)
            k += 1
    # outputs point at the target rows of the predictor sequences, in target order
    assert np.array_equal(pm.pred_index[pm.pred_out_index].numpy(), pm.tgt_index.numpy())
    assert pm.tgt_index.numel() == sum(t.size for _, ts in per for t in ts)


@pytest.mark.parametrize("use_tf", [False, True])
def test_packing_ships_the_gather_backward_plans(use_tf):
    """pack_masks sorts the predictor gathers' destination rows on the CPU (so the Triton backward
    launches no sort); the plans equal what kernels.gather_segments computes from the indices."""
    from kernels import gather_segments

    cfg = get_preset("tiny")
    pm = pack_masks([sample_masks(np.random.default_rng(j), cfg.grid, cfg.masks, use_tf) for j in range(7)],
                    cfg.num_patches, use_tf)
    for got, want in ((pm.pred_segments, gather_segments(pm.pred_index, 7 * cfg.num_patches)),
                      (pm.out_segments, gather_segments(pm.pred_out_index, pm.pred_index.numel()))):
        assert got[0].dtype == got[1].dtype == torch.int64
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    moved = pm.to("cpu")
    assert torch.equal(moved.pred_perm, pm.pred_perm) and torch.equal(moved.out_rowptr, pm.out_rowptr)


def test_pack_rejects_overlap():
    with pytest.raises(ValueError, match="overlap"):
        pack_masks([(np.array([0, 1, 2]), [np.array([2, 3])])], 16, False)
