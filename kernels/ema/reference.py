"""Plain PyTorch EMA update, the I-JEPA per-parameter loop.

Pure math: inputs are checked by ``kernels.ema.ema_update``.
"""

from __future__ import annotations

import torch


def ema_update_ref(target, online, tau: float) -> None:
    """In place, no grad: t = tau * t + (1 - tau) * o for every (t, o) pair of the two sequences."""
    with torch.no_grad():
        for t, o in zip(target, online):
            t.mul_(tau).add_(o.to(t.dtype), alpha=1 - tau)
