"""bias_gelu: y = gelu(x + bias), the MLP's fc1 bias and activation in one pass, Triton or reference.

The argument checks live here, ahead of both paths, so they reject exactly the same inputs.
"""

from __future__ import annotations

from torch import Tensor

from kernels._common import check_is_tensor, check_same_device, check_triton_float, resolve_impl
from kernels.gelu.reference import bias_gelu_ref

try:  # triton is a Linux-only dependency; the reference path works without it
    from kernels.gelu import fused as _fused
except ImportError:  # pragma: no cover - depends on the platform
    _fused = None

_OP = "bias_gelu"
APPROXIMATIONS = ("none", "tanh")


def _check_args(x, bias, approximate) -> None:
    """ValueError naming the bad argument (host metadata only: never a device sync)."""
    check_is_tensor(_OP, "x", x)
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"{_OP}: x must be a floating [..., N] tensor, got shape {tuple(x.shape)} dtype {x.dtype}")
    check_is_tensor(_OP, "bias", bias)
    if bias.shape != x.shape[-1:] or not bias.is_floating_point():
        raise ValueError(f"{_OP}: bias must be a floating [{x.shape[-1]}] tensor (N = x.shape[-1]), "
                         f"got shape {tuple(bias.shape)} dtype {bias.dtype}")
    check_same_device(_OP, "bias", bias, "x", x)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"{_OP}: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none", impl: str = "auto") -> Tensor:
    """gelu(x + bias), as F.gelu(F.linear(h, W, bias)) after a bias-free matmul x = F.linear(h, W).

    x:           [..., N] floating (any strides); fp16 / bf16 / fp32 on the Triton path.
    bias:        [N] floating, any of those dtypes (e.g. fp32 parameters beside bf16 activations).
    approximate: "none" (exact erf GELU, the default) | "tanh" (as F.gelu(approximate="tanh")).
    impl:        "auto" (Triton on CUDA, reference elsewhere) | "triton" | "reference".
    Returns [..., N] in x.dtype, computed in fp32 and rounded once. Differentiable w.r.t. x and bias;
    the Triton backward writes dx and sums dbias in the same pass (deterministic, no atomics).
    Bad input raises ValueError naming the argument, on every impl.
    """
    _check_args(x, bias, approximate)
    if resolve_impl(impl, x.device, _OP) == "reference":
        return bias_gelu_ref(x, bias, approximate)
    check_triton_float(_OP, "x", x)
    check_triton_float(_OP, "bias", bias)
    return _fused.bias_gelu_triton(x, bias, approximate)


__all__ = ["APPROXIMATIONS", "bias_gelu", "bias_gelu_ref"]
