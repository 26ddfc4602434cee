"""masked_gather / gather_layer_norm: gather token rows by flat index, Triton or reference.

The argument checks live here, ahead of both paths, so they reject exactly the same inputs.
"""

from __future__ import annotations

import math

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


def gather_segments(index: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """The backward plan of masked_gather(x, index) for x with n_rows rows: (perm, rowptr), int64.
    perm: the entries t of index sorted by index[t] (stable); rowptr [n_rows + 1]: the bounds of each
    row's run in perm. The Triton backward sorts on the device unless it is given this plan; ajepa's
    pack_masks computes it on the CPU in the loader workers, so the backward launches no sort."""
    check_index("gather_segments", "index", index, torch.int64, "[T]", "index", index)
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
        raise ValueError(f"gather_segments: n_rows must be an int >= 0, got {n_rows!r}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_rows):
        raise ValueError(f"gather_segments: index values must lie in [0, {n_rows}) (n_rows)")
    perm = torch.sort(index, stable=True).indices
    rowptr = torch.searchsorted(index[perm], torch.arange(n_rows + 1, device=index.device))
    return perm, rowptr


def _check_segments(segments, index: Tensor, rows: int, validate: bool, op: str) -> None:
    if not isinstance(segments, (tuple, list)) or len(segments) != 2:
        raise ValueError(f"{op}: segments must be a (perm, rowptr) pair from gather_segments, got "
                         f"{type(segments).__name__}")
    perm, rowptr = segments
    check_index(op, "segments perm", perm, torch.int64, "[T]", "index", index)
    check_index(op, "segments rowptr", rowptr, torch.int64, "[rows + 1]", "index", index)
    if perm.shape != index.shape or rowptr.shape != (rows + 1,):
        raise ValueError(f"{op}: segments have shapes {tuple(perm.shape)} and {tuple(rowptr.shape)}; index "
                         f"{tuple(index.shape)} into {rows} rows needs [{index.numel()}] and [{rows + 1}]")
    if validate:
        want_perm, want_ptr = gather_segments(index, rows)
        if not (torch.equal(perm, want_perm) and torch.equal(rowptr, want_ptr)):
            raise ValueError(f"{op}: segments do not match index (build them with gather_segments(index, {rows}))")


def masked_gather(
    x: Tensor, index: Tensor, pos: Tensor | None = None, impl: str = "auto", validate: bool = True,
    segments: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Gather rows of x at flat indices, optionally adding positions.

    x:     [B, N, D] or [R, D] floating (any strides)
    index: int64 [T], flat row indices into x.reshape(-1, D)
    pos:   optional [N, D], same dtype/device as x; adds pos[index % N]
           (N = x.shape[1] for 3-D x, pos.shape[0] for 2-D x)
    returns a new contiguous [T, D] tensor. Differentiable w.r.t. x and pos; the
    backward is a scatter-add that accumulates duplicate indices.

    segments: optional gather_segments(index, rows of x), the backward's sort computed ahead (by
    pack_masks, on the CPU); the Triton backward then launches no sort. The reference path ignores it.

    validate=True checks the index range and that segments match index (host syncs on CUDA); shape,
    dtype and device checks always run. Bad input raises ValueError naming the argument.
    """
    n_pos = _check_args(x, index, pos, validate, "masked_gather")
    if segments is not None:
        _check_segments(segments, index, math.prod(x.shape[:-1]), validate, "masked_gather")
    if resolve_impl(impl, x.device, "masked_gather") == "reference":
        return masked_gather_ref(x, index, pos)
    return _fused.masked_gather_triton(x, index, pos, n_pos, segments)


def gather_layer_norm(x: Tensor, index: Tensor, eps: float = 1e-5, impl: str = "auto", validate: bool = True) -> Tensor:
    """Layer-norm (no affine, fp32 math) only the gathered rows; no grad.

    x: [B, N, D] or [R, D]; index: int64 [T] -> [T, D] in x.dtype, equal to
    F.layer_norm(x.reshape(-1, D), (D,), eps=eps)[index].
    """
    _check_args(x, index, None, validate, "gather_layer_norm")
    if resolve_impl(impl, x.device, "gather_layer_norm") == "reference":
        return gather_layer_norm_ref(x, index, eps=eps)
    return _fused.gather_layer_norm_triton(x, index, eps=eps)


__all__ = ["gather_layer_norm", "gather_layer_norm_ref", "gather_segments", "masked_gather", "masked_gather_ref"]
