"""masked_gather and gather_layer_norm against what a user would write instead.

Peers: the reference path (index the rows, then add pos[index % N]) and the I-JEPA `apply_masks`
way (add positions to all N tokens, then torch.gather with an expanded int64 index).
Shapes: the A-JEPA gathers on real sampler masks: the context encoder's (x [B, N, 768], context
index, + pos), the predictor's (grid [B, N, 512], packed (sample, block) index, + pos) and the
target side's gather + layer norm (no pos, no grad).
"bwd" is the backward the model runs: the gradient of x only, since ajepa's positional embeddings
are fixed sin-cos buffers (no grad), from the sort plan the mask collator ships with the batch
(kernels.gather_segments, computed on the CPU before timing, as the loader workers do). The output
gradients are drawn before timing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench import cases, common

SUITE = "gather"
SCALE = cases.bench_scale(common.bench_device())


def ijepa_gather(x: torch.Tensor, index: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """I-JEPA: x + pos over every token, then torch.gather(x, dim, index.unsqueeze(-1).repeat(D))."""
    D = x.shape[-1]
    if pos is not None:
        x = x + pos
    return torch.gather(x.reshape(-1, D), 0, index[:, None].expand(-1, D))


GATHER = {
    "triton": lambda x, i, p, segments=None: kernels.masked_gather(x, i, p, impl="triton", validate=False,
                                                                   segments=segments),
    "reference": lambda x, i, p: kernels.masked_gather(x, i, p, impl="reference", validate=False),
    "ijepa_gather": ijepa_gather,
}


def ijepa_layer_norm(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """I-JEPA targets: layer norm over every token (fp32, as autocast runs it), then gather."""
    D = x.shape[-1]
    h = F.layer_norm(x.float(), (D,))
    return torch.gather(h.reshape(-1, D), 0, index[:, None].expand(-1, D))


LAYER_NORM = {
    "triton": lambda x, i: kernels.gather_layer_norm(x, i, impl="triton", validate=False),
    "reference": lambda x, i: kernels.gather_layer_norm(x, i, impl="reference", validate=False),
    "ijepa_layer_norm": ijepa_layer_norm,
}


@dataclass
class Inputs:
    label: str
    index: torch.Tensor
    plan: tuple[torch.Tensor, torch.Tensor]  # gather_segments(index, B * N), built on the CPU like pack_masks'
    sets: list[tuple[torch.Tensor, torch.Tensor | None]]  # (x, pos) per rotated set
    batch: int
    n: int
    dim: int
    elem: int


_CACHE: dict = {}


def inputs(device: torch.device, site: str, mode: str) -> Inputs:
    key = (site, mode)
    if key not in _CACHE:
        _CACHE.clear()  # one case's tensors alive at a time
        cfg = cases.config_for(SCALE.preset, mode)
        m = cases.masks_for(SCALE.preset, mode, SCALE.batch_size)
        B, N = m.batch_size, m.num_patches
        D = cfg.model.pred_dim if site == "pred" else cfg.model.embed_dim
        index = {"enc": m.ctx_index, "pred": m.pred_index, "tgt": m.tgt_index}[site]
        plan = tuple(t.to(device) for t in kernels.gather_segments(index, B * N))
        index = index.to(device)
        dtype = cases.dtype_for(device)
        elem = torch.empty((), dtype=dtype).element_size()
        with_pos = site != "tgt"
        n_sets = common.rotation_count(2 * B * N * D * elem, common.l2_bytes(device))
        sets = []
        for _ in range(n_sets):
            x = torch.randn(B, N, D, device=device, dtype=dtype)
            pos = torch.randn(N, D, device=device, dtype=dtype) if with_pos else None
            sets.append((x, pos))
        label = f"{site}/{mode}: B={B} N={N} T={index.numel()} D={D} {cases.dtype_name(dtype)}"
        _CACHE[key] = Inputs(label, index, plan, sets, B, N, D, elem)
    return _CACHE[key]


@pytest.mark.parametrize("op", ["fwd", "bwd"])
@pytest.mark.parametrize("impl", list(GATHER))
@pytest.mark.parametrize("mode", SCALE.modes)
@pytest.mark.parametrize("site", ["enc", "pred"])
def test_masked_gather(site, mode, impl, op, device, measure):
    if impl == "triton":
        common.skip_unless_cuda("triton masked_gather", triton=True)
    inp = inputs(device, site, mode)
    f = functools.partial(GATHER[impl], segments=inp.plan) if impl == "triton" else GATHER[impl]
    x0, p0 = inp.sets[0]
    torch.testing.assert_close(f(x0, inp.index, p0), GATHER["reference"](x0, inp.index, p0), rtol=0, atol=0)

    if op == "fwd":
        fn = common.Cycle([functools.partial(f, x, inp.index, p) for x, p in inp.sets])
        leaves = None
    else:
        calls, leaves = [], []
        for x, p in inp.sets:
            x = x.detach().requires_grad_()
            out = f(x, inp.index, p)
            calls.append(functools.partial(out.backward, torch.randn_like(out), retain_graph=True))
            leaves.append(x)
        fn = common.Cycle(calls)
    T = inp.index.numel()
    measure(
        SUITE,
        inp.label,
        op,
        impl,
        fn,
        bytes_moved=common.gather_bytes(T, inp.dim, inp.elem, inp.batch * inp.n, inp.n if op == "fwd" else None, op),
        grad_to_none=leaves,
        tokens=T,
        dim=inp.dim,
        rotated_sets=len(inp.sets),
    )


@pytest.mark.parametrize("impl", list(LAYER_NORM))
@pytest.mark.parametrize("mode", SCALE.modes)
def test_gather_layer_norm(mode, impl, device, measure):
    if impl == "triton":
        common.skip_unless_cuda("triton gather_layer_norm", triton=True)
    inp = inputs(device, "tgt", mode)
    f = LAYER_NORM[impl]
    x0, _ = inp.sets[0]
    want = LAYER_NORM["reference"](x0, inp.index).float()
    got = f(x0, inp.index).float()
    tol = 1e-2 if x0.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    fn = common.Cycle([functools.partial(f, x, inp.index) for x, _ in inp.sets])
    T = inp.index.numel()
    measure(
        SUITE,
        inp.label.replace("tgt/", "tgt-ln/"),
        "fwd",
        impl,
        fn,
        bytes_moved=common.gather_bytes(T, inp.dim, inp.elem, inp.batch * inp.n, None, "fwd"),
        tokens=T,
        dim=inp.dim,
        rotated_sets=len(inp.sets),
    )
