"""Triton FlashAttention-2 over packed sequences (cu_seqlens), forward and backward.

Layout: q, k, v, o, do: [T, H, Dh] read through their strides (qkv.unbind(1) views work, no copy).
LSE and delta: fp32 [H, T]. The LSE is kept in base 2 (log2 of the sum of exp2 of the
log2(e)-scaled scores) so the backward recomputes P = exp2(s * qk_scale - lse) with no conversion.

Grid of every per-block kernel: (cdiv(max_seqlen, BLOCK), H, S); a program reads its
sequence bounds from cu_seqlens and returns at once when its block lies past the sequence end. The
work-list grid (opt-in: WORK_LIST_MAX_SEQUENCES) lays the sequences' blocks back to back instead.
Offsets inside a sequence (row x row stride, column x column stride) are int32; only the base pointers
(sequence start, head) are int64. The entry points refuse max_seqlen x row stride past 2^31 elements.
The backward is deterministic: dk/dv per key block loop over the sequence's query blocks, dq per
query block loops over key blocks; no atomics.

Inputs are checked by ``kernels.attention`` (head dims, at most MAX_SEQUENCES sequences, dtypes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._common import cdiv, device_guard, interpreting, launch_directly, new_output, next_power_of_2
from kernels.attention import tiles

_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_key_block(
    acc, l_i, m_i, q, k_base, v_base, start_n, seqlen, qk_scale,
    offs_n, offs_d, mask_d, stride_kt, stride_kd, stride_vt, stride_vd,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block of the online softmax. Only the sequence's last, partial key block is MASKED; full
    blocks load and score without bounds checks. The scale goes into the exp2 argument (one FMA a score),
    so raw scores are never rescaled on their own."""
    cols = start_n + offs_n
    if MASKED:
        mask_n = cols < seqlen
        kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # [BD, BN]
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BN, BD]
    else:
        kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd, mask=mask_d[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=mask_d[None, :], other=0.0)
    s = tl.dot(q, kT, input_precision=DOT_PRECISION)  # [BM, BN] raw scores
    if MASKED:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    # running max in the log2 domain; a block always holds a valid key, so m_new is finite from the start
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _program_block(CU_SEQLENS, nseq, BLOCK: tl.constexpr, WORK_LIST: tl.constexpr, S_BLOCK: tl.constexpr):
    """(sequence, block index within it) of this program; sequence == nseq: nothing to do.

    Dense grid (blocks of the longest sequence, H, S): program_id(0) and (2). Work-list grid (bound, H, 1):
    sequence s owns cdiv(len_s, BLOCK) consecutive programs, in sequence order; the program finds its sequence
    from the running sum of those counts over cu_seqlens (one [S_BLOCK] vector, S_BLOCK >= nseq). Programs past
    the last block get nseq. Empty sequences own no program."""
    if WORK_LIST:
        pid = tl.program_id(0)
        idx = tl.arange(0, S_BLOCK)
        live = idx < nseq
        lo = tl.load(CU_SEQLENS + idx, mask=live, other=0)
        hi = tl.load(CU_SEQLENS + idx + 1, mask=live, other=0)
        blocks = (hi - lo + BLOCK - 1) // BLOCK
        ends = tl.cumsum(blocks, 0)  # programs owned by sequences 0..s
        i_s = tl.sum((live & (ends <= pid)).to(tl.int32), 0)  # sequences wholly before this program
        first = tl.sum(tl.where(idx == i_s, ends - blocks, 0), 0)  # the sequence's first program
        return i_s, pid - first
    else:
        return tl.program_id(2), tl.program_id(0)


@triton.jit(do_not_specialize=["nseq"])  # one compile for every batch size
def _varlen_attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    nseq,  # sequences (read by the work-list grid only)
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain, so exp2 below
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh,  # O is allocated contiguous: unit stride over Dh
    stride_lh,  # LSE [H, T]
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WORK_LIST: tl.constexpr,  # grid (work list, H, 1), else (query blocks of the longest sequence, H, S)
    S_BLOCK: tl.constexpr,
):
    i_s, i_m = _program_block(CU_SEQLENS, nseq, BLOCK_M, WORK_LIST, S_BLOCK)
    if i_s >= nseq:  # past the work list's last block
        return
    i_h = tl.program_id(1).to(tl.int64)
    bos32 = tl.load(CU_SEQLENS + i_s)
    seqlen = tl.load(CU_SEQLENS + i_s + 1) - bos32  # int32, as every in-sequence offset below
    bos = bos32.to(tl.int64)  # base pointers in int64
    start_m = i_m * BLOCK_M
    if start_m >= seqlen:  # query block past the end of a short sequence
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < HEAD_DIM  # Dh padded to a power of 2

    q_ptrs = Q + bos * stride_qt + i_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BM, BD]
    k_base = K + bos * stride_kt + i_h * stride_kh
    v_base = V + bos * stride_vt + i_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = (seqlen // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, k_base, v_base, start_n, seqlen, qk_scale,
                                       offs_n, offs_d, mask_d, stride_kt, stride_kd, stride_vt, stride_vd,
                                       MASKED=False, DOT_PRECISION=DOT_PRECISION)
    if full_end < seqlen:
        acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, k_base, v_base, full_end, seqlen, qk_scale,
                                       offs_n, offs_d, mask_d, stride_kt, stride_kd, stride_vt, stride_vd,
                                       MASKED=True, DOT_PRECISION=DOT_PRECISION)

    acc = acc / l_i[:, None]
    o_ptrs = O + bos * stride_ot + i_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + i_h * stride_lh + bos + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _varlen_attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    T,
    stride_ot, stride_oh, stride_od,
    stride_dot, stride_doh, stride_dod,
    stride_delta_h,  # DELTA [H, T]
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # delta[h, t] = sum_d dO[t, h, d] * O[t, h, d], in fp32
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    offs_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + offs_t[:, None] * stride_ot + i_h * stride_oh + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs_t[:, None] * stride_dot + i_h * stride_doh + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + i_h * stride_delta_h + offs_t, tl.sum(o * do, 1), mask=offs_t < T)


@triton.jit
def _bwd_block(
    k, v, q_base, do_base, lse_base, delta_base, offs_m, mask_m, mask_n, offs_d, mask_d,
    stride_qt, stride_qd, stride_dot, stride_dod, qk_scale, DOT_PRECISION: tl.constexpr,
):
    """One (key block, query block) of the backward, shared by the dk/dv and the sequence kernels: loads the
    query block's q (transposed), dO, L and delta and recomputes P; returns (qT [BD, BM], dO [BM, BD],
    P^T [BN, BM], dS^T [BN, BM]) with dS = P * (dP - delta)."""
    qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                 mask=mask_m[None, :] & mask_d[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    lse = tl.load(lse_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
    sT = tl.dot(k, qT, input_precision=DOT_PRECISION)  # [BN, BM] raw scores; the scale goes into exp2's FMA
    # padded rows/columns -> exp2(-inf) = 0: a padded key row (k = 0) would otherwise give
    # exp2(0 - lse), which overflows for lse < -128
    pT = tl.exp2(tl.where(mask_n[:, None] & mask_m[None, :], sT * qk_scale - lse[None, :], float("-inf")))
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN, BM]
    return qT, do, pT, pT * (dpT - delta[None, :])


@triton.jit(do_not_specialize=["nseq"])  # one compile for every batch size
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    nseq,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh, stride_dkd,
    stride_dvt, stride_dvh, stride_dvd,
    stride_lh,  # LSE and DELTA [H, T]
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WORK_LIST: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    # one key block of one (head, sequence); loops over all of the sequence's query blocks
    i_s, i_n = _program_block(CU_SEQLENS, nseq, BLOCK_N, WORK_LIST, S_BLOCK)
    if i_s >= nseq:  # past the work list's last block
        return
    i_h = tl.program_id(1).to(tl.int64)
    bos32 = tl.load(CU_SEQLENS + i_s)
    seqlen = tl.load(CU_SEQLENS + i_s + 1) - bos32  # int32 in-sequence offsets; int64 base pointers
    bos = bos32.to(tl.int64)
    start_n = i_n * BLOCK_N
    if start_n >= seqlen:
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]

    k = tl.load(K + bos * stride_kt + i_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=mask_nd, other=0.0)  # [BN, BD]
    v = tl.load(V + bos * stride_vt + i_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=mask_nd, other=0.0)  # [BN, BD]
    q_base = Q + bos * stride_qt + i_h * stride_qh
    do_base = DO + bos * stride_dot + i_h * stride_doh
    lse_base = LSE + i_h * stride_lh + bos
    delta_base = DELTA + i_h * stride_lh + bos

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < seqlen
        qT, do, pT, dsT = _bwd_block(k, v, q_base, do_base, lse_base, delta_base, offs_m, mask_m, mask_n, offs_d,
                                     mask_d, stride_qt, stride_qd, stride_dot, stride_dod, qk_scale, DOT_PRECISION)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)

    dk *= sm_scale
    tl.store(DK + bos * stride_dkt + i_h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + bos * stride_dvt + i_h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit(do_not_specialize=["nseq"])  # one compile for every batch size
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    nseq,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh, stride_dqd,
    stride_lh,  # LSE and DELTA [H, T]
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WORK_LIST: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    # one query block of one (head, sequence); loops over all of the sequence's key blocks
    i_s, i_m = _program_block(CU_SEQLENS, nseq, BLOCK_M, WORK_LIST, S_BLOCK)
    if i_s >= nseq:  # past the work list's last block
        return
    i_h = tl.program_id(1).to(tl.int64)
    bos32 = tl.load(CU_SEQLENS + i_s)
    seqlen = tl.load(CU_SEQLENS + i_s + 1) - bos32  # int32 in-sequence offsets; int64 base pointers
    bos = bos32.to(tl.int64)
    start_m = i_m * BLOCK_M
    if start_m >= seqlen:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + bos * stride_qt + i_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)  # [BM, BD]
    do = tl.load(DO + bos * stride_dot + i_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=mask_md, other=0.0)  # [BM, BD]
    lse = tl.load(LSE + i_h * stride_lh + bos + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + i_h * stride_lh + bos + offs_m, mask=mask_m, other=0.0)
    k_base = K + bos * stride_kt + i_h * stride_kh
    v_base = V + bos * stride_vt + i_h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n0
        mask_n = cols < seqlen
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=mask_dn, other=0.0)  # [BD, BN]
        vT = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None] * stride_vd,
                     mask=mask_dn, other=0.0)  # [BD, BN]
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
        # padded key columns -> exp2(-inf) = 0; exp2(0 - lse) would overflow for lse < -128
        p = tl.exp2(tl.where(mask_n[None, :], s - lse[:, None], float("-inf")))
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)

    dq *= sm_scale
    tl.store(DQ + bos * stride_dqt + i_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _varlen_attn_bwd_seq_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, DQ_ACC, CU_SEQLENS,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh, stride_dkd,
    stride_dvt, stride_dvh, stride_dvd,
    stride_dqt, stride_dqh, stride_dqd,
    stride_at, stride_ah,  # DQ_ACC fp32 [T, H, BLOCK_D], contiguous
    stride_lh,  # LSE and DELTA [H, T]
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (head, sequence): the whole backward of the sequence. For each key block, one pass
    # over the query blocks recomputes P once and gives dk and dv (kept in registers) and this key block's
    # share of dq, added to the query rows' fp32 partial sums in DQ_ACC. Only this program touches those
    # rows, so no atomics, and the sums run in a fixed order: deterministic. The last key block adds its
    # share and writes dq itself (x sm_scale, in DQ's dtype); a sequence of one key block never reads DQ_ACC.
    i_h = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    bos32 = tl.load(CU_SEQLENS + i_s)
    seqlen = tl.load(CU_SEQLENS + i_s + 1) - bos32  # int32 in-sequence offsets; int64 base pointers
    bos = bos32.to(tl.int64)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_base = Q + bos * stride_qt + i_h * stride_qh
    do_base = DO + bos * stride_dot + i_h * stride_doh
    lse_base = LSE + i_h * stride_lh + bos
    delta_base = DELTA + i_h * stride_lh + bos
    acc_base = DQ_ACC + bos * stride_at + i_h * stride_ah
    dq_base = DQ + bos * stride_dqt + i_h * stride_dqh
    k_base = K + bos * stride_kt + i_h * stride_kh
    v_base = V + bos * stride_vt + i_h * stride_vh
    dk_base = DK + bos * stride_dkt + i_h * stride_dkh
    dv_base = DV + bos * stride_dvt + i_h * stride_dvh
    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < seqlen
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
        first = start_n == 0
        last = start_n + BLOCK_N >= seqlen
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, seqlen, BLOCK_M):
            offs_m = start_m + offs_m0
            mask_m = offs_m < seqlen
            mask_md = mask_m[:, None] & mask_d[None, :]
            qT, do, pT, dsT = _bwd_block(k, v, q_base, do_base, lse_base, delta_base, offs_m, mask_m, mask_n, offs_d,
                                         mask_d, stride_qt, stride_qd, stride_dot, stride_dod, qk_scale, DOT_PRECISION)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PRECISION)  # [BM, BD], this key block's share
            acc_ptrs = acc_base + offs_m[:, None] * stride_at + offs_d[None, :]
            if not first:
                dq += tl.load(acc_ptrs, mask=mask_md, other=0.0)
            if last:
                tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
                         (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_md)
            else:
                tl.store(acc_ptrs, dq, mask=mask_md)
        tl.debug_barrier()  # this key block's partial dq rows are visible to every thread before the next reads them
        dk *= sm_scale
        tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
                 mask=mask_nd)
        tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
                 mask=mask_nd)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


_INT32_MAX = 2**31 - 1


def offsets_fit_int32(max_seqlen: int, *tensors: Tensor) -> bool:
    """Whether every in-sequence offset (row x row stride + column x column stride, in elements) of these
    [T, H, Dh] tensors fits int32, as the kernels compute them; base pointers (sequence start, head) are int64."""
    return all(max_seqlen * abs(t.stride(0)) + t.shape[2] * abs(t.stride(2)) <= _INT32_MAX for t in tensors)


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))  # tl.dot needs every dim >= 16


def _config(kind: str, block_d: int, dtype: torch.dtype) -> dict:
    """Launch kwargs of one kernel ("fwd" | "dkdv" | "dq"): the tile table of tiles.py."""
    if interpreting():
        # numpy executes each program: few, mid-sized tiles keep the test suite fast
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    return tiles.tile(kind, block_d, dtype).kwargs()


# The work-list grid runs when there are at most this many sequences; 0 (the default) keeps the grid
# (blocks of the longest sequence, H, S), whose programs past a short sequence's end return at once. Each program
# reads cu_seqlens as one vector of next_power_of_2(S) entries, so keep this to a few thousand. Not yet run on a
# GPU: bench/test_attention.py times it (impl "triton_worklist") beside the default so a GPU session can decide.
WORK_LIST_MAX_SEQUENCES = 0


def _grid(block: int, heads: int, nseq: int, total: int, max_seqlen: int) -> tuple[tuple[int, int, int], dict]:
    """Grid and its constexprs for a per-block kernel over `block`-row tiles of every sequence.

    Work list: program_id(0) walks the sequences' blocks back to back (_program_block), so a short sequence costs
    only its own blocks. The exact count, sum of cdiv(len_s, block), lives on the device; the host bounds it by
    what it knows without a sync: cdiv(len_s, block) <= (len_s + block - 1) / block summed over the sequences,
    and never above the dense grid's count. Past the exact count a program returns at once."""
    dense = cdiv(max_seqlen, block) * nseq
    if 0 < nseq <= WORK_LIST_MAX_SEQUENCES:
        bound = min(dense, (total + nseq * (block - 1)) // block)
        return (bound, heads, 1), dict(WORK_LIST=True, S_BLOCK=max(16, next_power_of_2(nseq)))
    return (cdiv(max_seqlen, block), heads, nseq), dict(WORK_LIST=False, S_BLOCK=1)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: true fp32 products, not TF32 (fp16/bf16 ignore this)
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def varlen_attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                    scale: float) -> tuple[Tensor, Tensor]:
    """q, k, v [T, H, Dh] (any strides, Dh's included) -> (o [T, H, Dh] contiguous, lse fp32 [H, T], base 2)."""
    total, heads, head_dim = q.shape
    nseq = cu_seqlens.numel() - 1
    o = new_output((total, heads, head_dim), q.dtype, q.device)
    lse = new_output((heads, total), torch.float32, q.device)
    if total == 0 or nseq == 0 or max_seqlen == 0:
        return o, lse
    block_d = _block_d(head_dim)
    cfg = _config("fwd", block_d, q.dtype)
    grid, work = _grid(cfg["BLOCK_M"], heads, nseq, total, max_seqlen)
    with device_guard(q.device):
        _varlen_attn_fwd_kernel[grid](
            q, k, v, o, lse, cu_seqlens, nseq,
            scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(),
            o.stride(0), o.stride(1),
            lse.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype), **cfg, **work,
        )
    return o, lse


def varlen_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                    cu_seqlens: Tensor, max_seqlen: int, scale: float,
                    dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """Writes dq, dk, dv ([T, H, Dh], any strides, preallocated) from do [T, H, Dh] and lse [H, T]."""
    total, heads, head_dim = q.shape
    nseq = cu_seqlens.numel() - 1
    if total == 0 or nseq == 0 or max_seqlen == 0:  # nothing to attend (T == 0 when inputs are valid)
        for g in (dq, dk, dv):
            g.zero_()
        return
    with device_guard(q.device):
        _launch_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv)


# The one-program-per-(sequence, head) backward (_varlen_attn_bwd_seq_kernel) runs when max_seqlen is at most
# this; 0 (the default) keeps the measured two-kernel backward (dk/dv, then dq) everywhere. The single kernel
# recomputes P once instead of twice, but it has not run on a GPU yet: bench/test_attention.py times it
# (impl "triton_seqbwd", at 512) beside the default so a GPU session can decide.
SEQ_BWD_MAX_SEQLEN = 0


def _launch_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv) -> None:
    total, heads, head_dim = q.shape
    nseq = cu_seqlens.numel() - 1
    if not offsets_fit_int32(max_seqlen, do, dq, dk, dv):
        raise ValueError(f"varlen_attention: max_seqlen={max_seqlen} x the row stride of do/dq/dk/dv passes 2^31 "
                         "elements; the kernels' in-sequence offsets are int32")
    block_d = _block_d(head_dim)
    delta = new_output((heads, total), torch.float32, q.device)  # rowsum(dO * O)
    block_t = 64
    _varlen_attn_bwd_preprocess_kernel[(cdiv(total, block_t), heads)](
        o, do, delta, total, *o.stride(), *do.stride(), delta.stride(0),
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    if max_seqlen <= SEQ_BWD_MAX_SEQLEN:
        cfg = _config("dkdv", block_d, q.dtype)
        # fp32 partial dq rows of sequences longer than one key block (never read for the others)
        dq_acc = new_output((total if max_seqlen > cfg["BLOCK_N"] else 1, heads, block_d), torch.float32, q.device)
        _varlen_attn_bwd_seq_kernel[(heads, nseq)](
            q, k, v, do, lse, delta, dk, dv, dq, dq_acc, cu_seqlens,
            scale * _LOG2E, scale,
            *strides, *dk.stride(), *dv.stride(), *dq.stride(), dq_acc.stride(0), dq_acc.stride(1), lse.stride(0),
            **common, **cfg,
        )
        return
    cfg = _config("dkdv", block_d, q.dtype)
    grid, work = _grid(cfg["BLOCK_N"], heads, nseq, total, max_seqlen)
    _varlen_attn_bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, nseq,
        scale * _LOG2E, scale,
        *strides, *dk.stride(), *dv.stride(), lse.stride(0),
        **common, **cfg, **work,
    )
    cfg = _config("dq", block_d, q.dtype)
    grid, work = _grid(cfg["BLOCK_M"], heads, nseq, total, max_seqlen)
    _varlen_attn_bwd_dq_kernel[grid](
        q, k, v, do, lse, delta, dq, cu_seqlens, nseq,
        scale * _LOG2E, scale,
        *strides, *dq.stride(), lse.stride(0),
        **common, **cfg, **work,
    )


# ---------------------------------------------------------------------------------------------
# torch custom ops (opaque to torch.compile, with fake impls and an autograd formula)
# ---------------------------------------------------------------------------------------------
# torch.library.custom_op + register_autograd plays the role of a torch.autograd.Function here:
# the backward is itself a custom op, so AOTAutograd traces forward and backward without a graph
# break. max_seqlen is a Python int in the schema.


@torch.library.custom_op("ajepa::varlen_attn_fwd", mutates_args=())
def _varlen_attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                        scale: float) -> tuple[Tensor, Tensor]:
    return varlen_attn_fwd(q, k, v, cu_seqlens, max_seqlen, scale)


@_varlen_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    total, heads, head_dim = q.shape
    return (q.new_empty((total, heads, head_dim)),
            q.new_empty((heads, total), dtype=torch.float32))


def _attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu_seqlens: Tensor,
              max_seqlen: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = (new_output(q.shape, q.dtype, q.device) for _ in range(3))
    varlen_attn_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv)
    return dq, dk, dv


@torch.library.custom_op("ajepa::varlen_attn_bwd", mutates_args=())
def _varlen_attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        cu_seqlens: Tensor, max_seqlen: int,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _attn_bwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale)


@_varlen_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    bwd = _attn_bwd if launch_directly(do, q, k, v) else _varlen_attn_bwd_op
    dq, dk, dv = bwd(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_attn_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op("ajepa::varlen_attn_qkvpacked_fwd", mutates_args=())
def _varlen_attn_qkvpacked_fwd_op(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                  scale: float) -> tuple[Tensor, Tensor]:
    return varlen_attn_fwd(*qkv.unbind(1), cu_seqlens, max_seqlen, scale)


@_varlen_attn_qkvpacked_fwd_op.register_fake
def _(qkv, cu_seqlens, max_seqlen, scale):
    total, _, heads, head_dim = qkv.shape
    return (qkv.new_empty((total, heads, head_dim)),
            qkv.new_empty((heads, total), dtype=torch.float32))


def _attn_qkvpacked_bwd(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                        scale: float) -> Tensor:
    # writes dq, dk, dv straight into one [T, 3, H, Dh] buffer: no stack/cat copy in backward
    dqkv = new_output(qkv.shape, qkv.dtype, qkv.device)
    varlen_attn_bwd(do, *qkv.unbind(1), o, lse, cu_seqlens, max_seqlen, scale, *dqkv.unbind(1))
    return dqkv


@torch.library.custom_op("ajepa::varlen_attn_qkvpacked_bwd", mutates_args=())
def _varlen_attn_qkvpacked_bwd_op(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor,
                                  cu_seqlens: Tensor, max_seqlen: int, scale: float) -> Tensor:
    return _attn_qkvpacked_bwd(do, qkv, o, lse, cu_seqlens, max_seqlen, scale)


@_varlen_attn_qkvpacked_bwd_op.register_fake
def _(do, qkv, o, lse, cu_seqlens, max_seqlen, scale):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.mark_non_differentiable(lse)


def _packed_backward(ctx, do, _dlse):
    qkv, o, lse, cu_seqlens = ctx.saved_tensors
    bwd = _attn_qkvpacked_bwd if launch_directly(do, qkv) else _varlen_attn_qkvpacked_bwd_op
    dqkv = bwd(do, qkv, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dqkv, None, None, None


_varlen_attn_qkvpacked_fwd_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


class _AttnFn(torch.autograd.Function):
    """The eager twin of _varlen_attn_fwd_op: the same launchers, setup and backward, no op dispatch."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        out = varlen_attn_fwd(q, k, v, cu_seqlens, max_seqlen, scale)
        _fwd_setup_context(ctx, (q, k, v, cu_seqlens, max_seqlen, scale), out)
        return out

    backward = staticmethod(_fwd_backward)


class _PackedAttnFn(torch.autograd.Function):
    """The eager twin of _varlen_attn_qkvpacked_fwd_op."""

    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, scale):
        out = varlen_attn_fwd(*qkv.unbind(1), cu_seqlens, max_seqlen, scale)
        _packed_setup_context(ctx, (qkv, cu_seqlens, max_seqlen, scale), out)
        return out

    backward = staticmethod(_packed_backward)


# ---------------------------------------------------------------------------------------------
# functional entry points (inputs already checked by kernels.attention)
# ---------------------------------------------------------------------------------------------


def varlen_attention_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                            scale: float | None = None) -> Tensor:
    """Triton varlen attention. q, k, v [T, H, Dh] (strided), cu_seqlens int32 [S+1] -> [T, H, Dh]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fn = _AttnFn.apply if launch_directly(q, k, v, cu_seqlens) else _varlen_attn_fwd_op
    return fn(q, k, v, cu_seqlens, int(max_seqlen), float(scale))[0]


def varlen_attention_qkvpacked_triton(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                      scale: float | None = None) -> Tensor:
    """Triton varlen attention on fused qkv [T, 3, H, Dh] -> [T, H, Dh]; dqkv comes back as one buffer."""
    scale = qkv.shape[-1] ** -0.5 if scale is None else scale
    fn = _PackedAttnFn.apply if launch_directly(qkv, cu_seqlens) else _varlen_attn_qkvpacked_fwd_op
    return fn(qkv, cu_seqlens, int(max_seqlen), float(scale))[0]


__all__ = [
    "varlen_attention_qkvpacked_triton",
    "varlen_attention_triton",
    "varlen_attn_bwd",
    "varlen_attn_fwd",
]
