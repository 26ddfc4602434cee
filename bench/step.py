"""End-to-end training-step benchmark: samples/s, tokens/s, peak memory and MFU, reference vs fused.

    PYTHONPATH=. python -m bench.step                      # GPU: tiny + base, reference + triton, bf16
    ajepa bench --preset base --batch-size 128 --steps 20  # the same through the CLI

One step is `ajepa.step.TrainStep`, the very step `ajepa train` runs per batch: the schedules at
the batch's step, forward under bf16 autocast (GPU), backward, gradient clipping, fused AdamW with
its on-device non-finite skip, and the EMA update of the target encoder. Inputs: random spectrograms (the data
pipeline is not timed) and masks from the real sampler, drawn at steps spread over the run so the
curriculum's mix of multiblock and time-frequency masks is represented; masks are moved to the
device before timing, as the loader's prefetch would. GPU steps are timed with CUDA events, one
pair per step; the reported step time is the median.

MFU = model FLOPs per step / step time / bf16 matmul rate measured in the same run. Model FLOPs
count matmuls only: linears and patch embedding (2 * tokens * in * out), attention
4 * sum(s_i^2) * D per layer; backward = 2x forward for linears (1x for the patch embedding, whose
input needs no gradient), 2.5x for attention; the target encoder runs forward only over all N tokens.
Norms, elementwise work, the optimizer and the EMA are not counted.

On the CPU the reference path still runs (tiny preset, a few steps), so a CPU user sees samples/s;
the Triton path is skipped there (the interpreter is a test tool, not a benchmark).
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ajepa.cli.common import add_set_option
from ajepa.config import Config, apply_overrides, get_preset
from ajepa.device import resolve_device
from ajepa.masks import MaskSampler, PackedMasks
from ajepa.model import AJEPA
from ajepa.step import TrainStep
from bench import common

GPU_BATCH = {"tiny": 1024, "small": 256, "base": 128}
CPU_BATCH = 8


# ---------------------------------------------------------------------------- FLOPs


def _lengths(cu: torch.Tensor) -> list[int]:
    cu = cu.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def model_flops(cfg: Config, masks: PackedMasks) -> dict:
    """Matmul FLOPs of one training step on this batch of masks (see the module docstring)."""
    m = cfg.model
    B, N = masks.batch_size, masks.num_patches
    D, Dp, (pt, pf) = m.embed_dim, m.pred_dim, cfg.patch_shape
    hid, hid_p = int(D * m.mlp_ratio), int(Dp * m.mlp_ratio)
    ctx, pred = _lengths(masks.cu_ctx), _lengths(masks.cu_pred)
    t_ctx, t_pred, t_tgt = sum(ctx), sum(pred), masks.num_targets

    def blocks(tokens: int, dim: int, hidden: int, depth: int) -> float:  # qkv, proj, fc1, fc2
        return 2.0 * tokens * depth * (4 * dim * dim + 2 * dim * hidden)

    def attention(lengths: list[int], dim: int, depth: int) -> float:  # QK^T and PV over all heads
        return 4.0 * depth * sum(s * s for s in lengths) * dim

    patch = 2.0 * B * N * pt * pf * D
    target = patch + blocks(B * N, D, hid, m.depth) + attention([N] * B, D, m.depth)
    enc_lin = blocks(t_ctx, D, hid, m.depth)
    enc_attn = attention(ctx, D, m.depth)
    pred_lin = 2.0 * t_ctx * D * Dp + blocks(t_pred, Dp, hid_p, m.pred_depth) + 2.0 * t_tgt * Dp * D
    pred_attn = attention(pred, Dp, m.pred_depth)
    train = target + 2 * patch + 3 * (enc_lin + pred_lin) + 3.5 * (enc_attn + pred_attn)
    return {
        "target_fwd": target,
        "encoder_fwd": patch + enc_lin + enc_attn,
        "predictor_fwd": pred_lin + pred_attn,
        "train_step": train,
        "ctx_tokens": t_ctx,
        "pred_tokens": t_pred,
        "tgt_tokens": t_tgt,
    }


# ---------------------------------------------------------------------------- one configuration


@dataclass
class StepResult:
    preset: str
    impl: str
    batch_size: int
    step_ms: list[float]
    peak_mem_gib: float | None
    flops_per_step: float
    tokens_per_sample: int
    final_loss: float
    oom_retries: int
    mask_steps: list[int]
    tf_batches: int
    ctx_tokens: float
    pred_tokens: float
    profile: dict | None = None
    warmup_s: float | None = None  # the untimed warm-up steps' wall time: with train.compile, the compile time


# kernel-name patterns of each category of the step's device time (first match wins)
PROFILE_CATEGORIES = (
    ("ajepa attention (Triton)", ("_varlen_attn_",)),
    ("ajepa gather / layer norm (Triton)", ("_masked_gather_", "_gather_layer_norm_")),
    ("ajepa block layer norm / bias-GELU (Triton)", ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel",
                                                     "_bias_gelu_")),
    ("ajepa EMA (Triton)", ("_ema_update_",)),
    ("torch attention (SDPA)", ("flash", "fmha", "attention", "efficient")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "wgmma", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("norm / softmax / reductions", ("norm", "softmax", "reduce")),
    ("elementwise, copies, other", ("",)),
)


def _category(name: str) -> str:
    low = name.lower()
    for label, keys in PROFILE_CATEGORIES:
        if any(k.lower() in low for k in keys):
            return label
    return PROFILE_CATEGORIES[-1][0]


def profile_steps(step_fn, n: int, top: int = 12) -> dict:
    """Device time of n steps by kernel (torch.profiler): the top kernels and each category's share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step_fn()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us and us > 0 and evt.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((evt.key, float(us) / n, int(evt.count) // n))
    total = sum(us for _, us, _ in rows) or 1.0
    cats: dict[str, float] = {}
    for name, us, _ in rows:
        cats[_category(name)] = cats.get(_category(name), 0.0) + us
    rows.sort(key=lambda r: -r[1])
    return {
        "steps": n,
        "device_ms_per_step": total / 1e3,
        "categories_pct": {k: round(100 * v / total, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": name[:160], "ms_per_step": round(us / 1e3, 4), "pct": round(100 * us / total, 2),
             "launches_per_step": calls}
            for name, us, calls in rows[:top]
        ],
    }




def profiled_batch(used: list, times: list[float]) -> tuple[tuple, float]:
    """The batch to profile: the one whose step set the median time (batches differ: time-frequency masks
    make longer predictor sequences), with the median of its own timed steps. Its device time from the
    profile over this wall time is how busy the GPU was on the step the report's median describes."""
    order = sorted(range(len(times)), key=times.__getitem__)
    b = used[order[len(order) // 2]]
    own = [t for u, t in zip(used, times) if u is b]
    return b, statistics.median(own)


def make_batches(cfg: Config, batch_size: int, distinct: int, device: torch.device, seed: int):
    """`distinct` (step, spec, masks, flops) batches; masks from the real sampler at spread-out steps."""
    sampler = MaskSampler(cfg.masks, cfg.grid, cfg.train.steps, seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(distinct):
        step = i * cfg.train.steps // max(distinct, 1)
        masks = sampler(step, batch_size)
        flops = model_flops(cfg, masks)
        spec = torch.randn(batch_size, 1, cfg.audio.target_frames, cfg.audio.num_mel_bins, generator=gen)
        out.append((step, spec.to(device), masks.to(device), flops))
    return out


def run_one(
    cfg: Config,
    preset: str,
    impl: str,
    batch_size: int,
    device: torch.device,
    steps: int,
    distinct: int,
    warmup: int | None,
    seed: int,
    progress: bool,
    profile: int = 0,
) -> StepResult:
    from tqdm import tqdm

    cuda = device.type == "cuda"
    torch.manual_seed(seed)
    with device:  # initialize on the device: the base preset's CPU init alone takes seconds
        model = AJEPA(cfg, impl=impl)
    model = model.to(device)
    step_fn = TrainStep(model, cfg, device)
    batches = make_batches(cfg, batch_size, distinct, device, seed)
    warmup = len(batches) if warmup is None else warmup

    def train_step(b) -> torch.Tensor:
        return step_fn(b[1], b[2], b[0]).loss
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(
        total=warmup + steps,
        desc=f"{preset}/{impl} B={batch_size}",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stdout,
    )
    loss = None
    try:
        t_warm = time.perf_counter()
        for i in range(warmup):  # every distinct batch once: every kernel specialization compiles here
            loss = train_step(batches[i % len(batches)])
            bar.update(1)
        common.synchronize(device)
        warmup_s = time.perf_counter() - t_warm
        times, used = [], []
        if cuda:
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)
            ]
        for i in range(steps):
            b = batches[i % len(batches)]
            used.append(b)
            if cuda:
                events[i][0].record()
                loss = train_step(b)
                events[i][1].record()
            else:
                t0 = time.perf_counter()
                loss = train_step(b)
                times.append((time.perf_counter() - t0) * 1e3)
            bar.update(1)
        common.synchronize(device)
        if cuda:
            times = [s.elapsed_time(e) for s, e in events]
        prof = None
        if profile > 0 and cuda:
            b, timed_ms = profiled_batch(used, times)
            try:
                prof = profile_steps(lambda: train_step(b), profile)
                prof.update(mask_step=b[0], tf_masks=bool(b[2].use_tf), timed_ms=round(timed_ms, 3),
                            device_busy_pct=round(100 * prof["device_ms_per_step"] / timed_ms, 1))
            except Exception as e:  # noqa: BLE001 - the profile is a diagnostic: never lose the timings
                prof = {"error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        bar.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    final_loss = float(loss) if loss is not None else float("nan")
    flops = statistics.fmean(b[3]["train_step"] for b in used) if used else 0.0
    return StepResult(
        preset=preset,
        impl=impl,
        batch_size=batch_size,
        step_ms=times,
        peak_mem_gib=peak,
        flops_per_step=flops,
        tokens_per_sample=cfg.num_patches,
        final_loss=final_loss,
        oom_retries=0,
        mask_steps=[b[0] for b in batches],
        tf_batches=sum(int(b[2].use_tf) for b in batches),
        ctx_tokens=statistics.fmean(b[3]["ctx_tokens"] for b in batches),
        pred_tokens=statistics.fmean(b[3]["pred_tokens"] for b in batches),
        profile=prof,
        warmup_s=warmup_s,
    )


def run_with_oom_retry(cfg, preset, impl, batch_size, device, **kw) -> StepResult:
    """Halve the batch on CUDA out-of-memory until it fits (the record says how often)."""
    retries = 0
    while True:
        try:
            res = run_one(cfg, preset, impl, batch_size, device, **kw)
            res.oom_retries = retries
            return res
        except torch.cuda.OutOfMemoryError:
            if batch_size <= 1:
                raise
            retries += 1
            print(
                f"[step] {preset}/{impl}: out of memory at batch {batch_size}; retrying at {batch_size // 2}",
                flush=True,
            )
            batch_size //= 2
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def to_record(res: StepResult, floors: common.Floors, dtype: str) -> common.Record:
    ms = statistics.median(res.step_ms)
    sps = res.batch_size / (ms * 1e-3)
    rec = common.make_record(
        "step",
        f"{res.preset} B={res.batch_size} {dtype}",
        "train-step",
        res.impl,
        ms,
        floors,
        flops=res.flops_per_step,
        preset=res.preset,
        batch_size=res.batch_size,
        samples_per_s=sps,
        tokens_per_s=sps * res.tokens_per_sample,
        peak_mem_gib=res.peak_mem_gib,
        mean_ms=statistics.fmean(res.step_ms),
        step_ms=res.step_ms,
        steps_timed=len(res.step_ms),
        final_loss=res.final_loss if math.isfinite(res.final_loss) else None,
        oom_retries=res.oom_retries,
        mask_steps=res.mask_steps,
        tf_batches=res.tf_batches,
        ctx_tokens_per_step=res.ctx_tokens,
        pred_tokens_per_step=res.pred_tokens,
        tokens_per_sample=res.tokens_per_sample,
        warmup_s=res.warmup_s,
    )
    if res.profile is not None:
        rec.extra["profile"] = res.profile
    rec.extra["mfu_pct"] = rec.pct_of_floor  # FLOPs only: the floor is the matmul time, so this is MFU
    return rec


# ---------------------------------------------------------------------------- driver


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        nargs="+",
        default=None,
        metavar="NAME",
        help="presets to run (default: tiny base on a GPU, tiny on the CPU)",
    )
    p.add_argument(
        "--impl",
        nargs="+",
        default=None,
        choices=("reference", "triton"),
        help="kernel paths to run (default: reference triton on a GPU; reference on the CPU, where triton is skipped)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per step for every preset (default on a GPU: tiny 1024, base 128; CPU: 8); "
        "halved automatically on out-of-memory",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 10 on a GPU, 3 on the CPU)")
    p.add_argument(
        "--distinct",
        type=int,
        default=None,
        help="distinct mask batches, drawn by the real sampler at steps spread over the run "
        "(default: 4 on a GPU, 2 on the CPU)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default: one per distinct batch, so every shape is compiled)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after timing, profile this many more steps with torch.profiler (GPU only) and record each "
        "kind of kernel's share of the device time and the top kernels (default: 0, no profile)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed for the model, the masks and the random inputs")
    add_set_option(p, "config override applied to every preset, e.g. --set model.depth=2 (repeatable)")
    p.add_argument(
        "--out", type=Path, default=None, help="folder for the JSON result (default: $OUT if set, else bench/results/)"
    )
    p.add_argument("--no-json", action="store_true", help="print the table, write no JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")



def run_from_args(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    presets = args.preset or (["tiny", "base"] if cuda else ["tiny"])
    impls = args.impl or (["reference", "triton"] if cuda else ["reference"])
    steps = args.steps if args.steps is not None else (10 if cuda else 3)
    distinct = args.distinct if args.distinct is not None else (4 if cuda else 2)
    if steps < 1 or distinct < 1 or (args.warmup is not None and args.warmup < 0) or args.profile_steps < 0:
        raise ValueError("--steps and --distinct must be >= 1, --warmup and --profile-steps >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    configs = {name: apply_overrides(get_preset(name), list(args.overrides)) for name in presets}
    dtype = "bf16" if cuda else "fp32"
    info = common.device_info(device)
    created = datetime.now(timezone.utc)
    print(
        f"[step] {info['name']} ({device.type}); presets {presets}; impls {impls}; {steps} timed steps over "
        f"{distinct} mask batches; {dtype}",
        flush=True,
    )
    floors = common.measure_floors(device)
    print(
        f"[step] floors: copy {floors.copy_gbps:.0f} GB/s, {floors.matmul_dtype} matmul "
        f"{floors.matmul_tflops:.3g} TFLOP/s",
        flush=True,
    )
    records, skipped = [], []
    path = None if args.no_json else common.result_path("step", info["name"], created, args.out or common.out_dir())

    def save():
        payload = common.build_payload(
            "step",
            records,
            floors,
            info,
            skipped,
            created=created,
            config={
                "presets": presets,
                "impls": impls,
                "steps": steps,
                "distinct": distinct,
                "warmup": args.warmup,
                "dtype": dtype,
                "seed": args.seed,
                "overrides": list(args.overrides),
                "device": str(device),
            },
        )
        if path is not None:
            common.write_json(payload, path)
        return payload

    for preset in presets:
        cfg = configs[preset]
        batch = args.batch_size if args.batch_size is not None else (GPU_BATCH.get(preset, 128) if cuda else CPU_BATCH)
        for impl in impls:
            name = f"{preset}/{impl}"
            if impl == "triton" and not cuda and not common.interpret_wiring_check():
                skipped.append({"test": f"step {name}", "reason": f"the Triton path {common.NO_GPU_TRITON}"})
                print(f"[step] {name}: skipped: the Triton path {common.NO_GPU_TRITON}", flush=True)
                save()
                continue
            res = run_with_oom_retry(
                cfg,
                preset,
                impl,
                batch,
                device,
                steps=steps,
                distinct=distinct,
                warmup=args.warmup,
                seed=args.seed,
                progress=not args.no_progress,
                profile=args.profile_steps,
            )
            rec = to_record(res, floors, dtype)
            records.append(rec)
            mem = (
                f"{res.peak_mem_gib:.2f} GiB peak"
                if res.peak_mem_gib is not None
                else (f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
            )
            print(
                f"[step] {name} B={res.batch_size}: {rec.median_ms:.1f} ms/step, "
                f"{rec.extra['samples_per_s']:.1f} samples/s, {rec.extra['tokens_per_s']:.0f} tokens/s, {mem}, "
                f"MFU {rec.extra['mfu_pct']:.1f}%, loss {res.final_loss:.4f}, warm-up {res.warmup_s:.1f} s",
                flush=True,
            )
            if res.profile and "categories_pct" in res.profile:
                shares = ", ".join(f"{k} {v:.1f}%" for k, v in res.profile["categories_pct"].items())
                print(f"[step] {name} device time by kind: {shares}", flush=True)
                pr = res.profile
                kind = "tf" if pr["tf_masks"] else "multiblock"
                print(f"[step] {name} profiled batch (mask step {pr['mask_step']}, {kind} masks): "
                      f"{pr['device_ms_per_step']:.1f} ms of device time in its {pr['timed_ms']:.1f} ms step "
                      f"({pr['device_busy_pct']:.0f}% busy)", flush=True)
            save()
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
    payload = save()
    if path is not None:
        print(f"[step] JSON: {path}")
    print()
    print(common.markdown_report(payload))  # the table comes last
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ajepa bench", description=__doc__.split("\n\n")[0],
        epilog="ajepa bench --data PATH [...] runs the end-to-end benchmark from disk instead (bench/e2e.py; "
        "its options: ajepa bench --data PATH --help).")
    add_step_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as exc:  # bad options or config overrides (ConfigError is a ValueError)
        print(f"ajepa bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
