"""Host microseconds per call of every kernel op's eager Triton path, with the kernel launches stubbed out
(a CUDA-free stand-in for the CPU cost of issuing the work): each op direct (the eager autograd.Function,
as the model calls it) and through its torch custom op (the dispatch torch.compile uses), the masked
gather's backward with and without the plan pack_masks ships, and ema_update against kernels.EmaPlan.

    PYTHONPATH=. python -m bench.host                    # base preset (ViT-B) shapes, masks of a batch of 4
    PYTHONPATH=. python -m bench.host --preset tiny --batch 16 --no-json

Every Triton kernel's launch is replaced by a no-op, so a figure is the Python and torch work around the
launches: argument checks, allocations, autograd, dispatch. The Triton launch's own host cost is not in it.
On a CPU the torch ops the launchers call (an allocation, the device-side sort of a gather backward without
a plan) run for real on the CPU, where on a GPU they would be launches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no GPU needed

import torch  # noqa: E402

import kernels  # noqa: E402
from ajepa.config import get_preset  # noqa: E402
from ajepa.masks import MaskSampler  # noqa: E402
from ajepa.model.vit import ViTEncoder  # noqa: E402
from bench import common  # noqa: E402
from kernels.attention import fused as attention_fused  # noqa: E402
from kernels.ema import fused as ema_fused  # noqa: E402
from kernels.gather import fused as gather_fused  # noqa: E402
from kernels.gelu import fused as gelu_fused  # noqa: E402
from kernels.layernorm import fused as layernorm_fused  # noqa: E402

FUSED_MODULES = (attention_fused, ema_fused, gather_fused, gelu_fused, layernorm_fused)


def _kernels(module):
    return [v for v in vars(module).values() if hasattr(v, "run") and hasattr(v, "__getitem__") and hasattr(v, "fn")]


@contextmanager
def stubbed_launches():
    """Every Triton kernel of the fused modules launches nothing (its run() returns at once)."""
    saved = [(k, k.__dict__.get("run")) for m in FUSED_MODULES for k in _kernels(m)]
    for k, _ in saved:
        k.run = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for k, run in saved:
            if run is None:
                del k.run
            else:
                k.run = run


@contextmanager
def through_custom_ops():
    """Eager calls go through the torch custom ops (as under torch.compile) instead of launching directly."""
    saved = [(m, m.launch_directly) for m in FUSED_MODULES if hasattr(m, "launch_directly")]
    for m, _ in saved:
        m.launch_directly = lambda *tensors: False
    try:
        yield
    finally:
        for m, fn in saved:
            m.launch_directly = fn


def per_call_us(fn, calls: int, rounds: int = 5) -> float:
    """The best of `rounds` rounds' mean host time per call: the least disturbed by other processes."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def _fwd_bwd(fn, inputs, grad):
    def call():
        for t in inputs:
            t.grad = None
        out = fn()
        torch.autograd.backward(out, grad)
    return call


def _work_list(fn):
    """fn with the attention's opt-in work-list grid (kernels/attention/fused.py, WORK_LIST_MAX_SEQUENCES)."""
    def call():
        saved, attention_fused.WORK_LIST_MAX_SEQUENCES = attention_fused.WORK_LIST_MAX_SEQUENCES, 4096
        try:
            return fn()
        finally:
            attention_fused.WORK_LIST_MAX_SEQUENCES = saved
    return call


def cases(preset: str, batch: int):
    """(name, direct-able call) pairs at the preset's shapes and one batch's real masks."""
    cfg = get_preset(preset)
    m = cfg.model
    masks = MaskSampler(cfg.masks, cfg.grid, cfg.train.steps, seed=0)(0, batch)
    N, D, Dp = cfg.num_patches, m.embed_dim, m.pred_dim
    grid = torch.randn(batch, N, Dp, requires_grad=True)
    pos = torch.randn(N, Dp)
    T_pred = masks.pred_index.numel()
    g_pred = torch.randn(T_pred, Dp)
    heads, dh = m.num_heads, D // m.num_heads
    T_ctx = masks.ctx_index.numel()
    qkv = torch.randn(T_ctx, 3, heads, dh, requires_grad=True)
    g_attn = torch.randn(T_ctx, heads, dh)
    x = torch.randn(T_ctx, D, requires_grad=True)
    res = torch.randn(T_ctx, D, requires_grad=True)
    w, b = torch.randn(D, requires_grad=True), torch.randn(D, requires_grad=True)
    h = torch.randn(T_ctx, 4 * D, requires_grad=True)
    hb = torch.randn(4 * D, requires_grad=True)
    dense = torch.randn(batch, N, D)

    def gather():
        return kernels.masked_gather(grid, masks.pred_index, pos, impl="triton", validate=False)

    def gather_planned():
        return kernels.masked_gather(grid, masks.pred_index, pos, impl="triton", validate=False,
                                     segments=masks.pred_segments)

    def attn():
        return kernels.varlen_attention_qkvpacked(qkv, masks.cu_ctx, masks.max_ctx, impl="triton", validate=False)

    def norm():
        return kernels.layer_norm(x, w, b, residual=res, impl="triton")

    def gelu():
        return kernels.bias_gelu(h, hb, impl="triton")

    enc = ViTEncoder(cfg.grid, cfg.patch_shape, D, m.depth, m.num_heads, m.mlp_ratio, m.pos_scale)
    online = list(enc.parameters())
    target = [p.detach().clone() for p in online]
    plan = kernels.EmaPlan(target, online, impl="triton")
    g_norm = (torch.randn(T_ctx, D), torch.randn(T_ctx, D))
    yield "masked_gather fwd", gather, True  # forward calls record autograd, as in training
    yield "masked_gather fwd+bwd, sorted on the device", _fwd_bwd(gather, [grid], g_pred), True
    yield "masked_gather fwd+bwd, plan from pack_masks", _fwd_bwd(gather_planned, [grid], g_pred), True
    yield "gather_layer_norm fwd", lambda: kernels.gather_layer_norm(dense, masks.tgt_index, impl="triton",
                                                                     validate=False), True
    yield "varlen_attention fwd", lambda: attn().detach(), True
    yield "varlen_attention fwd+bwd", _fwd_bwd(attn, [qkv], g_attn), True
    yield "varlen_attention fwd+bwd, work-list grid", _work_list(_fwd_bwd(attn, [qkv], g_attn)), True
    yield "layer_norm + residual fwd", lambda: norm()[0].detach(), True
    yield "layer_norm + residual fwd+bwd", _fwd_bwd(norm, [x, res, w, b], g_norm), True
    yield "bias_gelu fwd", lambda: gelu().detach(), True
    yield "bias_gelu fwd+bwd", _fwd_bwd(gelu, [h, hb], torch.randn(T_ctx, 4 * D)), True
    yield f"ema_update ({len(target)} tensors)", lambda: kernels.ema_update(target, online, 0.996, impl="triton"), False
    yield f"EmaPlan ({len(target)} tensors)", lambda: plan(0.996), False


def measure(preset: str, batch: int, calls: int) -> list[dict]:
    rows = []
    with stubbed_launches():
        for name, fn, has_op in cases(preset, batch):
            direct = per_call_us(fn, calls)
            via_op = None
            if has_op:
                with through_custom_ops():
                    via_op = per_call_us(fn, calls)
            rows.append({"op": name, "host_us_direct": round(direct, 1),
                         "host_us_custom_op": None if via_op is None else round(via_op, 1)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| op (eager, Triton path, launches stubbed) | host us / call | through the custom op |",
             "|---|---|---|"]
    for r in rows:
        op = "-" if r["host_us_custom_op"] is None else f"{r['host_us_custom_op']:.1f}"
        lines.append(f"| {r['op']} | {r['host_us_direct']:.1f} | {op} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", help="model shapes (default: base)")
    p.add_argument("--batch", type=int, default=4, help="clips whose masks set the token counts (default: 4)")
    p.add_argument("--calls", type=int, default=200, help="timed calls per round, best of 5 rounds (default: 200)")
    p.add_argument("--no-json", action="store_true", help="print the table, write no JSON file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.calls < 1:
        p.error("--batch and --calls must be >= 1")
    try:
        get_preset(args.preset)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the stubbed kernels leave outputs uninitialized: no slow denormal math on them
    rows = measure(args.preset, args.batch, args.calls)
    print(f"{args.preset}, masks of {args.batch} clips; host microseconds per call, kernel launches stubbed:")
    print(table(rows))
    if not args.no_json:
        payload = {"kind": "host", "preset": args.preset, "batch": args.batch, "calls": args.calls,
                   "device": common.device_info(torch.device("cpu")), "versions": common.versions(),
                   "git": common.git_info(), "rows": rows}
        path = common.write_json(payload, common.result_path("host", common.device_info(torch.device("cpu"))["name"]))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
