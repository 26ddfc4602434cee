"""A-JEPA: context encoder, EMA target encoder and predictor, with the latent regression loss."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from ajepa.config import Config
from ajepa.masks import PackedMasks
from ajepa.model.predictor import Predictor
from ajepa.model.vit import ViTEncoder


class AJEPA(nn.Module):
    """`impl` picks the kernel path ("auto" | "triton" | "reference"); the math is the same."""

    def __init__(self, cfg: Config, impl: str = "auto"):
        super().__init__()
        m = cfg.model
        self.impl = impl
        self.loss_type = m.loss
        self.encoder = ViTEncoder(cfg.grid, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio)
        self.predictor = Predictor(cfg.grid, m.embed_dim, m.pred_dim, m.pred_depth, m.pred_heads, m.mlp_ratio)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)

    def trainable_parameters(self):
        yield from self.encoder.parameters()
        yield from self.predictor.parameters()

    @torch.no_grad()
    def targets(self, spec: torch.Tensor, masks: PackedMasks) -> torch.Tensor:
        """Layer-normed target-encoder latents at the target tokens: [T_tgt, D]."""
        h = self.target_encoder.forward_dense(spec)  # [B, N, D]
        return kernels.gather_layer_norm(h, masks.tgt_index, impl=self.impl, validate=False)

    def predict(self, spec: torch.Tensor, masks: PackedMasks) -> torch.Tensor:
        ctx = self.encoder.forward_packed(spec, masks.ctx_index, masks.cu_ctx, masks.max_ctx, self.impl)
        return self.predictor(ctx, masks, self.impl)

    def forward(self, spec: torch.Tensor, masks: PackedMasks) -> torch.Tensor:
        """spec [B, 1, frames, mel] -> scalar loss, averaged over target tokens and channels."""
        pred = self.predict(spec, masks).float()
        tgt = self.targets(spec, masks).float()
        if self.loss_type == "smooth_l1":
            return F.smooth_l1_loss(pred, tgt)
        return F.mse_loss(pred, tgt)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, one fused launch on the Triton path."""
        kernels.ema_update(list(self.target_encoder.parameters()), list(self.encoder.parameters()), tau, impl=self.impl)
