"""Triton masked gather: forward gather(+pos), deterministic scatter-add backward, gather+layer-norm.

Layout: kernels, then launchers (strides, tiles, allocation), then torch custom ops (opaque to
torch.compile, with fake impls and an autograd formula), then the functional ops. Inputs are
checked by ``kernels.gather``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._common import cdiv, device_guard, launch_directly, new_output, next_power_of_2


@triton.jit
def _masked_gather_fwd_kernel(
    x,  # [B, N_X, D] any strides (2-D x is passed as B = 1)
    index,  # int64 [T], flat rows of x
    pos,  # [N_POS, D] any strides; unused unless HAS_POS
    out,  # [T, D] contiguous
    T,
    D,
    N_X,
    N_POS,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_pn,
    stride_pd,
    HAS_POS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    # int64 offsets: B * N * D overflows int32 at real sizes
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < D)[None, :]
    idx = tl.load(index + rows, mask=row_ok, other=0)
    src = (idx // N_X) * stride_xb + (idx % N_X) * stride_xn  # [BLOCK_T]
    val = tl.load(x + src[:, None] + cols[None, :] * stride_xd, mask=mask)
    if HAS_POS:
        p = (idx % N_POS) * stride_pn
        val += tl.load(pos + p[:, None] + cols[None, :] * stride_pd, mask=mask)
    tl.store(out + rows[:, None] * D + cols[None, :], val, mask=mask)


@triton.jit
def _masked_gather_bwd_kernel(
    grad,  # [T, D] any strides: gradient of the gathered rows
    perm,  # int64 [T]: t sorted by destination row (stable, so t order within a row)
    rowptr,  # int64 [R + 1]: perm[rowptr[r]:rowptr[r+1]] land in row r
    out,  # SPLITS == 1: [R, D] contiguous, every row written (zeros where nothing lands)
    #       SPLITS > 1: fp32 [SPLITS, R, D] partial sums, summed afterwards in split order
    R,
    D,
    stride_gt,
    stride_gd,
    ACC_DTYPE: tl.constexpr,  # fp32, fp64 for fp64 gradients
    SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # A segmented sum, no atomics: deterministic, duplicates accumulate in a fixed order.
    # A program owns BLOCK_R destination rows x BLOCK_D columns, so each step of the loop loads
    # BLOCK_R independent gradient rows. Split s sums the s-th chunk of every row's segment:
    # long segments (e.g. the pos gradient, ~T / N entries a row) spread over SPLITS programs.
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = rows < R
    col_ok = cols < D
    start = tl.load(rowptr + rows, mask=row_ok, other=0)
    count = tl.load(rowptr + rows + 1, mask=row_ok, other=0) - start
    chunk = (count + SPLITS - 1) // SPLITS
    first = start + split * chunk  # this split's entries: [first, first + n)
    n = tl.minimum(chunk, tl.maximum(count - split * chunk, 0))
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC_DTYPE)
    for j in range(0, tl.max(n, axis=0)):
        live = j < n  # [BR]
        t = tl.load(perm + first + j, mask=live, other=0)
        g = tl.load(grad + t[:, None] * stride_gt + cols[None, :] * stride_gd,
                    mask=live[:, None] & col_ok[None, :], other=0.0)
        acc += g.to(ACC_DTYPE)
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLITS == 1:
        tl.store(out + rows[:, None] * D + cols[None, :], acc.to(out.dtype.element_ty), mask=mask)
    else:
        tl.store(out + (split * R + rows)[:, None] * D + cols[None, :], acc, mask=mask)


@triton.jit
def _gather_layer_norm_fwd_kernel(
    x,  # [B, N_X, D] any strides
    index,  # int64 [T]
    out,  # [T, D] contiguous, x.dtype
    T,
    D,
    N_X,
    stride_xb,
    stride_xn,
    stride_xd,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= D: a whole row per tile
):
    pid_t = tl.program_id(0).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < D)[None, :]
    idx = tl.load(index + rows, mask=row_ok, other=0)
    src = (idx // N_X) * stride_xb + (idx % N_X) * stride_xn
    v = tl.load(x + src[:, None] + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(v, axis=1) / D
    diff = tl.where(mask, v - mean[:, None], 0.0)  # two-pass variance, as F.layer_norm
    var = tl.sum(diff * diff, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = diff * rstd[:, None]
    tl.store(out + rows[:, None] * D + cols[None, :], y.to(out.dtype.element_ty), mask=mask)


def _x_as_3d(x: Tensor) -> tuple[int, int, int, int]:
    """(N_X, stride_b, stride_n, stride_d) so that row i of x is at (i // N_X) * sb + (i % N_X) * sn."""
    if x.dim() == 3:
        return x.shape[1], x.stride(0), x.stride(1), x.stride(2)
    return max(x.shape[0], 1), 0, x.stride(0), x.stride(1)


def _gather_fwd_launch(x: Tensor, index: Tensor, pos: Tensor | None, n_pos: int) -> Tensor:
    T, D = index.shape[0], x.shape[-1]
    out = new_output((T, D), x.dtype, x.device)
    if T == 0 or D == 0:
        return out
    index = index.contiguous()
    n_x, sxb, sxn, sxd = _x_as_3d(x)
    BLOCK_D = min(next_power_of_2(D), 1024)
    BLOCK_T = max(1, min(64, 4096 // BLOCK_D))
    grid = (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D))
    has_pos = pos is not None
    p = pos if has_pos else x
    with device_guard(x.device):
        _masked_gather_fwd_kernel[grid](
            x,
            index,
            p,
            out,
            T,
            D,
            n_x,
            n_pos,
            sxb,
            sxn,
            sxd,
            p.stride(0) if has_pos else 0,
            p.stride(1) if has_pos else 0,
            HAS_POS=has_pos,
            BLOCK_T=BLOCK_T,
            BLOCK_D=BLOCK_D,
            num_warps=4,
        )
    return out


def _bwd_splits(n_entries: int, n_rows: int) -> int:
    """Splits per segment from the mean segment length (host sizes only, no sync): about 8
    entries a split, at most 32 splits."""
    mean = n_entries / max(n_rows, 1)
    return int(min(32, max(1, math.ceil(mean / 8))))


def segments(keys: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """The backward's plan for destination rows `keys` [T] in [0, n_rows): (perm, rowptr), perm the
    entries t sorted by keys[t] (stable: t order within a row), rowptr [n_rows + 1] the segment
    bounds (perm[rowptr[r]:rowptr[r+1]] land in row r). On a CUDA tensor: three small launches."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(n_rows + 1, dtype=keys.dtype, device=keys.device)
    return perm, torch.searchsorted(sorted_keys, bounds)


def _gather_bwd_launch(grad: Tensor, perm: Tensor, rowptr: Tensor, n_rows: int) -> Tensor:
    """out[r] = sum of grad[perm[j]] for j in [rowptr[r], rowptr[r+1]), in that order: [n_rows, D]."""
    D = grad.shape[1]
    out = new_output((n_rows, D), grad.dtype, grad.device)
    if n_rows == 0 or D == 0:
        return out
    fp64 = grad.dtype == torch.float64  # fp64 sums stay fp64, in one split, half the tile
    BLOCK_D = min(next_power_of_2(D), 256)
    BLOCK_R = max(1, min(16, (2048 if fp64 else 4096) // BLOCK_D))
    splits = 1 if fp64 else _bwd_splits(perm.numel(), n_rows)
    # SPLITS > 1: fp32 partials, summed below in split order (a fixed-shape torch reduction)
    dst = out if splits == 1 else new_output((splits * n_rows, D), torch.float32, grad.device)
    grid = (cdiv(n_rows, BLOCK_R), cdiv(D, BLOCK_D), splits)
    with device_guard(grad.device):
        _masked_gather_bwd_kernel[grid](
            grad,
            perm,
            rowptr,
            dst,
            n_rows,
            D,
            grad.stride(0),
            grad.stride(1),
            ACC_DTYPE=tl.float64 if fp64 else tl.float32,
            SPLITS=splits,
            BLOCK_R=BLOCK_R,
            BLOCK_D=BLOCK_D,
            num_warps=4,
        )
    if splits > 1:
        out.copy_(dst.view(splits, n_rows, D).sum(0))
    return out


def _gather_layer_norm_launch(x: Tensor, index: Tensor, eps: float) -> Tensor:
    T, D = index.shape[0], x.shape[-1]
    out = new_output((T, D), x.dtype, x.device)
    if T == 0 or D == 0:
        return out
    index = index.contiguous()
    n_x, sxb, sxn, sxd = _x_as_3d(x)
    BLOCK_D = next_power_of_2(D)
    BLOCK_T = max(1, min(16, 4096 // BLOCK_D))
    grid = (cdiv(T, BLOCK_T),)
    with device_guard(x.device):
        _gather_layer_norm_fwd_kernel[grid](
            x,
            index,
            out,
            T,
            D,
            n_x,
            sxb,
            sxn,
            sxd,
            eps,
            BLOCK_T=BLOCK_T,
            BLOCK_D=BLOCK_D,
            num_warps=4 if BLOCK_D <= 2048 else 8,
        )
    return out


# Custom ops: opaque to torch.compile (no graph break), shapes given by the fake impls.
@torch.library.custom_op("ajepa::masked_gather_fwd", mutates_args=())
def masked_gather_fwd_op(x: Tensor, index: Tensor, pos: Tensor | None, n_pos: int, perm: Tensor | None,
                         rowptr: Tensor | None) -> Tensor:
    return _gather_fwd_launch(x, index, pos, n_pos)


@masked_gather_fwd_op.register_fake
def _(x, index, pos, n_pos, perm, rowptr):
    return x.new_empty((index.shape[0], x.shape[-1]))


@torch.library.custom_op("ajepa::masked_gather_bwd", mutates_args=())
def masked_gather_bwd_op(grad: Tensor, perm: Tensor, rowptr: Tensor, n_rows: int) -> Tensor:
    return _gather_bwd_launch(grad, perm, rowptr, n_rows)


@masked_gather_bwd_op.register_fake
def _(grad, perm, rowptr, n_rows):
    return grad.new_empty((n_rows, grad.shape[1]))


@torch.library.custom_op("ajepa::gather_layer_norm", mutates_args=())
def gather_layer_norm_op(x: Tensor, index: Tensor, eps: float) -> Tensor:
    return _gather_layer_norm_launch(x, index, eps)


@gather_layer_norm_op.register_fake
def _(x, index, eps):
    return x.new_empty((index.shape[0], x.shape[-1]))


def _gather_setup_context(ctx, inputs, output):
    x, index, pos, n_pos, perm, rowptr = inputs
    ctx.save_for_backward(index, perm, rowptr)
    ctx.x_shape, ctx.n_pos, ctx.has_pos = x.shape, n_pos, pos is not None


def _gather_backward(ctx, grad: Tensor):
    index, perm, rowptr = ctx.saved_tensors
    bwd = _gather_bwd_launch if launch_directly(grad, index, perm, rowptr) else masked_gather_bwd_op
    grad_x = grad_pos = None
    if ctx.needs_input_grad[0]:
        n_rows = math.prod(ctx.x_shape[:-1])  # not Size.numel(): that specializes symbolic sizes under compile
        if perm is None:  # no plan shipped with the index: sort on the device
            perm, rowptr = segments(index, n_rows)
        grad_x = bwd(grad, perm, rowptr, n_rows).view(ctx.x_shape)
    if ctx.has_pos and ctx.needs_input_grad[2]:
        # grad_pos reduces over the batch: rows index % N
        grad_pos = bwd(grad, *segments(index % ctx.n_pos, ctx.n_pos), ctx.n_pos)
    return grad_x, None, grad_pos, None, None, None


masked_gather_fwd_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


class _GatherFn(torch.autograd.Function):
    """The eager twin of masked_gather_fwd_op: the same launcher, setup and backward, no op dispatch."""

    @staticmethod
    def forward(ctx, x, index, pos, n_pos, perm, rowptr):
        out = _gather_fwd_launch(x, index, pos, n_pos)
        _gather_setup_context(ctx, (x, index, pos, n_pos, perm, rowptr), out)
        return out

    backward = staticmethod(_gather_backward)


def masked_gather_triton(x: Tensor, index: Tensor, pos: Tensor | None, n_pos: int,
                         plan: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Triton masked gather.

    x [B, N, D] | [R, D], index int64 [T], pos [N, D] | None, n_pos = N -> out [T, D]:
    out[t] = x.reshape(-1, D)[index[t]] (+ pos[index[t] % N]). Backward: deterministic
    segmented scatter-add (duplicates summed in a fixed order, fp32 accumulation), from `plan`
    = segments(index, rows of x) when given, else sorted on the device.
    """
    perm, rowptr = plan if plan is not None else (None, None)
    fn = _GatherFn.apply if launch_directly(x, index, pos, perm, rowptr) else masked_gather_fwd_op
    return fn(x, index, pos, n_pos, perm, rowptr)


def gather_layer_norm_triton(x: Tensor, index: Tensor, eps: float = 1e-5) -> Tensor:
    """Triton gather + layer-norm of the gathered rows only: x [B, N, D] | [R, D], index [T] -> [T, D]."""
    with torch.no_grad():
        if launch_directly(x, index):
            return _gather_layer_norm_launch(x, index, float(eps))
        return gather_layer_norm_op(x, index, float(eps))
