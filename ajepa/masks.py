"""Masks on a rectangular (time x frequency) patch grid, packed for variable-length kernels.

Token n of a sample sits at grid cell (n // F, n % F): time-major, F frequency patches per row.

Every sample keeps its own context and target sizes: nothing is truncated to the shortest mask in
the batch (as I-JEPA's collator does). The batch is packed instead, with cu_seqlens:

    context encoder : ctx_index [T_ctx] (flat b*N + n), cu_ctx [B+1]
    predictor       : one sequence per (sample b, target block k) = [context of b ; targets of block k]
                      pred_index [T_pred] (flat b*N + n), cu_pred [B*K+1]
    outputs/targets : pred_out_index [T_tgt] rows of the predictor sequence that are targets,
                      tgt_index [T_tgt] the same tokens as flat b*N + n

Masks are a pure function of (seed, step, rank): a resumed run draws the same masks, and W ranks
of B samples draw the masks of one process with W*B samples.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from ajepa.config import MaskConfig
from ajepa.maskgeom import Block, block_indices, context_room, sample_block, sample_targets, sample_tf_block
from kernels import gather_segments

__all__ = ["Block", "block_indices", "sample_block", "sample_tf_block"]  # re-exported: they live in maskgeom

def curriculum_prob(step: int, total_steps: int, c0: float = 0.01) -> float:
    """A-JEPA's probability of time-frequency masks at `step`: min(1, sqrt(s(1-c0^2)/S + c0^2))."""
    s = min(max(step, 0), total_steps)
    return min(1.0, math.sqrt(s * (1.0 - c0 * c0) / max(total_steps, 1) + c0 * c0))


def sample_masks(
    rng: np.random.Generator, grid: tuple[int, int], cfg: MaskConfig, use_tf: bool, max_tries: int = 20,
    max_target_draws: int = 200,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One sample's (context indices, [target indices per block]), each sorted int64, with at least
    `cfg.min_keep` context patches: target sets that leave fewer are drawn again (config validation
    refuses targets that can never leave that many)."""
    for _ in range(max_target_draws):
        if use_tf:
            targets = sample_targets(rng, grid, True, cfg.tf_num_targets, cfg.tf_scale, None, cfg.tf_time_share)
        else:
            targets = sample_targets(rng, grid, False, cfg.num_targets, cfg.target_scale, cfg.target_aspect)
        covered = np.zeros(grid[0] * grid[1], dtype=bool)
        for t in targets:
            covered[t] = True
        if (~covered).sum() < cfg.min_keep:  # these targets leave too little: draw them again
            continue
        for _ in range(max_tries):
            keep = np.zeros_like(covered)
            keep[block_indices(sample_block(rng, grid, cfg.context_scale, (1.0, 1.0)), grid)] = True
            keep &= ~covered
            if keep.sum() >= cfg.min_keep:
                break
        else:  # every context block was eaten by the targets: fall back to all visible patches
            keep = ~covered
        return np.flatnonzero(keep).astype(np.int64), targets
    kind = "tf" if use_tf else "multiblock"
    raise ValueError(f"masks: {max_target_draws} draws of {kind} targets all left fewer than "
                     f"masks.min_keep={cfg.min_keep} context patches; lower the target scales or min_keep")


@dataclass
class PackedMasks:
    """A batch of per-sample masks packed for varlen kernels (see the module docstring)."""

    ctx_index: torch.Tensor  # int64 [T_ctx]
    cu_ctx: torch.Tensor  # int32 [B+1]
    max_ctx: int
    pred_index: torch.Tensor  # int64 [T_pred]
    cu_pred: torch.Tensor  # int32 [B*K+1]
    max_pred: int
    pred_out_index: torch.Tensor  # int64 [T_tgt]
    tgt_index: torch.Tensor  # int64 [T_tgt]
    batch_size: int
    num_patches: int
    use_tf: bool
    # The predictor's two gathers' backward plans (kernels.gather_segments), sorted here on the CPU:
    pred_perm: torch.Tensor  # int64 [T_pred]: pred_index's entries sorted by destination row
    pred_rowptr: torch.Tensor  # int64 [B*N+1]
    out_perm: torch.Tensor  # int64 [T_tgt]: pred_out_index's entries sorted by destination row
    out_rowptr: torch.Tensor  # int64 [T_pred+1]
    # model.clip_tokens_only: every sample's tokens that hold its clip's own audio (the target encoder's
    # input), packed like the context; None when masks cover the whole grid
    clip_index: torch.Tensor | None = None  # int64 [T_clip] (flat b*N + n)
    cu_clip: torch.Tensor | None = None  # int32 [B+1]
    max_clip: int = 0
    tgt_clip_index: torch.Tensor | None = None  # int64 [T_tgt]: tgt_index's rows in the packed clip tokens

    @property
    def pred_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pred_perm, self.pred_rowptr

    @property
    def out_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out_perm, self.out_rowptr

    def _map_tensors(self, fn) -> PackedMasks:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedMasks(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device, non_blocking: bool = False) -> PackedMasks:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedMasks:
        return self._map_tensors(torch.Tensor.pin_memory)

    def mark_dynamic(self) -> PackedMasks:
        """Mark every index tensor's length dynamic for torch.compile: token counts change every step,
        and one graph with symbolic lengths serves them all (no recompile per step). Returns self."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(value, 0)
        return self

    @property
    def num_targets(self) -> int:
        return int(self.tgt_index.numel())


def pack_masks(
    per_sample: list[tuple[np.ndarray, list[np.ndarray]]], num_patches: int, use_tf: bool,
    clip_tokens: list[int] | None = None,
) -> PackedMasks:
    """Pack per-sample (context, targets) into flat indices and cu_seqlens. Runs in loader workers.
    `clip_tokens[b]`: sample b's clip holds its first clip_tokens[b] tokens (whole time rows; every
    context and target index must lie below it), packed as the target encoder's input."""
    N = num_patches
    ctx_parts, pred_parts, out_parts, tgt_parts = [], [], [], []
    ctx_lens, pred_lens = [], []
    pred_offset = 0
    for b, (ctx, targets) in enumerate(per_sample):
        if ctx.size == 0:
            raise ValueError(f"sample {b} has an empty context")
        gctx = ctx + b * N
        ctx_parts.append(gctx)
        ctx_lens.append(ctx.size)
        for tgt in targets:
            if np.intersect1d(ctx, tgt).size:
                raise ValueError(f"sample {b}: context and target overlap")
            gtgt = tgt + b * N
            pred_parts += [gctx, gtgt]
            out_parts.append(pred_offset + ctx.size + np.arange(tgt.size))
            tgt_parts.append(gtgt)
            pred_lens.append(ctx.size + tgt.size)
            pred_offset += ctx.size + tgt.size

    def cu(lens):
        return torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))

    clip = {}
    if clip_tokens is not None:
        for b, ((ctx, targets), n) in enumerate(zip(per_sample, clip_tokens, strict=True)):
            if not 0 < n <= N or int(max(ctx.max(), *(t.max() for t in targets))) >= n:
                raise ValueError(f"sample {b}: masks reach past its clip's {n} tokens")
        index = np.concatenate([np.arange(n) + b * N for b, n in enumerate(clip_tokens)])
        starts = np.concatenate([[0], np.cumsum(clip_tokens)[:-1]])  # sample b's first row in the packed clip tokens
        tgt = np.concatenate(tgt_parts)
        clip = dict(clip_index=torch.from_numpy(index), cu_clip=cu(clip_tokens), max_clip=int(max(clip_tokens)),
                    tgt_clip_index=torch.from_numpy(starts[tgt // N] + tgt % N))

    pred_index = torch.from_numpy(np.concatenate(pred_parts))
    pred_out_index = torch.from_numpy(np.concatenate(out_parts).astype(np.int64))
    # the predictor gathers' backward plans, sorted here on the CPU (in the loader workers)
    pred_perm, pred_rowptr = gather_segments(pred_index, len(per_sample) * N)
    out_perm, out_rowptr = gather_segments(pred_out_index, pred_offset)
    return PackedMasks(
        ctx_index=torch.from_numpy(np.concatenate(ctx_parts)),
        cu_ctx=cu(ctx_lens),
        max_ctx=int(max(ctx_lens)),
        pred_index=pred_index,
        cu_pred=cu(pred_lens),
        max_pred=int(max(pred_lens)),
        pred_out_index=pred_out_index,
        tgt_index=torch.from_numpy(np.concatenate(tgt_parts)),
        batch_size=len(per_sample),
        num_patches=N,
        use_tf=use_tf,
        pred_perm=pred_perm,
        pred_rowptr=pred_rowptr,
        out_perm=out_perm,
        out_rowptr=out_rowptr,
        **clip,
    )



@functools.lru_cache(maxsize=64)
def clip_min_rows(cfg: MaskConfig, grid: tuple[int, int]) -> int:
    """model.clip_tokens_only: the fewest time rows a clip's grid (rows x F) is given, the smallest whose
    target draws leave masks.min_keep context patches at least half the time for every kind of target the
    run draws. A shorter clip keeps that many rows (some of them padding)."""
    gt, gf = grid
    kinds = ([(False, cfg.num_targets, cfg.target_scale, cfg.target_aspect)] if cfg.mode != "tf" else []) + (
        [(True, cfg.tf_num_targets, cfg.tf_scale, (1.0, 1.0))] if cfg.mode != "multiblock" else [])
    for rows in range(1, gt):
        if all(context_room((rows, gf), *kind, cfg.min_keep, cfg.tf_time_share) >= 0.5 for kind in kinds):
            return rows
    return gt


class MaskSampler:
    """Draws a batch's masks from (seed, step, rank) and the curriculum; stateless, so resumable."""

    def __init__(self, cfg: MaskConfig, grid: tuple[int, int], total_steps: int, seed: int = 0, rank: int = 0):
        self.cfg, self.grid, self.total_steps, self.seed, self.rank = cfg, grid, total_steps, seed, rank

    def tf_probability(self, step: int) -> float:
        mode = self.cfg.mode
        if mode == "multiblock":
            return 0.0
        if mode == "tf":
            return 1.0
        return curriculum_prob(step, self.total_steps, self.cfg.curriculum_c0)

    @property
    def min_rows(self) -> int:
        return clip_min_rows(self.cfg, self.grid)

    def __call__(self, step: int, batch_size: int, rows: list[int] | None = None) -> PackedMasks:
        """The step's masks; with `rows` (model.clip_tokens_only), sample j's are drawn on the grid of its
        clip's first rows[j] time rows (at least min_rows), so no context or target token is padding."""
        # The mask kind is drawn once per step for every rank, and each sample's masks from its
        # position in the step's global batch (rank r holds positions r*B .. r*B+B-1). So a run on
        # W ranks of B samples draws exactly the masks of one process with a batch of W*B, and a
        # checkpoint can resume at another world size with the same mask stream.
        use_tf = bool(np.random.default_rng([self.seed, step, 0x6A657061]).random() < self.tf_probability(step))
        first = self.rank * batch_size
        gt, gf = self.grid
        grids = [self.grid] * batch_size if rows is None else [(min(gt, max(int(r), self.min_rows)), gf) for r in rows]
        per_sample = [
            sample_masks(np.random.default_rng([self.seed, step, first + j, 0x6A657061]), grids[j], self.cfg, use_tf)
            for j in range(batch_size)
        ]  # time-major: a (rows x F) grid's token indices are the full grid's
        clip_tokens = None if rows is None else [g[0] * gf for g in grids]
        return pack_masks(per_sample, gt * gf, use_tf, clip_tokens)
