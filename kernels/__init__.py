"""ajepa's kernel ops, each with a Triton path and a plain PyTorch reference.

    from kernels import masked_gather, varlen_attention, ema_update, layer_norm, bias_gelu

Every op takes ``impl="auto" | "triton" | "reference"``: "auto" runs Triton on CUDA
tensors and the reference elsewhere. See each op's docstring for shapes.
"""

from kernels._common import IMPLS, MAX_HEAD_DIM, MIN_HEAD_DIM, resolve_impl
from kernels.attention import varlen_attention, varlen_attention_qkvpacked
from kernels.ema import EmaPlan, ema_update
from kernels.gather import gather_layer_norm, gather_segments, masked_gather
from kernels.gelu import bias_gelu
from kernels.layernorm import layer_norm

__all__ = [
    "EmaPlan",
    "IMPLS",
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "bias_gelu",
    "ema_update",
    "gather_layer_norm",
    "gather_segments",
    "layer_norm",
    "masked_gather",
    "resolve_impl",
    "varlen_attention",
    "varlen_attention_qkvpacked",
]
