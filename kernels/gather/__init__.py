"""masked_gather / gather_layer_norm: gather token rows by flat index, Triton or reference."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._dispatch import resolve_impl
from kernels.gather.reference import gather_layer_norm_ref, masked_gather_ref


def _device_of(x, op: str) -> torch.device:
    if not isinstance(x, Tensor):
        raise ValueError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    return x.device


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
    which = resolve_impl(impl, _device_of(x, "masked_gather"), "masked_gather")
    if which == "reference":
        return masked_gather_ref(x, index, pos, validate=validate)
    from kernels.gather.fused import masked_gather_triton

    return masked_gather_triton(x, index, pos, validate=validate)


def gather_layer_norm(x: Tensor, index: Tensor, eps: float = 1e-5, impl: str = "auto", validate: bool = True) -> Tensor:
    """Layer-norm (no affine, fp32 math) only the gathered rows; no grad.

    x: [B, N, D] or [R, D]; index: int64 [T] -> [T, D] in x.dtype, equal to
    F.layer_norm(x.reshape(-1, D), (D,), eps=eps)[index].
    """
    which = resolve_impl(impl, _device_of(x, "gather_layer_norm"), "gather_layer_norm")
    if which == "reference":
        return gather_layer_norm_ref(x, index, eps=eps, validate=validate)
    from kernels.gather.fused import gather_layer_norm_triton

    return gather_layer_norm_triton(x, index, eps=eps, validate=validate)


__all__ = ["gather_layer_norm", "gather_layer_norm_ref", "masked_gather", "masked_gather_ref"]
