"""Reference varlen attention: pad, masked F.scaled_dot_product_attention, unpack.

Fully vectorized (no Python loop over sequences) and differentiable by autograd.
Inputs are assumed checked by ``kernels.attention.varlen_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_layout(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token sequence id and position, and per-sequence lengths.

    cu_seqlens: int32 [S+1]. Returns (seq_id int64 [T], pos int64 [T], lengths int64 [S]).
    No host sync: searchsorted instead of repeat_interleave with data-dependent size.
    """
    cu = cu_seqlens.long()
    tok = torch.arange(total, device=cu.device)
    # token t belongs to the sequence s with cu[s] <= t < cu[s+1]; empty sequences are skipped
    seq_id = torch.searchsorted(cu[1:], tok, right=True)
    pos = tok - cu[seq_id]
    return seq_id, pos, cu[1:] - cu[:-1]


def varlen_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float | None = None,
) -> Tensor:
    """Non-causal attention within each packed sequence.

    q, k, v: [T, H, Dh] (any strides); cu_seqlens: int32 [S+1]; max_seqlen >= longest sequence.
    Returns [T, H, Dh] contiguous, dtype of q.
    """
    total, heads, head_dim = q.shape
    nseq = cu_seqlens.numel() - 1
    if total == 0 or nseq == 0:
        # nothing to attend; keep the graph so backward returns zeros of the right shape
        return (q + k + v).mul(0).contiguous()
    length = max(int(max_seqlen), 1)
    seq_id, pos, lengths = token_layout(cu_seqlens, total)

    def pad(x: Tensor) -> Tensor:  # [T, H, Dh] -> [S, H, L, Dh], zeros in the padding
        buf = x.new_zeros(nseq, length, heads, head_dim)
        return buf.index_put((seq_id, pos), x).transpose(1, 2)

    key_pos = torch.arange(length, device=q.device)
    # [S, 1, 1, L], True = may attend. An empty sequence would have a fully masked row (NaN
    # softmax); let it attend to its zero padding instead: its rows are never unpacked.
    allowed = (key_pos[None, :] < lengths[:, None]) | (lengths[:, None] == 0)
    out = F.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=allowed[:, None, None, :], scale=scale
    )  # [S, H, L, Dh]
    return out.transpose(1, 2)[seq_id, pos]  # [T, H, Dh], advanced indexing -> contiguous
