"""masked_gather / gather_layer_norm: gather token rows by flat index, Triton or reference.

The argument checks live here, ahead of both paths, so they reject exactly the same inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._common import check_index, check_is_tensor, check_same_device, resolve_impl
from kernels.gather.reference import gather_layer_norm_ref, masked_gather_ref

try:  # triton is a Linux-only dependency; the reference path works without it
    from kernels.gather import fused as _fused
except ImportError:  # pragma: no cover - depends on the platform
    _fused = None


def _check_args(x, index, pos, validate: bool, op: str) -> int:
    """Raise ValueError naming the bad argument; return N (the pos period).

    Shape/dtype/device checks are host metadata and always run; the index range
    check reads index values (a host sync on CUDA) and runs only when `validate`.
    """
    check_is_tensor(op, "x", x)
    if x.dim() not in (2, 3) or not x.is_floating_point():
        raise ValueError(
            f"{op}: x must be a floating [B, N, D] or [R, D] tensor, got shape {tuple(x.shape)} dtype {x.dtype}"
        )
    check_index(op, "index", index, torch.int64, "[T]", "x", x)
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
        check_same_device(op, "pos", pos, "x", x)
    if validate and index.numel() > 0:
        lo, hi = torch.aminmax(index)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= rows:
            raise ValueError(f"{op}: index values must lie in [0, {rows}) (rows of x), got min {lo} max {hi}")
    return n_pos


def masked_gather(
    x: Tensor, index: Tensor, pos: Tensor | None = None, impl: str = "auto", validate: bool = True
) -> Tensor:
    """Gather rows of x at flat indices, optionally adding positions.

    x:     [B, N, D] or [R, D] floating (any strides)
    index: int64 [T], flat row indices into x.reshape(-1, D)
    pos:   optional [N, D], same dtype/device as x; adds pos[index % N]
           (N = x.shape[1] for 3-D x, pos.shape[0] for 2-D x)
    returns a new contiguous [T, D] tensor. Differentiable w.r.t. x and pos; the
    backward is a scatter-add that accumulates duplicate indices.

    validate=True checks the index range (a host sync on CUDA); shape, dtype and
    device checks always run. Bad input raises ValueError naming the argument.
    """
    n_pos = _check_args(x, index, pos, validate, "masked_gather")
    if resolve_impl(impl, x.device, "masked_gather") == "reference":
        return masked_gather_ref(x, index, pos)
    return _fused.masked_gather_triton(x, index, pos, n_pos)


def gather_layer_norm(x: Tensor, index: Tensor, eps: float = 1e-5, impl: str = "auto", validate: bool = True) -> Tensor:
    """Layer-norm (no affine, fp32 math) only the gathered rows; no grad.

    x: [B, N, D] or [R, D]; index: int64 [T] -> [T, D] in x.dtype, equal to
    F.layer_norm(x.reshape(-1, D), (D,), eps=eps)[index].
    """
    _check_args(x, index, None, validate, "gather_layer_norm")
    if resolve_impl(impl, x.device, "gather_layer_norm") == "reference":
        return gather_layer_norm_ref(x, index, eps=eps)
    return _fused.gather_layer_norm_triton(x, index, eps=eps)


__all__ = ["gather_layer_norm", "gather_layer_norm_ref", "masked_gather", "masked_gather_ref"]
