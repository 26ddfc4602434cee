"""layer_norm: layer norm over the last dim with an optional fused residual add, Triton or reference.

The argument checks live here, ahead of both paths, so they reject exactly the same inputs.
"""

from __future__ import annotations

import math

from torch import Tensor

from kernels._common import check_is_tensor, check_same_device, check_triton_float, resolve_impl
from kernels.layernorm.reference import layer_norm_ref

try:  # triton is a Linux-only dependency; the reference path works without it
    from kernels.layernorm import fused as _fused
except ImportError:  # pragma: no cover - depends on the platform
    _fused = None

_OP = "layer_norm"
# The Triton kernels hold whole rows in registers (BLOCK_D = next power of 2 of D): past this
# width a row spills; the widest ViT (ViT-H/G) is 1280-1664.
MAX_DIM = 8192


def _check_args(x, weight, bias, eps, residual) -> None:
    """ValueError naming the bad argument (host metadata only: never a device sync)."""
    check_is_tensor(_OP, "x", x)
    if x.dim() < 1 or not x.is_floating_point() or x.shape[-1] < 1:
        raise ValueError(f"{_OP}: x must be a floating [..., D] tensor with D >= 1, "
                         f"got shape {tuple(x.shape)} dtype {x.dtype}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{_OP}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != (D,) or not t.is_floating_point():
            raise ValueError(f"{_OP}: {name} must be a floating [{D}] tensor (D = x.shape[-1]), "
                             f"got shape {tuple(t.shape)} dtype {t.dtype}")
        check_same_device(_OP, name, t, "x", x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{_OP}: eps must be a finite float >= 0, got {eps!r}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise ValueError(f"{_OP}: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape or not residual.is_floating_point():
            raise ValueError(f"{_OP}: residual must be a floating tensor of x's shape {tuple(x.shape)}, "
                             f"got shape {tuple(residual.shape)} dtype {residual.dtype}")
        check_same_device(_OP, "residual", residual, "x", x)


def _check_triton(x, weight, bias, residual) -> None:
    """Limits of the Triton path beyond the op's own checks."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None:
            check_triton_float(_OP, name, t)
    if x.shape[-1] > MAX_DIM:
        raise ValueError(f"{_OP}: impl='triton' normalizes rows of at most {MAX_DIM} elements, "
                         f"got x with D = {x.shape[-1]}")


def layer_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Layer norm over the last dim, as nn.LayerNorm(D, eps) with (optional) elementwise affine.

    x:        [..., D] floating (any strides); fp16 / bf16 / fp32 on the Triton path, D <= 8192.
    weight:   [D] or None (no scale); bias: [D] or None (no shift); any floating dtype.
    eps:      added to the variance, a float >= 0.
    residual: None, or [..., D] like x: the pre-norm residual add is fused in front: s = x + residual,
              rounded to residual.dtype, is normalized and returned too (the new residual stream).
    impl:     "auto" (Triton on CUDA, reference elsewhere) | "triton" | "reference".
    Returns y (x.shape, x.dtype), or (y, s) with a residual. Statistics and the affine run in fp32.
    Differentiable w.r.t. x, weight, bias and residual; the Triton backward is deterministic.
    Bad input raises ValueError naming the argument, on every impl.
    """
    _check_args(x, weight, bias, eps, residual)
    if resolve_impl(impl, x.device, _OP) == "reference":
        return layer_norm_ref(x, weight, bias, eps, residual)
    _check_triton(x, weight, bias, residual)
    return _fused.layer_norm_triton(x, weight, bias, eps, residual)


__all__ = ["MAX_DIM", "layer_norm", "layer_norm_ref"]
