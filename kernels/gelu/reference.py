"""Plain PyTorch bias + GELU: F.gelu(x + bias) in fp32 (fp64 for fp64 input), rounded once to x.dtype.

Pure math: inputs are checked by ``kernels.gelu.bias_gelu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bias_gelu_ref(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(x + bias) over [..., N] x and [N] bias, in x.dtype. approximate: "none" (erf) | "tanh".

    Differentiable w.r.t. x and bias (autograd through F.gelu).
    """
    acc = torch.float64 if torch.float64 in (x.dtype, bias.dtype) else torch.float32
    return F.gelu(x.to(acc) + bias.to(acc), approximate=approximate).to(x.dtype)
