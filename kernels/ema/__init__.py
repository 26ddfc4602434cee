"""ema_update: in-place EMA of target parameters toward online ones, Triton or reference.

The argument checks live here and run before any tensor is touched, on every path, so a bad
pair late in the list never leaves a half-updated model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels._common import check_is_tensor, resolve_impl
from kernels.ema.reference import ema_update_ref

try:  # triton is a Linux-only dependency; the reference path works without it
    from kernels.ema import fused as _fused
except ImportError:  # pragma: no cover - depends on the platform
    _fused = None

ONLINE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TENSOR_TYPES = {Tensor, torch.nn.Parameter}


def _check_args(target, online, tau, op: str = "ema_update") -> tuple[list[Tensor], list[Tensor], float]:
    """Validate and normalize: returns (targets, onlines, tau as a Python float).

    target/online: equal-length sequences (or generators) of tensors, or two tensors.
    A 0-dim tensor tau is read on the host (a sync if it lives on CUDA).
    """
    if isinstance(target, Tensor) or isinstance(online, Tensor):
        if not (isinstance(target, Tensor) and isinstance(online, Tensor)):
            raise ValueError(f"{op}: target and online must both be tensors or both be sequences of tensors")
        targets, onlines = [target], [online]
    else:
        try:
            targets, onlines = list(target), list(online)
        except TypeError as e:
            raise ValueError(f"{op}: target and online must be sequences of tensors ({e})") from None
    if len(targets) != len(onlines):
        raise ValueError(f"{op}: target and online have different lengths ({len(targets)} vs {len(onlines)})")
    if not _all_pairs_valid(targets, onlines):
        _check_pairs(targets, onlines, op)  # the authority: names the first bad pair
    return targets, onlines, _check_tau(tau, op)


def _all_pairs_valid(targets: list, onlines: list) -> bool:
    """Fast path of _check_pairs, a whole list at a time (an EMA step checks every parameter: ~700
    tensors for ViT-B). False sends the lists through _check_pairs, which also accepts what this
    does not know (tensor subclasses such as DTensor) and names the first bad pair otherwise."""
    try:
        return (
            {type(t) for t in targets} <= _TENSOR_TYPES
            and {type(o) for o in onlines} <= _TENSOR_TYPES
            and {t.dtype for t in targets} == {torch.float32}
            and {o.dtype for o in onlines} <= set(ONLINE_DTYPES)
            and [t.shape for t in targets] == [o.shape for o in onlines]
            and [t.device for t in targets] == [o.device for o in onlines]
        ) or not targets
    except AttributeError:  # not a tensor at all
        return False


def _check_pairs(targets: list, onlines: list, op: str) -> None:
    for i, (t, o) in enumerate(zip(targets, onlines)):
        check_is_tensor(op, f"target[{i}]", t)
        check_is_tensor(op, f"online[{i}]", o)
        if t.dtype != torch.float32:
            raise ValueError(f"{op}: target[{i}] must be float32, got {t.dtype}")
        if o.dtype not in ONLINE_DTYPES:
            raise ValueError(f"{op}: online[{i}] must be float32, float16 or bfloat16, got {o.dtype}")
        if t.shape != o.shape:
            raise ValueError(
                f"{op}: target[{i}] shape {tuple(t.shape)} differs from online[{i}] shape {tuple(o.shape)}"
            )
        if t.device != o.device:
            raise ValueError(f"{op}: target[{i}] device {t.device} differs from online[{i}] device {o.device}")


def _check_tau(tau, op: str) -> float:
    if isinstance(tau, Tensor):
        if tau.dim() != 0 or not tau.is_floating_point():
            raise ValueError(
                f"{op}: tau must be a float or a 0-dim floating tensor, got shape {tuple(tau.shape)} {tau.dtype}"
            )
        tau = float(tau)
    elif isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise ValueError(f"{op}: tau must be a float or a 0-dim floating tensor, got {type(tau).__name__}")
    tau = float(tau)
    if math.isnan(tau) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"{op}: tau must lie in [0, 1], got {tau}")
    return tau


def ema_update(target, online, tau, impl: str = "auto") -> None:
    """In place, under no_grad: t = tau * t + (1 - tau) * o for every pair.

    target: sequence (list, generator such as model.parameters()) of float32 tensors,
            or one tensor (a flat buffer)
    online: same length / shapes / devices; float32, float16 or bfloat16
    tau:    Python float or 0-dim tensor in [0, 1]; a runtime scalar, so changing it
            every step never recompiles.
    The Triton path updates all pairs in one kernel launch (one per online dtype and
    device if those are mixed); its targets must be contiguous (written through raw
    pointers). Bad input raises ValueError naming the argument, before any tensor is modified.
    """
    targets, onlines, tau = _check_args(target, online, tau)
    device = targets[0].device if targets else torch.device("cpu")
    if resolve_impl(impl, device, "ema_update") == "reference":
        ema_update_ref(targets, onlines, tau)
        return
    if not all(map(Tensor.is_contiguous, targets)):
        i = next(i for i, t in enumerate(targets) if not t.is_contiguous())
        raise ValueError(f"ema_update: target[{i}] must be contiguous for impl='triton'")
    _fused.ema_update_triton(targets, onlines, tau)


class EmaPlan:
    """ema_update for fixed lists of tensors, with the per-call work done once.

        plan = EmaPlan(list(target.parameters()), list(online.parameters()))   # checks, impl, pointer tables
        plan(0.996)                         # == ema_update(same lists, 0.996): a tau check and one launch

    Building the plan checks every pair (as ema_update does on every call), resolves the impl and, on
    the Triton path, builds the pointer table and grid. A call then only checks tau and launches.
    The table holds the tensors' storage addresses, so the plan must be rebuilt (`refresh()`) when
    parameters are reallocated: Module.to / .cuda / .float, load_state_dict(assign=True), FSDP
    re-sharding. `AJEPA` does that from its `_apply` and `load_state_dict`. As a guard each call also
    compares the first and last tensors' addresses and rebuilds when they moved.
    """

    def __init__(self, target, online, impl: str = "auto"):
        self.targets, self.onlines, _ = _check_args(target, online, 0.0, "EmaPlan")
        device = self.targets[0].device if self.targets else torch.device("cpu")
        self.impl = resolve_impl(impl, device, "EmaPlan")
        self.refresh()

    def _fingerprint(self) -> tuple:
        if not self.targets:
            return ()
        ends = (self.targets[0], self.targets[-1], self.onlines[0], self.onlines[-1])
        return tuple(t.data_ptr() for t in ends)

    def refresh(self) -> None:
        """Rebuild the pointer tables from the tensors' current storage."""
        self.launches = []
        self.where = self._fingerprint()
        if self.impl == "reference" or not self.targets:
            return
        if not all(map(Tensor.is_contiguous, self.targets)):
            i = next(i for i, t in enumerate(self.targets) if not t.is_contiguous())
            raise ValueError(f"EmaPlan: target[{i}] must be contiguous for impl='triton'")
        if not all(map(Tensor.is_contiguous, self.onlines)):
            i = next(i for i, o in enumerate(self.onlines) if not o.is_contiguous())
            raise ValueError(f"EmaPlan: online[{i}] must be contiguous for impl='triton' (the table holds its address)")
        self.launches = _fused.plan_launches(self.targets, self.onlines)

    def __call__(self, tau) -> None:
        """In place, under no_grad: t = tau * t + (1 - tau) * o for every pair."""
        tau = _check_tau(tau, "EmaPlan")
        with torch.no_grad():
            if self.impl == "reference":
                ema_update_ref(self.targets, self.onlines, tau)
                return
            if self._fingerprint() != self.where:
                self.refresh()
            _fused.run_launches(self.launches, tau, 1.0 - tau)


__all__ = ["EmaPlan", "ema_update", "ema_update_ref"]
