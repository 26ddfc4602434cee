"""Benchmark shapes, taken from the real mask sampler.

On a GPU: the base preset (ViT-B encoder 12 heads x 64, predictor 16 heads x 32), batch 128.
On the CPU: the tiny preset at batch 8, so the torch peers run in seconds (GPU-only cases skip).
Environment overrides: AJEPA_BENCH_PRESET, AJEPA_BENCH_BATCH, AJEPA_BENCH_MASKS (comma list of
mask modes, default "multiblock,tf"), AJEPA_BENCH_REP_MS (do_bench repetition time, default 100).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ajepa.config import Config, apply_overrides, get_preset
from ajepa.masks import MaskSampler, PackedMasks

MASK_MODES = ("multiblock", "tf")


@dataclass(frozen=True)
class Scale:
    preset: str
    batch_size: int
    modes: tuple[str, ...]
    rep_ms: float
    warmup_ms: float


def bench_scale(device: torch.device) -> Scale:
    cuda = device.type == "cuda"
    preset = os.environ.get("AJEPA_BENCH_PRESET") or ("base" if cuda else "tiny")
    batch = int(os.environ.get("AJEPA_BENCH_BATCH") or (128 if cuda else 8))
    modes = tuple(
        m.strip() for m in (os.environ.get("AJEPA_BENCH_MASKS") or ",".join(MASK_MODES)).split(",") if m.strip()
    )
    for m in modes:
        if m not in MASK_MODES:
            raise ValueError(f"AJEPA_BENCH_MASKS: unknown mask mode {m!r} (choose from {MASK_MODES})")
    rep = float(os.environ.get("AJEPA_BENCH_REP_MS") or (100 if cuda else 60))
    return Scale(preset, batch, modes, rep, 25.0 if cuda else 0.0)


@functools.lru_cache(maxsize=16)
def config_for(preset: str, mode: str) -> Config:
    return apply_overrides(get_preset(preset), [f"masks.mode={mode}"])


@functools.lru_cache(maxsize=16)
def masks_for(preset: str, mode: str, batch_size: int, step: int = 0, seed: int = 0) -> PackedMasks:
    """One batch of real per-sample masks (CPU tensors) from the sampler the trainer uses."""
    cfg = config_for(preset, mode)
    return MaskSampler(cfg.masks, cfg.grid, cfg.train.steps, seed)(step, batch_size)


def attention_site(preset: str, mode: str, batch_size: int, site: str) -> tuple[torch.Tensor, int, int, list[int]]:
    """(cu_seqlens, heads, head dim, lengths) of one attention site on real sampler masks:
    "enc" the context encoder (one sequence per sample), "pred" the predictor (one per sample and block)."""
    cfg = config_for(preset, mode)
    m = masks_for(preset, mode, batch_size)
    if site == "enc":
        cu, H, dim = m.cu_ctx, cfg.model.num_heads, cfg.model.embed_dim
    elif site == "pred":
        cu, H, dim = m.cu_pred, cfg.model.pred_heads, cfg.model.pred_dim
    else:
        raise ValueError(f"attention site must be 'enc' or 'pred', got {site!r}")
    return cu, H, dim // H, lengths(cu)


def lengths(cu_seqlens: torch.Tensor) -> list[int]:
    cu = cu_seqlens.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (the training dtype under autocast); fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def document_block_mask(seq_id: torch.Tensor, cu_seqlens: torch.Tensor, mask_mod, block: int = 128):
    """FlexAttention BlockMask of a packed batch's document mask, built from the sequence layout.

    create_block_mask evaluates mask_mod on the whole T x T grid (T = 161k tokens for the base
    predictor: far too much memory). Documents are contiguous, so the kv blocks a query block can see
    are the range spanned by its first and last document; a block pair is full when both blocks lie
    whole inside one document. seq_id: int64 [T] (document of each token); cu_seqlens: [S+1].
    """
    from torch.nn.attention.flex_attention import BlockMask

    T = seq_id.numel()
    device = seq_id.device
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    nb = -(-T // block)
    starts = torch.arange(nb, device=device) * block
    ends = torch.clamp(starts + block, max=T) - 1
    first, last = seq_id[starts], seq_id[ends]
    kv_lo = cu[first] // block
    kv_hi = (cu[last + 1] - 1) // block
    cols = torch.arange(nb, device=device)
    visible = (cols[None, :] >= kv_lo[:, None]) & (cols[None, :] <= kv_hi[:, None])  # [nb, nb]
    whole = (first == last) & (starts + block <= T)  # block inside one document, no padding
    full = visible & whole[:, None] & whole[None, :] & (first[:, None] == first[None, :])
    partial = visible & ~full

    def blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = m.sum(1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=1, stable=True).to(torch.int32)  # visible columns first
        return num[None, None], idx[None, None]

    num_p, idx_p = blocks(partial)
    num_f, idx_f = blocks(full)
    try:
        return BlockMask.from_kv_blocks(
            num_p, idx_p, num_f, idx_f, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T)
        )
    except TypeError:  # older torch: no seq_lengths
        return BlockMask.from_kv_blocks(num_p, idx_p, num_f, idx_f, BLOCK_SIZE=block, mask_mod=mask_mod)
