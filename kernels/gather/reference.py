"""Plain PyTorch masked gather, the I-JEPA way: index the rows, autograd does the backward.

Pure math: inputs are checked by ``kernels.gather.masked_gather`` / ``gather_layer_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_gather_ref(x: Tensor, index: Tensor, pos: Tensor | None = None) -> Tensor:
    """out[t] = x.reshape(-1, D)[index[t]] (+ pos[index[t] % N]).

    x [B, N, D] or [R, D], index int64 [T], pos [N, D] (N = x.shape[1] for 3-D x,
    pos.shape[0] for 2-D x) -> [T, D]. Differentiable w.r.t. x and pos.
    """
    out = x.reshape(-1, x.shape[-1])[index]
    if pos is not None:
        out = out + pos[index % pos.shape[0]]
    return out


def gather_layer_norm_ref(x: Tensor, index: Tensor, eps: float = 1e-5) -> Tensor:
    """F.layer_norm (no affine, fp32 math) of the gathered rows: [T, D] in x.dtype, no grad.

    Equal to F.layer_norm(x.reshape(-1, D), (D,), eps=eps)[index], without normalizing
    the rows nobody reads.
    """
    D = x.shape[-1]
    with torch.no_grad():
        rows = x.reshape(-1, D)[index]
        return F.layer_norm(rows.float(), (D,), eps=eps).to(x.dtype)
