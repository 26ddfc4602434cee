"""Triton EMA update: every (target, online) pair of a model in ONE multi-tensor launch.

The kernel reads a table of int64 data pointers and sizes, and a per-program block
table (which tensor, which block of it), so tensors of any mix of sizes share one
grid. The table is cached, keyed by its own contents (pointers, sizes), so repeated
calls on the same parameters reuse it and any change of tensors builds a new one.
Inputs are checked by ``kernels.ema``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._common import device_guard

BLOCK = 4096  # elements per program
_ALIGN = 16  # bytes; pointers stored divided by this when all are aligned (see kernel)
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _ema_update_kernel(
    table,  # int64 [5, n]: t_ptr/ALIGN, o_ptr/ALIGN, numel, then blocks: tensor id, block number
    n_tensors,
    n_blocks,
    tau,  # fp32 runtime scalars: a new tau never recompiles
    one_minus_tau,  # computed on the host in fp64, like `alpha=1 - tau` in the loop
    ONLINE_DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(table + 3 * n_tensors + pid)
    blk = tl.load(table + 3 * n_tensors + n_blocks + pid)
    numel = tl.load(table + 2 * n_tensors + i)
    # ptr = stored * ALIGN: the compiler then knows the alignment and can vectorize
    t_ptr = (tl.load(table + i) * ALIGN).to(tl.pointer_type(tl.float32))
    o_ptr = (tl.load(table + n_tensors + i) * ALIGN).to(tl.pointer_type(ONLINE_DTYPE))
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    tp = t_ptr + offs  # [BLOCK]
    op = o_ptr + offs
    if ALIGN == 16:
        # the compiler cannot see through the int-to-pointer cast: say that each block starts
        # 16-byte aligned and runs contiguous, or every access stays a scalar 4-byte one
        tp = tl.max_contiguous(tl.multiple_of(tp, 16), BLOCK)
        op = tl.max_contiguous(tl.multiple_of(op, 16), BLOCK)
    if (blk + 1) * BLOCK <= numel:  # full block: no mask, so loads stay vectorized
        t = tl.load(tp)
        o = tl.load(op).to(tl.float32)
        tl.store(tp, t * tau + o * one_minus_tau)
    else:
        m = offs < numel
        t = tl.load(tp, mask=m)
        o = tl.load(op, mask=m).to(tl.float32)
        tl.store(tp, t * tau + o * one_minus_tau, mask=m)


_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 8


def _table(targets: list[Tensor], onlines: list[Tensor]) -> tuple[Tensor, int, int, int]:
    """(table on the device, n_tensors, n_blocks, align), cached by pointers and sizes."""
    device = targets[0].device
    entries = tuple(zip(map(Tensor.data_ptr, targets), map(Tensor.data_ptr, onlines), map(Tensor.numel, targets)))
    key = (device, onlines[0].dtype, entries)
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    align = _ALIGN if all(tp % _ALIGN == 0 and op % _ALIGN == 0 for tp, op, n in entries if n > 0) else 1
    ptrs = torch.tensor([[tp // align, op // align, n] for tp, op, n in entries], dtype=torch.int64)
    nblk = (ptrs[:, 2] + BLOCK - 1) // BLOCK
    tensor_id = torch.repeat_interleave(torch.arange(len(entries)), nblk)
    first = torch.cumsum(nblk, 0) - nblk
    block_no = torch.arange(tensor_id.numel()) - first[tensor_id]
    table = torch.cat([ptrs.t().reshape(-1), tensor_id, block_no]).to(device)
    hit = (table, len(entries), tensor_id.numel(), align)
    _TABLE_CACHE[key] = hit
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return hit


def _launch(plan: tuple, tau: float, one_minus_tau: float) -> None:
    """One kernel launch from a prepared (table, n_tensors, n_blocks, align, online dtype, device)."""
    table, n_tensors, n_blocks, align, dtype, device = plan
    if n_blocks == 0:
        return
    with device_guard(device):
        _ema_update_kernel[(n_blocks,)](
            table,
            n_tensors,
            n_blocks,
            tau,
            one_minus_tau,
            ONLINE_DTYPE=_TL_DTYPE[dtype],
            ALIGN=align,
            BLOCK=BLOCK,
            num_warps=8,
        )


def plan_launches(target: list[Tensor], online: list[Tensor]) -> list[tuple]:
    """The launches for these pairs: one per (device, online dtype) group, one in total for a normal
    model. Empty tensors get no blocks in the table, so they need no filtering."""
    groups: dict = {}
    for t, o in zip(target, online):
        g = groups.setdefault((t.device, o.dtype), ([], []))
        g[0].append(t)
        g[1].append(o)
    return [(*_table(ts, os_), dtype, device) for (device, dtype), (ts, os_) in groups.items()]


def run_launches(plans: list[tuple], tau: float, one_minus_tau: float) -> None:
    for plan in plans:
        _launch(plan, tau, one_minus_tau)


def _ema_groups(target: list[Tensor], online: list[Tensor], tau: float, one_minus_tau: float) -> None:
    run_launches(plan_launches(target, online), tau, one_minus_tau)


@torch.library.custom_op("ajepa::ema_update_", mutates_args=("target",))
def ema_update_op(target: list[Tensor], online: list[Tensor], tau: float, one_minus_tau: float) -> None:
    """The update as one opaque op for torch.compile graphs (eager calls skip the op dispatch)."""
    _ema_groups(target, online, tau, one_minus_tau)


@ema_update_op.register_fake
def _(target, online, tau, one_minus_tau):
    return None


def ema_update_triton(target: list[Tensor], online: list[Tensor], tau: float) -> None:
    """In place, no grad: t = tau * t + (1 - tau) * o over all pairs, in one launch.

    target: list of contiguous fp32 tensors (written through raw pointers), online: a list of the
    same shapes, fp32/fp16/bf16; a non-contiguous online tensor is copied first.
    """
    if not all(map(Tensor.is_contiguous, online)):
        online = [o if o.is_contiguous() else o.contiguous() for o in online]
    if not target:
        return
    with torch.no_grad():
        if torch.compiler.is_compiling():
            ema_update_op(target, online, tau, 1.0 - tau)
        else:
            # eager: the custom op's dispatch over ~700 tensor arguments cost ~1 ms of host time per
            # call on the H100 machine's CPU (more than the kernel's GPU time), so launch directly
            _ema_groups(target, online, tau, 1.0 - tau)
