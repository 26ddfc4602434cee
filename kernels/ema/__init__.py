"""ema_update: in-place EMA of target parameters toward online ones, Triton or reference."""

from __future__ import annotations

import torch

from kernels._dispatch import resolve_impl
from kernels.ema.reference import check_ema_args, ema_update_ref


def ema_update(target, online, tau, impl: str = "auto") -> None:
    """In place, under no_grad: t = tau * t + (1 - tau) * o for every pair.

    target: sequence (list, generator such as model.parameters()) of float32 tensors,
            or one tensor (a flat buffer)
    online: same length / shapes / devices; float32, float16 or bfloat16
    tau:    Python float or 0-dim tensor in [0, 1]; a runtime scalar, so changing it
            every step never recompiles.
    The Triton path updates all pairs in one kernel launch (one per online dtype and
    device if those are mixed). Bad input raises ValueError naming the argument,
    before any tensor is modified.
    """
    targets, onlines, tau = check_ema_args(target, online, tau)
    device = targets[0].device if targets else torch.device("cpu")
    which = resolve_impl(impl, device, "ema_update")
    if which == "reference":
        ema_update_ref(targets, onlines, tau)
        return
    from kernels.ema.fused import ema_update_triton

    ema_update_triton(targets, onlines, tau, checked=True)


__all__ = ["ema_update", "ema_update_ref"]
