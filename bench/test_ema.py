"""ema_update on the real encoder + predictor parameter set (ViT-B preset on a GPU) against the
per-parameter I-JEPA loop, the multi-tensor foreach forms, and kernels' reference.

Targets fp32 (as the model keeps them), online fp32 (AMP keeps parameters fp32), tau = 0.996.
Values are random (never zeros), in the real set's shapes. Floor: 12 bytes per parameter.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import kernels
from ajepa.model import AJEPA
from bench import cases, common

SUITE = "ema"
SCALE = cases.bench_scale(common.bench_device())
TAU = 0.996


def ijepa_loop(targets, onlines, m):
    """I-JEPA's loop, verbatim in form: k.data.mul_(m).add_((1 - m) * q.detach().data)."""
    with torch.no_grad():
        for q, k in zip(onlines, targets):
            k.mul_(m).add_((1.0 - m) * q)


def foreach_mul_add(targets, onlines, m):
    """V-JEPA 2: torch._foreach_mul_ then torch._foreach_add_."""
    with torch.no_grad():
        torch._foreach_mul_(targets, m)
        torch._foreach_add_(targets, onlines, alpha=1.0 - m)


def foreach_lerp(targets, onlines, m):
    """timm ModelEmaV3: torch._foreach_lerp_(target, online, 1 - m)."""
    with torch.no_grad():
        torch._foreach_lerp_(targets, onlines, 1.0 - m)


IMPLS = {
    "triton": lambda t, o, m: kernels.ema_update(t, o, m, impl="triton"),
    "reference": lambda t, o, m: kernels.ema_update(t, o, m, impl="reference"),
    "ijepa_loop": ijepa_loop,
    "foreach_mul_add": foreach_mul_add,
    "foreach_lerp": foreach_lerp,
}


@functools.lru_cache(maxsize=2)
def param_shapes(preset: str) -> tuple[tuple[int, ...], ...]:
    """Shapes of model.encoder + model.predictor parameters, built on the meta device (no memory)."""
    cfg = cases.config_for(preset, "multiblock")
    try:
        with torch.device("meta"):
            model = AJEPA(cfg, impl="reference")
    except Exception:  # pragma: no cover - older torch without meta init support
        model = AJEPA(cfg, impl="reference")
    params = itertools.chain(model.encoder.parameters(), model.predictor.parameters())
    return tuple(tuple(p.shape) for p in params)


_CACHE: dict = {}


def param_sets(device: torch.device):
    key = (SCALE.preset, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        shapes = param_shapes(SCALE.preset)
        numel = sum(torch.Size(s).numel() for s in shapes)
        n_sets = common.rotation_count(12 * numel, common.l2_bytes(device))
        sets = []
        for _ in range(n_sets):
            targets = [torch.randn(s, device=device) for s in shapes]
            onlines = [torch.randn(s, device=device) for s in shapes]
            sets.append((targets, onlines))
        label = f"{SCALE.preset} encoder+predictor: {len(shapes)} tensors, {numel / 1e6:.1f}M params fp32"
        _CACHE[key] = (label, sets, numel)
    return _CACHE[key]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_ema_update(impl, device, measure):
    if impl == "triton":
        common.skip_unless_cuda("triton ema_update", triton=True)
    label, sets, numel = param_sets(device)
    f = IMPLS[impl]
    # correctness on a slice of the set: one update from the same start as the reference
    targets, onlines = sets[0]
    t_ref = [t[:64].clone() if t.dim() else t.clone() for t in targets[:24]]
    o_sub = [o[:64] if o.dim() else o for o in onlines[:24]]
    t_got = [t.clone() for t in t_ref]
    IMPLS["reference"](t_ref, o_sub, TAU)
    f(t_got, [o.contiguous() for o in o_sub], TAU)
    for a, b in zip(t_got, t_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    fn = common.Cycle([functools.partial(f, t, o, TAU) for t, o in sets])
    measure(
        SUITE,
        label,
        "update",
        impl,
        fn,
        bytes_moved=common.ema_bytes(*sets[0]),
        n_tensors=len(sets[0][0]),
        n_params=numel,
        tau=TAU,
        rotated_sets=len(sets),
    )
