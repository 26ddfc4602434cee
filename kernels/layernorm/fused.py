"""Triton layer norm over the last dim: optional residual add in front, fp32 statistics, Triton backward.

Layout: kernels, then launchers (strides, tiles, allocation), then the torch custom ops (opaque to
torch.compile, with fake impls and an autograd formula), then the functional entry point. Inputs are
checked by ``kernels.layernorm``.

Forward: a program normalizes BLOCK_M whole rows (BLOCK_D >= D), two-pass variance as F.layer_norm,
and saves mean and rstd (fp32, one of each per row). With a residual it first forms s = x + residual,
rounds it to the residual's dtype, stores it (the new residual stream) and normalizes that stored value.

Backward, deterministic and without atomics: P programs (``reduction_programs``) each take a fixed run
of row tiles, write dx for their rows and keep their share of dweight / dbias in fp32 registers; the P
partial rows are then summed by one fixed-shape torch reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._common import cdiv, device_guard, launch_directly, new_output, next_power_of_2, reduction_programs


@triton.jit
def _layer_norm_fwd_kernel(
    x,  # [M, D] any strides
    res,  # [M, D] any strides; unused unless HAS_RES
    w,  # [D] contiguous; unused unless HAS_W
    b,  # [D] contiguous; unused unless HAS_B
    y,  # [M, D] contiguous, x.dtype
    s,  # [M, D] contiguous, res.dtype: x + res; unused unless HAS_RES
    mean_out,  # fp32 [M]
    rstd_out,  # fp32 [M]
    M,
    D,
    stride_xm,
    stride_xd,
    stride_rm,
    stride_rd,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= D: whole rows
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    h = tl.load(x + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res + rows[:, None] * stride_rm + cols[None, :] * stride_rd, mask=mask, other=0.0)
        hs = (h + r.to(tl.float32)).to(s.dtype.element_ty)  # the residual stream, rounded once
        tl.store(s + rows[:, None] * D + cols[None, :], hs, mask=mask)
        h = hs.to(tl.float32)  # normalize exactly what the next block adds to
    mu = tl.sum(h, axis=1) / D
    diff = tl.where(mask, h - mu[:, None], 0.0)  # two-pass variance, as F.layer_norm
    var = tl.sum(diff * diff, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    out = diff * rstd[:, None]
    if HAS_W:
        out = out * tl.load(w + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        out = out + tl.load(b + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y + rows[:, None] * D + cols[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.store(mean_out + rows, mu, mask=row_ok)
    tl.store(rstd_out + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    dy,  # [M, D] any strides: gradient of y
    ds,  # [M, D] any strides: gradient of s (the new residual stream); unused unless HAS_DS
    xs,  # [M, D] any strides: what was normalized (x, or s with a residual)
    w,  # [D] contiguous; unused unless HAS_W
    mean_in,  # fp32 [M]
    rstd_in,  # fp32 [M]
    dx,  # [M, D] contiguous, dy.dtype
    dres,  # [M, D] contiguous, the residual's dtype; unused unless HAS_DRES
    dw_part,  # fp32 [P, D]: this program's share of dweight, written even when it has no rows
    db_part,  # fp32 [P, D]: the same for dbias
    M,
    D,
    stride_dym,
    stride_dyd,
    stride_dsm,
    stride_dsd,
    stride_xm,
    stride_xd,
    rows_per_program,  # a multiple of BLOCK_M
    HAS_DS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DRES: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    col_ok = cols < D
    if HAS_W:
        wv = tl.load(w + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first = pid * rows_per_program
    for start in range(0, rows_per_program, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        h = tl.load(xs + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy + rows[:, None] * stride_dym + cols[None, :] * stride_dyd, mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mean_in + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_in + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (h - mu[:, None]) * rstd[:, None], 0.0)
        wg = g * wv[None, :] if HAS_W else g
        c1 = tl.sum(xhat * wg, axis=1) / D
        c2 = tl.sum(wg, axis=1) / D
        grad = (wg - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:  # the residual stream's own gradient flows through the add
            grad += tl.load(ds + rows[:, None] * stride_dsm + cols[None, :] * stride_dsd, mask=mask,
                            other=0.0).to(tl.float32)
        tl.store(dx + rows[:, None] * D + cols[None, :], grad.to(dx.dtype.element_ty), mask=mask)
        if HAS_DRES:
            tl.store(dres + rows[:, None] * D + cols[None, :], grad.to(dres.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += g * xhat
        if NEED_DB:
            db_acc += g
    if NEED_DW:
        tl.store(dw_part + pid * D + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if NEED_DB:
        tl.store(db_part + pid * D + cols, tl.sum(db_acc, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _tiles(D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): whole rows, about 4096 elements a tile."""
    block_d = next_power_of_2(D)
    block_m = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_m * block_d < 4096 else min(16, block_m * block_d // 512)
    return block_m, block_d, num_warps


def _rows(t: Tensor, D: int) -> Tensor:
    """[..., D] as [M, D] (a view whenever strides allow; kernels read through strides)."""
    return t.reshape(-1, D)


def layer_norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [x.shape] x.dtype, s [x.shape] residual.dtype (empty [0] without residual), mean, rstd fp32 [M])."""
    D = x.shape[-1]
    x2 = _rows(x, D)
    M = x2.shape[0]
    y = new_output(x.shape, x.dtype, x.device)
    has_res = residual is not None
    s = new_output(x.shape, residual.dtype, x.device) if has_res else x.new_empty(0)
    mean = new_output((M,), torch.float32, x.device)
    rstd = new_output((M,), torch.float32, x.device)
    if M == 0:
        return y, s, mean, rstd
    r2 = _rows(residual, D) if has_res else x2
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    block_m, block_d, num_warps = _tiles(D)
    with device_guard(x.device):
        _layer_norm_fwd_kernel[(cdiv(M, block_m),)](
            x2, r2, w, b, y, s if has_res else y, mean, rstd,
            M, D, x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1), eps,
            HAS_RES=has_res, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return y, s, mean, rstd


def layer_norm_bwd(dy: Tensor, ds: Tensor | None, xs: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                   has_residual: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [xs.shape] dy.dtype, dres [xs.shape] xs.dtype when a residual's dtype differs from dy's (else
    empty [0]: dx is its gradient too), dweight fp32 [D] (empty [0] unless need_dw), dbias fp32 [D] (same))."""
    D = xs.shape[-1]
    x2, dy2 = _rows(xs, D), _rows(dy, D)
    M = x2.shape[0]
    dev = xs.device
    split_dres = has_residual and xs.dtype != dy.dtype
    dx = new_output(xs.shape, dy.dtype, dev)
    dres = new_output(xs.shape, xs.dtype, dev) if split_dres else xs.new_empty(0)
    if M == 0:
        return (dx, dres, torch.zeros(D if need_dw else 0, dtype=torch.float32, device=dev),
                torch.zeros(D if need_db else 0, dtype=torch.float32, device=dev))
    block_m, block_d, num_warps = _tiles(D)
    tiles = cdiv(M, block_m)
    per_program = cdiv(tiles, min(tiles, reduction_programs(dev)))
    programs = cdiv(tiles, per_program)  # every program gets at least one tile
    part_w = new_output((programs, D), torch.float32, dev) if need_dw else None
    part_b = new_output((programs, D), torch.float32, dev) if need_db else None
    has_ds = has_residual and ds is not None
    ds2 = _rows(ds, D) if has_ds else dy2
    with device_guard(dev):
        _layer_norm_bwd_kernel[(programs,)](
            dy2, ds2, x2, weight.contiguous() if weight is not None else x2, mean, rstd,
            dx, dres if split_dres else dx, part_w if need_dw else dx, part_b if need_db else dx,
            M, D, dy2.stride(0), dy2.stride(1), ds2.stride(0), ds2.stride(1), x2.stride(0), x2.stride(1),
            per_program * block_m,
            HAS_DS=has_ds, HAS_W=weight is not None, HAS_DRES=split_dres, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    # the partial rows summed in a fixed order: deterministic for a given device
    dw = part_w.sum(0) if need_dw else xs.new_empty(0, dtype=torch.float32)
    db = part_b.sum(0) if need_db else xs.new_empty(0, dtype=torch.float32)
    return dx, dres, dw, db


# ---------------------------------------------------------------------------------------------
# torch custom ops (opaque to torch.compile, with fake impls and an autograd formula)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("ajepa::layer_norm_fwd", mutates_args=())
def layer_norm_fwd_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_fwd(x, weight, bias, residual, eps)


@layer_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps):
    M = x.numel() // x.shape[-1]
    s = x.new_empty(x.shape, dtype=residual.dtype) if residual is not None else x.new_empty(0)
    return (x.new_empty(x.shape), s, x.new_empty((M,), dtype=torch.float32),
            x.new_empty((M,), dtype=torch.float32))


@torch.library.custom_op("ajepa::layer_norm_bwd", mutates_args=())
def layer_norm_bwd_op(dy: Tensor, ds: Tensor | None, xs: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                      has_residual: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_bwd(dy, ds, xs, weight, mean, rstd, has_residual, need_dw, need_db)


@layer_norm_bwd_op.register_fake
def _(dy, ds, xs, weight, mean, rstd, has_residual, need_dw, need_db):
    D = xs.shape[-1]
    split_dres = has_residual and xs.dtype != dy.dtype
    return (
        xs.new_empty(xs.shape, dtype=dy.dtype),
        xs.new_empty(xs.shape) if split_dres else xs.new_empty(0),
        xs.new_empty((D if need_dw else 0,), dtype=torch.float32),
        xs.new_empty((D if need_db else 0,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    y, s, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(s if ctx.has_residual else x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    if not ctx.has_residual:
        ctx.mark_non_differentiable(s)


def _backward(ctx, dy, ds, _dmean, _drstd):
    xs, weight, mean, rstd = ctx.saved_tensors
    need_dw = ctx.weight_dtype is not None and ctx.needs_input_grad[1]
    need_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    ds = ds if ctx.has_residual else None
    bwd = layer_norm_bwd if launch_directly(dy, ds, xs, weight) else layer_norm_bwd_op
    dx, dres, dw, db = bwd(dy, ds, xs, weight, mean, rstd, ctx.has_residual, need_dw, need_db)
    if ctx.has_residual:
        dres = dres if xs.dtype != dx.dtype else dx  # the add passes the same gradient to both inputs
    else:
        dres = None
    return (
        dx,
        dw.to(ctx.weight_dtype) if need_dw else None,
        db.to(ctx.bias_dtype) if need_db else None,
        dres,
        None,
    )


layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _LayerNormFn(torch.autograd.Function):
    """The eager twin of layer_norm_fwd_op: the same launchers, setup and backward, no op dispatch.
    (forward takes ctx itself: with a separate setup_context, every apply binds its arguments
    through inspect.signature, about 25 us of host time.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        out = layer_norm_fwd(x, weight, bias, residual, eps)
        _setup_context(ctx, (x, weight, bias, residual, eps), out)
        return out

    backward = staticmethod(_backward)


# ---------------------------------------------------------------------------------------------
# functional entry point (inputs already checked by kernels.layernorm)
# ---------------------------------------------------------------------------------------------


def layer_norm_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                      residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Triton layer norm: y (x.dtype), or (y, s = x + residual in residual.dtype) with a residual."""
    fn = _LayerNormFn.apply if launch_directly(x, weight, bias, residual) else layer_norm_fwd_op
    y, s, _, _ = fn(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, s)


__all__ = ["layer_norm_bwd", "layer_norm_fwd", "layer_norm_triton"]
