"""Plain PyTorch layer norm with an optional residual add: F.layer_norm in fp32 (fp64 for fp64 input).

Pure math: inputs are checked by ``kernels.layernorm.layer_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _math_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32 math, fp64 when any input is fp64 (the tests' gold runs)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def layer_norm_ref(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias over the last dim, h = x (or s).

    x [..., D]; weight, bias: [D] or None; statistics and the affine in fp32; y in x.dtype.
    With `residual` ([..., D]): s = x + residual, rounded to residual.dtype (the new residual
    stream, bit-equal to `x + residual` when both have that dtype); returns (y, s), y = norm(s).
    Differentiable w.r.t. every tensor.
    """
    acc = _math_dtype(x, weight, bias, residual)
    h = x
    if residual is not None:
        h = (x.to(acc) + residual.to(acc)).to(residual.dtype)
    y = F.layer_norm(
        h.to(acc), h.shape[-1:],
        None if weight is None else weight.to(acc),
        None if bias is None else bias.to(acc),
        eps,
    ).to(x.dtype)
    return y if residual is None else (y, h)
