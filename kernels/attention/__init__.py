"""varlen_attention: non-causal softmax attention over packed sequences (cu_seqlens).

Same function as flash_attn_varlen_func / xformers BlockDiagonalMask: a token only attends
to tokens of its own sequence. Two paths compute it: a padded-SDPA reference (reference.py)
and a Triton FlashAttention-2 forward/backward (fused.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._common import (
    MAX_HEAD_DIM,
    MAX_SEQUENCES,
    MIN_HEAD_DIM,
    check_index,
    check_is_tensor,
    check_same_device,
    resolve_impl,
)
from kernels.attention.reference import varlen_attention_ref

try:  # triton is a Linux-only dependency; the reference path works without it
    from kernels.attention import fused as _fused
except ImportError:  # pragma: no cover - depends on the platform
    _fused = None

__all__ = ["varlen_attention", "varlen_attention_qkvpacked", "varlen_attention_ref"]

_OP = "varlen_attention"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_metadata(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen, scale) -> None:
    """Checks that need no device sync (always run)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_is_tensor(_OP, name, t)
        if t.dim() != 3:
            raise ValueError(f"{_OP}: {name} must be [T, H, Dh], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{_OP}: {name} must be floating point, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{_OP}: {name} shape {tuple(t.shape)} != q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{_OP}: {name} dtype {t.dtype} != q dtype {q.dtype}")
        check_same_device(_OP, name, t, "q", q)
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{_OP}: q/k/v head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}"
        )
    check_index(_OP, "cu_seqlens", cu_seqlens, torch.int32, "[S+1]", "q", q)
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{_OP}: cu_seqlens must hold S+1 >= 1 offsets, got none")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{_OP}: max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{_OP}: scale must be None or a float, got {scale!r}")


def _check_values(cu_seqlens: Tensor, total: int, max_seqlen: int) -> None:
    """Checks on cu_seqlens values: one host sync on CUDA."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    if lengths.numel() == 0:
        lengths = cu.new_zeros(1)
    first, last, min_len, max_len = torch.stack((cu[0], cu[-1], lengths.min(), lengths.max())).tolist()
    if first != 0:
        raise ValueError(f"{_OP}: cu_seqlens must start at 0, got {first}")
    if min_len < 0:
        raise ValueError(f"{_OP}: cu_seqlens must be non-decreasing")
    if last != total:
        raise ValueError(f"{_OP}: cu_seqlens must end at T={total}, got {last}")
    if max_len > max_seqlen:
        raise ValueError(f"{_OP}: max_seqlen={max_seqlen} < longest sequence length {max_len}")


def _check_triton_support(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> None:
    """Limits of the Triton path beyond the op's own checks (no device sync)."""
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"{_OP}: impl='triton' supports q dtypes {_TRITON_DTYPES}, got {q.dtype}")
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise ValueError(f"{_OP}: impl='triton' with bfloat16 q needs CUDA (the Triton interpreter has no bfloat16)")
    if cu_seqlens.numel() - 1 > MAX_SEQUENCES:
        raise ValueError(f"{_OP}: cu_seqlens holds {cu_seqlens.numel() - 1} sequences; "
                         f"impl='triton' supports at most {MAX_SEQUENCES}")
    if not _fused.offsets_fit_int32(max_seqlen, q, k, v):
        raise ValueError(f"{_OP}: max_seqlen={max_seqlen} x the q/k/v row stride passes 2^31 elements; "
                         "impl='triton' computes in-sequence offsets in int32")


def _check(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen, scale, impl: str,
           validate: bool) -> tuple[str, float]:
    """Every check of both entry points, once; returns (the path, the scale as a float)."""
    _check_metadata(q, k, v, cu_seqlens, max_seqlen, scale)
    path = resolve_impl(impl, q.device, _OP)
    if validate:
        _check_values(cu_seqlens, q.shape[0], max_seqlen)
    if path == "triton":
        _check_triton_support(q, k, v, cu_seqlens, max_seqlen)
    return path, float(q.shape[-1] ** -0.5 if scale is None else scale)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float | None = None,
    impl: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Softmax attention within each packed sequence (non-causal).

    q, k, v:    [T, H, Dh] packed tokens; may be strided views (e.g. qkv.unbind(1)), no copy.
    cu_seqlens: int32 [S+1], starts at 0, non-decreasing, ends at T; empty sequences allowed.
    max_seqlen: Python int >= the longest sequence (sizes the Triton grid / the padded batch).
    scale:      softmax scale, default Dh ** -0.5.
    impl:       "auto" (Triton on CUDA, reference elsewhere) | "triton" | "reference".
    validate:   check cu_seqlens values (a host sync on CUDA); metadata is always checked.
    Returns [T, H, Dh] contiguous, dtype of q; differentiable w.r.t. q, k, v.
    """
    path, scale = _check(q, k, v, cu_seqlens, max_seqlen, scale, impl, validate)
    if path == "reference":
        return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale)
    return _fused.varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale)


def varlen_attention_qkvpacked(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float | None = None,
    impl: str = "auto",
    validate: bool = True,
) -> Tensor:
    """varlen_attention on a fused projection. qkv: [T, 3, H, Dh] -> [T, H, Dh]; no copy of qkv."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__
        raise ValueError(f"{_OP}: qkv must be [T, 3, H, Dh], got {shape}")
    q, k, v = qkv.unbind(1)
    path, scale = _check(q, k, v, cu_seqlens, max_seqlen, scale, impl, validate)
    if path == "reference":
        return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale)
    # the packed op, whose backward writes one dqkv buffer
    return _fused.varlen_attention_qkvpacked_triton(qkv, cu_seqlens, max_seqlen, scale)
