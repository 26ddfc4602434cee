"""A-JEPA: context encoder, EMA target encoder and predictor, with the latent regression loss."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from ajepa.config import Config
from ajepa.masks import PackedMasks
from ajepa.model.augment import context_view
from ajepa.model.predictor import Predictor
from ajepa.model.sigreg import sigreg
from ajepa.model.vit import ViTEncoder


def normalize_targets(h: torch.Tensor, how: str, eps: float = 1e-6) -> torch.Tensor:
    """One layer's target features h [B, N, D], normalized as model.target_norm says:
    "layer": over the D channels of each token (I-JEPA's F.layer_norm);
    "instance": each channel over the N tokens of its clip (data2vec's instance norm);
    "batch": each (position, channel) over the B clips of the batch: removes the part of the
    target that is the same for every clip at a position (what a predictor can guess from the
    position alone)."""
    if how == "layer":
        return F.layer_norm(h, h.shape[-1:], eps=eps)
    dim = 1 if how == "instance" else 0
    if how not in ("instance", "batch"):
        raise ValueError(f"target norm {how!r}; choose layer, instance or batch")
    mean = h.mean(dim=dim, keepdim=True)
    var = h.var(dim=dim, keepdim=True, unbiased=False)
    return (h - mean) * torch.rsqrt(var + eps)


def _counts(keys: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """How many entries of keys fall on each of 0..n-1, as [n] floats. (Not torch.bincount: its output
    shape depends on the data, a graph break under torch.compile.)"""
    return torch.zeros(n, device=keys.device, dtype=dtype).index_add_(0, keys, torch.ones_like(keys, dtype=dtype))


def position_centered(tokens: torch.Tensor, index: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Packed tokens [T, D] at flat indices `index` (sample * N + position), minus the mean of the
    batch's tokens at the same position: the part that varies with the clip. (A token whose position
    no other sample of the batch shares becomes exactly 0; shapes stay static for torch.compile.)"""
    pos = index % num_patches
    counts = _counts(pos, num_patches, tokens.dtype)
    sums = torch.zeros(num_patches, tokens.shape[1], device=tokens.device, dtype=tokens.dtype)
    sums = sums.index_add(0, pos, tokens)
    mean = sums / counts.clamp_min(1)[:, None]
    return tokens - mean[pos]


def clip_means(tokens: torch.Tensor, index: torch.Tensor, num_patches: int, batch: int) -> torch.Tensor:
    """Packed tokens [T, D] at flat indices `index` (sample * N + position) -> each sample's mean token [B, D]."""
    sample = index // num_patches
    counts = _counts(sample, batch, tokens.dtype).clamp_min(1)
    sums = torch.zeros(batch, tokens.shape[1], device=tokens.device, dtype=tokens.dtype).index_add(0, sample, tokens)
    return sums / counts[:, None]


def signal_patches(spec: torch.Tensor, patch: int | tuple[int, int]) -> torch.Tensor:
    """bool [B, N]: patches of spec [B, 1, frames, mel] that are not one constant value
    (zero-padding past a clip's end and digital silence give constant log-mel patches)."""
    B = spec.shape[0]
    pt, pf = (patch, patch) if isinstance(patch, int) else patch
    p = spec.reshape(B, spec.shape[-2] // pt, pt, spec.shape[-1] // pf, pf)
    span = p.amax(dim=(2, 4)) - p.amin(dim=(2, 4))  # [B, Gt, Gf]
    return (span > 0).reshape(B, -1)


class AJEPA(nn.Module):
    """`impl` picks the kernel path ("auto" | "triton" | "reference"); the math is the same."""

    def __init__(self, cfg: Config, impl: str = "auto"):
        super().__init__()
        m = cfg.model
        self.impl = impl
        self.loss_type = m.loss
        self.patch_shape = cfg.patch_shape
        self.target_layers, self.target_norm = m.target_layers, m.target_norm
        self.signal_targets_only = m.signal_targets_only
        self.sigreg_weight, self.sigreg_projections = m.sigreg_weight, m.sigreg_projections
        self.sigreg_content, self.sigreg_clip_weight = m.sigreg_content, m.sigreg_clip_weight
        self.clip_loss_weight = m.clip_loss_weight
        self.ctx_mel_shift, self.ctx_gain_db, self.audio = m.ctx_mel_shift, m.ctx_gain_db, cfg.audio
        self.encoder = ViTEncoder(cfg.grid, cfg.patch_shape, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio,
                                  m.pos_scale)
        self.predictor = Predictor(cfg.grid, m.embed_dim, m.pred_dim, m.pred_depth, m.pred_heads, m.mlp_ratio)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)
        self._ema_plan: kernels.EmaPlan | None = None  # built at the first update_target

    def trainable_parameters(self):
        yield from self.encoder.parameters()
        yield from self.predictor.parameters()

    @torch.no_grad()
    def targets(self, spec: torch.Tensor, masks: PackedMasks, clips: bool = False):
        """Target-encoder latents at the target tokens: [T_tgt, D]. The default (model.target_layers=1,
        target_norm="layer") is I-JEPA's: the last layer, layer-normed, in one fused gather + norm.
        With `clips`, also each clip's mean layer-normed target token [B, D] (model.clip_loss_weight)."""
        index = masks.tgt_index
        if masks.clip_index is not None:  # model.clip_tokens_only: the clip's own tokens, packed [T_clip, D]
            h = self.target_encoder.forward_packed(spec, masks.clip_index, masks.cu_clip, masks.max_clip, self.impl)
            index = masks.tgt_clip_index
        elif self.target_layers == 1 and self.target_norm == "layer":
            h = self.target_encoder.forward_dense(spec, self.impl)  # [B, N, D]
        else:
            layers = self.target_encoder.forward_layers(spec, self.target_layers, self.impl)
            h = sum(normalize_targets(x.float(), self.target_norm) for x in layers) / len(layers)
        tgt = kernels.gather_layer_norm(h, index, impl=self.impl, validate=False)
        if not clips:
            return tgt
        return tgt, F.layer_norm(h.float(), h.shape[-1:], eps=1e-6).mean(dim=1)

    @torch.no_grad()
    def target_tokens(self, spec: torch.Tensor, masks: PackedMasks) -> torch.Tensor:
        """The target encoder's token map [B, N, D] for the health monitors; with model.clip_tokens_only
        (masks.clip_index), every token attends only to its clip's own tokens, as in training."""
        keep = None
        if masks.clip_index is not None:
            keep = torch.zeros(masks.batch_size * masks.num_patches, dtype=torch.bool, device=spec.device)
            keep = keep.index_fill(0, masks.clip_index, True).view(masks.batch_size, masks.num_patches)
        return self.target_encoder.forward_dense(spec, self.impl, keep=keep)

    def predict(self, spec: torch.Tensor, masks: PackedMasks, return_context: bool = False):
        ctx = self.encoder.forward_packed(spec, masks.ctx_index, masks.cu_ctx, masks.max_ctx, self.impl)
        pred = self.predictor(ctx, masks, self.impl)
        return (pred, ctx) if return_context else pred

    def forward(self, spec: torch.Tensor, masks: PackedMasks) -> torch.Tensor:
        """spec [B, 1, frames, mel] -> scalar loss, averaged over target tokens and channels
        (with model.signal_targets_only, over the target tokens whose patch holds signal), plus
        model.sigreg_weight x SIGReg of the context encoder's output tokens. The context encoder sees
        context_view(spec) (model.ctx_mel_shift / ctx_gain_db; spec itself by default), the target encoder spec."""
        view = context_view(spec, self.ctx_mel_shift, self.ctx_gain_db, self.audio)
        pred, ctx = self.predict(view, masks, return_context=True)
        pred = pred.float()
        tgt, tgt_clips = self.targets(spec, masks, clips=True) if self.clip_loss_weight > 0 else (
            self.targets(spec, masks), None)
        tgt = tgt.float()
        if self.loss_type == "smooth_l1":
            err = F.smooth_l1_loss(pred, tgt, reduction="none")
        else:
            err = F.mse_loss(pred, tgt, reduction="none")
        if self.signal_targets_only:
            keep = signal_patches(spec, self.patch_shape).reshape(-1)[masks.tgt_index].to(err.dtype)  # [T_tgt]
            loss = (err.mean(dim=1) * keep).sum() / keep.sum().clamp_min(1.0)
        else:
            loss = err.mean()
        if self.sigreg_weight > 0:
            z = position_centered(ctx, masks.ctx_index, masks.num_patches) if self.sigreg_content else ctx
            loss = loss + self.sigreg_weight * sigreg(z, self.sigreg_projections)
        if self.sigreg_clip_weight > 0 or self.clip_loss_weight > 0:
            clips = clip_means(ctx, masks.ctx_index, masks.num_patches, masks.batch_size)
        if self.sigreg_clip_weight > 0:
            loss = loss + self.sigreg_clip_weight * sigreg(clips, self.sigreg_projections)
        if self.clip_loss_weight > 0:  # the clip's mean visible token predicts its mean target token
            loss = loss + self.clip_loss_weight * F.mse_loss(clips.float(), tgt_clips)
        return loss

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, one fused launch on the Triton path, from a plan
        (kernels.EmaPlan) built at the first call and again after the parameters move."""
        if self._ema_plan is None:
            self._ema_plan = kernels.EmaPlan(list(self.target_encoder.parameters()), list(self.encoder.parameters()),
                                             impl=self.impl)
        self._ema_plan(tau)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .float(): parameters may be reallocated
        self._ema_plan = None
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):  # assign=True replaces the parameter objects
        self._ema_plan = None
        return super().load_state_dict(*args, **kwargs)
