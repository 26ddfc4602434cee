"""Triton bias + GELU: y = gelu(x + bias) in one pass, and a backward that folds in the bias gradient.

Layout: kernels, then launchers, then the torch custom ops (opaque to torch.compile, with fake impls
and an autograd formula), then the functional entry point. Inputs are checked by ``kernels.gelu``.

The backward reads dy and x once, writes dx = dy * gelu'(x + bias), and sums dbias on the way: P row
groups x column blocks of programs keep fp32 partial sums, which one fixed-shape torch reduction adds
up afterwards (deterministic, no atomics; the separate bias-gradient reduction of x + bias disappears).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._common import cdiv, device_guard, launch_directly, new_output, next_power_of_2, reduction_programs


@triton.jit
def _gelu_and_grad(z, APPROX_TANH: tl.constexpr):
    """(gelu(z), gelu'(z)) in fp32: exact erf GELU, or the tanh form as F.gelu(approximate="tanh")
    (0.5 * (1 + tanh(u)) written as sigmoid(2u), which needs no tanh; its complement 1 - sigmoid(2u)
    is sigmoid(-2u), evaluated directly: the difference loses its digits where sigmoid(2u) nears 1)."""
    if APPROX_TANH:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)  # sqrt(2 / pi) * (z + k z^3)
        sg = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return z * sg, sg + 2.0 * z * sg * tl.sigmoid(-2.0 * u) * du
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return z * cdf, cdf + z * pdf


@triton.jit
def _bias_gelu_fwd_kernel(
    x,  # [M, N] any strides
    b,  # [N] contiguous
    y,  # [M, N] contiguous, x.dtype
    M,
    N,
    stride_xm,
    stride_xd,
    APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    z = tl.load(x + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(b + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out, _ = _gelu_and_grad(z, APPROX_TANH)
    tl.store(y + rows[:, None] * N + cols[None, :], out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy,  # [M, N] any strides
    x,  # [M, N] any strides: the forward's input (before the bias)
    b,  # [N] contiguous
    dx,  # [M, N] contiguous, dy.dtype
    db_part,  # fp32 [P, N]: row group p's share of dbias, written even when the group is empty
    M,
    N,
    stride_dym,
    stride_dyd,
    stride_xm,
    stride_xd,
    rows_per_program,  # a multiple of BLOCK_M
    APPROX_TANH: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    bias = tl.load(b + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first = pid * rows_per_program
    for start in range(0, rows_per_program, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows < M)[:, None] & col_ok[None, :]
        z = tl.load(x + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy + rows[:, None] * stride_dym + cols[None, :] * stride_dyd, mask=mask, other=0.0)
        _, d = _gelu_and_grad(z + bias[None, :], APPROX_TANH)
        gz = g.to(tl.float32) * d  # zero where masked: g is
        tl.store(dx + rows[:, None] * N + cols[None, :], gz.to(dx.dtype.element_ty), mask=mask)
        if NEED_DB:
            acc += gz
    if NEED_DB:
        tl.store(db_part + pid * N + cols, tl.sum(acc, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _tiles(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): up to 1024 columns, about 4096 elements a tile."""
    block_n = min(next_power_of_2(N), 1024)
    block_m = max(1, min(64, 4096 // block_n))
    return block_m, block_n, 8 if block_m * block_n >= 4096 else 4


def bias_gelu_fwd(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    """gelu(x + bias): x [..., N] (any strides), bias [N] -> [..., N] contiguous in x.dtype."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    M = x2.shape[0]
    y = new_output(x.shape, x.dtype, x.device)
    if M == 0:
        return y
    block_m, block_n, num_warps = _tiles(N)
    with device_guard(x.device):
        _bias_gelu_fwd_kernel[(cdiv(M, block_m), cdiv(N, block_n))](
            x2, bias.contiguous(), y, M, N, x2.stride(0), x2.stride(1),
            APPROX_TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y


def bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Tensor, approximate: str, need_db: bool) -> tuple[Tensor, Tensor]:
    """(dx [x.shape] in dy.dtype, dbias fp32 [N], or empty [0] unless need_db)."""
    N = x.shape[-1]
    x2, dy2 = x.reshape(-1, N), dy.reshape(-1, N)
    M = x2.shape[0]
    dev = x.device
    dx = new_output(x.shape, dy.dtype, dev)
    if M == 0:
        return dx, torch.zeros(N if need_db else 0, dtype=torch.float32, device=dev)
    block_m, block_n, num_warps = _tiles(N)
    col_blocks = cdiv(N, block_n)
    tiles = cdiv(M, block_m)
    per_program = cdiv(tiles, max(1, min(tiles, reduction_programs(dev) // col_blocks)))
    groups = cdiv(tiles, per_program)  # every row group gets at least one tile
    part = new_output((groups, N), torch.float32, dev) if need_db else dx
    with device_guard(dev):
        _bias_gelu_bwd_kernel[(groups, col_blocks)](
            dy2, x2, bias.contiguous(), dx, part,
            M, N, dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), per_program * block_m,
            APPROX_TANH=approximate == "tanh", NEED_DB=need_db,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    # the row groups' partial sums added in a fixed order: deterministic for a given device
    return dx, part.sum(0) if need_db else x.new_empty(0, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# torch custom ops (opaque to torch.compile, with fake impls and an autograd formula)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("ajepa::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd_op(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    return bias_gelu_fwd(x, bias, approximate)


@bias_gelu_fwd_op.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)


@torch.library.custom_op("ajepa::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd_op(dy: Tensor, x: Tensor, bias: Tensor, approximate: str, need_db: bool) -> tuple[Tensor, Tensor]:
    return bias_gelu_bwd(dy, x, bias, approximate, need_db)


@bias_gelu_bwd_op.register_fake
def _(dy, x, bias, approximate, need_db):
    return x.new_empty(x.shape, dtype=dy.dtype), x.new_empty((x.shape[-1] if need_db else 0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.bias_dtype = approximate, bias.dtype


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need_db = ctx.needs_input_grad[1]
    bwd = bias_gelu_bwd if launch_directly(dy, x, bias) else bias_gelu_bwd_op
    dx, db = bwd(dy, x, bias, ctx.approximate, need_db)
    return dx, db.to(ctx.bias_dtype) if need_db else None, None


bias_gelu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _BiasGeluFn(torch.autograd.Function):
    """The eager twin of bias_gelu_fwd_op: the same launchers, setup and backward, no op dispatch.
    (forward takes ctx itself: with a separate setup_context, every apply binds its arguments
    through inspect.signature, about 25 us of host time.)"""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        y = bias_gelu_fwd(x, bias, approximate)
        _setup_context(ctx, (x, bias, approximate), y)
        return y

    backward = staticmethod(_backward)


# ---------------------------------------------------------------------------------------------
# functional entry point (inputs already checked by kernels.gelu)
# ---------------------------------------------------------------------------------------------


def bias_gelu_triton(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """Triton gelu(x + bias): x [..., N], bias [N] -> [..., N] in x.dtype."""
    if launch_directly(x, bias):
        return _BiasGeluFn.apply(x, bias, approximate)
    return bias_gelu_fwd_op(x, bias, approximate)


__all__ = ["bias_gelu_bwd", "bias_gelu_fwd", "bias_gelu_triton"]
