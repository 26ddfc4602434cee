"""The predictor: context tokens plus mask tokens at a target block, one packed sequence per block."""

from __future__ import annotations

import torch
import torch.nn as nn

import kernels
from ajepa.masks import PackedMasks
from ajepa.model.vit import Block, LayerNorm, init_weights, sincos_pos_embed


class Predictor(nn.Module):
    def __init__(self, grid, enc_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, enc_dim)
        init_weights(self, depth)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx: torch.Tensor, masks: PackedMasks, impl: str = "auto") -> torch.Tensor:
        """ctx [T_ctx, D_enc] (context encoder output) -> predictions [T_tgt, D_enc] at masks.tgt_index."""
        B, N = masks.batch_size, masks.num_patches
        z = self.embed(ctx)  # [T_ctx, Dp]
        # A [B*N, Dp] grid holding each sample's projected context at its own positions and the
        # mask token everywhere else. Targets never overlap their sample's context, so one gather
        # (+ positions) builds every packed (sample, block) sequence: [context ; mask tokens].
        grid = torch.index_copy(self.mask_token.to(z.dtype).expand(B * N, -1), 0, masks.ctx_index, z)
        x = kernels.masked_gather(
            grid.view(B, N, -1), masks.pred_index, self.pos_embed.to(z.dtype), impl=impl, validate=False,
            segments=masks.pred_segments,
        )  # [T_pred, Dp]
        for blk in self.blocks:
            x = blk(x, masks.cu_pred, masks.max_pred, impl)
        x = kernels.masked_gather(x, masks.pred_out_index, impl=impl, validate=False,
                                  segments=masks.out_segments)  # [T_tgt, Dp]
        return self.proj(self.norm(x, impl=impl))
