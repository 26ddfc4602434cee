"""ViT pieces on a time x frequency patch grid, running dense [B, N, D] or packed [T, D] tokens."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [Gt*Gf, dim] for a time-major (Gt, Gf) grid.

    Half the channels encode the time row, half the frequency column (as MAE / I-JEPA do for images).
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed: dim must be a multiple of 4, got {dim}")
    gt, gf = grid

    def axis(n: int, d: int) -> torch.Tensor:  # [n, d]
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = torch.arange(n, dtype=torch.float64)[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    t = axis(gt, dim // 2)[:, None, :].expand(gt, gf, dim // 2)
    f = axis(gf, dim // 2)[None, :, :].expand(gt, gf, dim // 2)
    return torch.cat([t, f], dim=-1).reshape(gt * gf, dim).float()


class PatchEmbed(nn.Module):
    """[B, 1, frames, mel] -> [B, N, D], token n = t * Gf + f."""

    def __init__(self, patch_size: int | tuple[int, int], dim: int):  # (frames, mel bins), or one int: square
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.proj(spec).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens=None, max_seqlen: int = 0, impl: str = "auto", attn_mask=None):
        """`attn_mask` (dense path only): boolean, broadcastable to [B, heads, N, N], True = may attend."""
        if cu_seqlens is None:  # dense [B, N, D]: equal lengths
            B, N, D = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, N, D)
        elif attn_mask is not None:
            raise ValueError("attn_mask is supported on the dense path only (cu_seqlens=None)")
        else:  # packed [T, D]: qkv from one matmul goes to the kernel without a copy
            T, D = x.shape
            qkv = self.qkv(x).view(T, 3, self.num_heads, self.head_dim)
            o = kernels.varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, impl=impl, validate=False)
            o = o.reshape(T, D)
        return self.proj(o)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, state_dict keys and init) that runs kernels.layer_norm on the
    Triton path, with the pre-norm residual add fused in front when `residual` is given.

    impl="reference" (or "auto" off CUDA) is nn.LayerNorm's own forward, untouched. Going through
    the module (not its weight) keeps FSDP2's per-module hooks, which fire on __call__, working.
    """

    def forward(self, x, residual=None, impl: str = "auto"):
        """norm(x); with `residual`: (norm(x + residual), x + residual)."""
        if kernels.resolve_impl(impl, x.device, "LayerNorm") == "triton":
            return kernels.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, impl="triton")
        if residual is None:
            return super().forward(x)
        s = x + residual
        return super().forward(s), s


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, impl: str = "auto"):
        """fc2(gelu(fc1(x))). On the Triton path fc1 runs as a bias-free matmul and kernels.bias_gelu adds
        its bias and applies GELU in one pass (and sums the bias gradient inside the GELU backward)."""
        if self.fc1.bias is None or kernels.resolve_impl(impl, x.device, "MLP") == "reference":
            return self.fc2(F.gelu(self.fc1(x)))
        return self.fc2(kernels.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias, impl="triton"))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, cu_seqlens=None, max_seqlen: int = 0, impl: str = "auto", attn_mask=None):
        if kernels.resolve_impl(impl, x.device, "Block") == "reference":
            x = x + self.attn(self.norm1(x, impl="reference"), cu_seqlens, max_seqlen, impl, attn_mask)
            return x + self.mlp(self.norm2(x, impl="reference"), impl="reference")
        # Triton path: fused layer norms; norm2 also forms the residual stream x + attn(...) it normalizes
        a = self.attn(self.norm1(x, impl="triton"), cu_seqlens, max_seqlen, impl, attn_mask)
        h, x = self.norm2(a, residual=x, impl="triton")
        return x + self.mlp(h, impl="triton")


def init_weights(module: nn.Module, depth: int) -> None:
    """Truncated-normal linears, unit LayerNorms, and residual projections scaled by depth (I-JEPA)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for i, m in enumerate(mod for mod in module.modules() if isinstance(mod, Block)):
        m.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
        m.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))


class ViTEncoder(nn.Module):
    """The context / target encoder: patch embedding, fixed sin-cos positions (times pos_scale), pre-norm blocks."""

    def __init__(self, grid: tuple[int, int], patch_size: int | tuple[int, int], dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, pos_scale: float = 1.0):
        super().__init__()
        self.grid = grid
        self.dim = dim
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim) * pos_scale, persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(dim, eps=1e-6)
        init_weights(self, depth)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward_dense(self, spec: torch.Tensor, impl: str = "auto", keep: torch.Tensor | None = None) -> torch.Tensor:
        """spec [B, 1, frames, mel] -> every token [B, N, D]. Attention is dense SDPA on every path;
        `impl` picks the layer norms' and the MLP activation's kernels. With `keep` (bool [B, N]), every
        token attends only to its sample's kept tokens (model.clip_tokens_only: the clip's own audio)."""
        x = self.patch_embed(spec)
        x = x + self.pos_embed.to(x.dtype)
        mask = None if keep is None else keep[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, impl=impl, attn_mask=mask)
        return self.norm(x, impl=impl)

    def forward_layers(self, spec: torch.Tensor, k: int, impl: str = "auto") -> list[torch.Tensor]:
        """The outputs of the last `k` blocks [B, N, D] each, oldest first; the last one after the final norm."""
        x = self.patch_embed(spec)
        x = x + self.pos_embed.to(x.dtype)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, impl=impl)
            if i >= len(self.blocks) - k:
                outs.append(x)
        outs[-1] = self.norm(outs[-1], impl=impl)
        return outs

    def forward_packed(self, spec, index, cu_seqlens, max_seqlen: int, impl: str = "auto") -> torch.Tensor:
        """spec [B, 1, frames, mel] -> the visible tokens only, packed [T, D] (flat indices `index`)."""
        x = self.patch_embed(spec)  # [B, N, D]
        x = kernels.masked_gather(x, index, self.pos_embed.to(x.dtype), impl=impl, validate=False)  # [T, D]
        for blk in self.blocks:
            x = blk(x, cu_seqlens, max_seqlen, impl)
        return self.norm(x, impl=impl)
