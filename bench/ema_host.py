"""Host microseconds per EMA call, with the kernel launch stubbed out (a CUDA-free stand-in): ema_update, which
checks every pair and looks its pointer table up on every call, against kernels.EmaPlan, which does both once.

    PYTHONPATH=. python -m bench.ema_host            # ViT-B's encoder tensors (the base preset)

The Triton launch itself (tens of microseconds of host time on a GPU machine) is not in these figures.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU needed

from ajepa.config import get_preset  # noqa: E402
from ajepa.model.vit import ViTEncoder  # noqa: E402
from kernels.ema import EmaPlan, ema_update, fused  # noqa: E402


def per_call_us(fn, calls: int = 300) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(preset: str = "base") -> int:
    cfg = get_preset(preset)
    m = cfg.model
    online = list(ViTEncoder(cfg.grid, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio).parameters())
    target = [p.detach().clone() for p in online]
    fused._launch = lambda plan, tau, one_minus_tau: None  # the stand-in: everything but the kernel
    plan = EmaPlan(target, online, impl="triton")
    each = per_call_us(lambda: ema_update(target, online, 0.996, impl="triton"))
    planned = per_call_us(lambda: plan(0.996))
    print(f"{preset}: {len(target)} tensors; host us per call without the launch: ema_update {each:.0f}, "
          f"EmaPlan {planned:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
