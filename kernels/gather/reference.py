"""Plain PyTorch masked gather, the I-JEPA way: index the rows, autograd does the backward.

Also holds the argument checks that every implementation runs first, so the
reference and the Triton path reject exactly the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_gather_args(x, index, pos, validate: bool, op: str) -> int:
    """Raise ValueError naming the bad argument; return N (the pos period).

    Shape/dtype/device checks are host metadata and always run; the index range
    check reads index values (a host sync on CUDA) and runs only when `validate`.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3) or not x.is_floating_point():
        raise ValueError(
            f"{op}: x must be a floating [B, N, D] or [R, D] tensor, got shape {tuple(x.shape)} dtype {x.dtype}"
        )
    if not isinstance(index, Tensor):
        raise ValueError(f"{op}: index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise ValueError(f"{op}: index must be int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: index must be 1-D [T], got shape {tuple(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"{op}: index is on {index.device} but x is on {x.device}")
    D = x.shape[-1]
    rows = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    # N: the period of pos, x.shape[1] for [B, N, D] x, pos.shape[0] for [R, D] x.
    if x.dim() == 3:
        n_pos = x.shape[1]
    elif pos is not None and isinstance(pos, Tensor) and pos.dim() == 2:
        n_pos = pos.shape[0]
    else:
        n_pos = max(rows, 1)
    if pos is not None:
        if not isinstance(pos, Tensor):
            raise ValueError(f"{op}: pos must be a torch.Tensor or None, got {type(pos).__name__}")
        if pos.dim() != 2 or pos.shape[0] != n_pos or pos.shape[1] != D or n_pos < 1:
            want = f"[{n_pos}, {D}]" if x.dim() == 3 else f"[P >= 1, {D}]"
            raise ValueError(f"{op}: pos must have shape {want}, got {tuple(pos.shape)}")
        if pos.dtype != x.dtype:
            raise ValueError(f"{op}: pos dtype {pos.dtype} differs from x dtype {x.dtype}")
        if pos.device != x.device:
            raise ValueError(f"{op}: pos is on {pos.device} but x is on {x.device}")
    if validate and index.numel() > 0:
        lo, hi = torch.aminmax(index)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= rows:
            raise ValueError(f"{op}: index values must lie in [0, {rows}) (rows of x), got min {lo} max {hi}")
    return n_pos


def masked_gather_ref(x: Tensor, index: Tensor, pos: Tensor | None = None, validate: bool = True) -> Tensor:
    """out[t] = x.reshape(-1, D)[index[t]] (+ pos[index[t] % N]).

    x [B, N, D] or [R, D], index int64 [T], pos [N, D] (N = x.shape[1] for 3-D x,
    pos.shape[0] for 2-D x) -> [T, D]. Differentiable w.r.t. x and pos.
    """
    n_pos = check_gather_args(x, index, pos, validate, "masked_gather")
    out = x.reshape(-1, x.shape[-1])[index]
    if pos is not None:
        out = out + pos[index % n_pos]
    return out


def gather_layer_norm_ref(x: Tensor, index: Tensor, eps: float = 1e-5, validate: bool = True) -> Tensor:
    """F.layer_norm (no affine, fp32 math) of the gathered rows: [T, D] in x.dtype, no grad.

    Equal to F.layer_norm(x.reshape(-1, D), (D,), eps=eps)[index], without normalizing
    the rows nobody reads.
    """
    check_gather_args(x, index, None, validate, "gather_layer_norm")
    D = x.shape[-1]
    with torch.no_grad():
        rows = x.reshape(-1, D)[index]
        return F.layer_norm(rows.float(), (D,), eps=eps).to(x.dtype)
