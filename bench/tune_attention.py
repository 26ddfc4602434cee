"""Time the varlen-attention tile candidates at A-JEPA shapes and write the fastest as a tile table.

    PYTHONPATH=. python -m bench.tune_attention                 # GPU: base preset, batch 128, bf16
    AJEPA_ATTN_TILES=<written file> python -m ajepa.cli train ...   # launches then use those tiles

For each site (context encoder: 12 heads x 64; predictor: 16 heads x 32) and kernel (fwd, dkdv,
dq), every candidate of kernels.attention.tiles.candidates runs on real sampler masks (every mask
mode of the bench scale), its output is checked against the current tile's, and it is timed with
do_bench (median). The forward kernel is timed alone; dkdv and dq are timed as the whole backward
(preprocess + dkdv + dq), the other kernel on its current tile. The candidate with the smallest
summed time over the mask modes wins and is applied before the next kernel is tuned.

Output (in $OUT when set, else bench/results/): `<date>_<device>_attention-tiles.json`, a tile
table that kernels.attention.tiles.load_tiles reads, with every candidate's time and any error.
It is rewritten after each kernel, so a run cut short keeps the entries already tuned.
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone

import torch

from bench import cases, common
from kernels.attention import fused, tiles

SITES = ("enc", "pred")


def _inputs(site: str, mode: str, scale: cases.Scale, device: torch.device, dtype: torch.dtype):
    cu, H, d, lens = cases.attention_site(scale.preset, mode, scale.batch_size, site)
    T = sum(lens)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(T, H, d, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    return dict(q=q, k=k, v=v, do=do, cu=cu.to(device), max_len=max(lens), scale=d**-0.5,
                label=f"{site}/{mode}: S={len(lens)} T={T} max={max(lens)} H={H} d={d}")


def _runner(kind: str, x: dict):
    """A call that runs the kernel(s) of `kind` on x and returns the outputs it writes."""
    q, k, v, do, cu, L, s = x["q"], x["k"], x["v"], x["do"], x["cu"], x["max_len"], x["scale"]
    if kind == "fwd":
        return lambda: fused.varlen_attn_fwd(q, k, v, cu, L, s)[0]
    o, lse = fused.varlen_attn_fwd(q, k, v, cu, L, s)
    grads = [torch.empty_like(q) for _ in range(3)]  # dq, dk, dv

    def bwd():
        fused.varlen_attn_bwd(do, q, k, v, o, lse, cu, L, s, *grads)
        return grads[1:] if kind == "dkdv" else grads[:1]

    return bwd


def _rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    errs = []
    for a, b in zip(got, want):
        a, b = a.float(), b.float()
        if not torch.isfinite(a).all():
            return math.inf
        errs.append(float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return max(errs)


def tune_entry(kind: str, block_d: int, dtype: torch.dtype, inputs: list[dict], timer, tol: float) -> dict:
    """Time every candidate of one table entry on `inputs` (one dict per mask mode); apply and
    return the fastest. `timer(fn) -> ms`."""
    current = tiles.tile(kind, block_d, dtype)
    runners = [_runner(kind, x) for x in inputs]
    as_list = lambda out: out if isinstance(out, list) else [out]  # noqa: E731
    want = [[t.clone() for t in as_list(r())] for r in runners]
    times, errors = {}, {}
    for cand in tiles.candidates(kind, block_d, dtype):
        with tiles.override(kind, block_d, dtype, cand):
            try:
                err = max(_rel_err(as_list(r()), w) for r, w in zip(runners, want))
                if not err <= tol:
                    errors[cand.name] = f"output differs from tile {current.name}: relative error {err:.3g} > {tol}"
                    continue
                times[cand.name] = sum(timer(r) for r in runners)
            except Exception as e:  # noqa: BLE001 - a tile that cannot launch here (e.g. OutOfResources)
                errors[cand.name] = f"{type(e).__name__}: {str(e).strip()[:200]}"
    if current.name not in times:
        raise RuntimeError(f"tune {kind}/d{block_d}: the current tile {current.name} failed: {errors}")
    best_name = min(times, key=times.get)
    best = next(t for t in tiles.candidates(kind, block_d, dtype) if t.name == best_name)
    tiles.set_tile(kind, block_d, dtype, best)
    return {"kind": kind, "block_d": block_d, "dtype": tiles.DTYPE_NAMES[dtype], "best": best_name,
            "was": current.name, "speedup_vs_was": times[current.name] / times[best_name],
            "ms": times, "errors": errors, "cases": [x["label"] for x in inputs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default=",".join(SITES), help="comma list of enc, pred")
    p.add_argument("--rep-ms", type=float, default=30.0, help="do_bench repetition time per candidate")
    args = p.parse_args(argv)
    device = common.bench_device()
    if device.type != "cuda":
        print("tune_attention: needs a CUDA GPU (tiles are timed on the GPU they are for)", file=sys.stderr)
        return 2
    scale = cases.bench_scale(device)
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device)
    path = common.result_path("attention-tiles", name)
    tuned, report = {}, []

    def timer(fn):
        return common.time_ms(fn, device, warmup_ms=5.0, rep_ms=args.rep_ms)

    for site in [s.strip() for s in args.sites.split(",") if s.strip()]:
        if site not in SITES:
            raise SystemExit(f"tune_attention: unknown site {site!r} (choose from {SITES})")
        inputs = [_inputs(site, mode, scale, device, dtype) for mode in scale.modes]
        block_d = fused._block_d(inputs[0]["q"].shape[-1])
        for kind in tiles.KINDS:
            row = tune_entry(kind, block_d, dtype, inputs, timer, tol=2e-2)
            row["site"] = site
            report.append(row)
            tuned[(kind, block_d, dtype)] = tiles.tile(kind, block_d, dtype)
            print(f"{site} {kind:4s} d{block_d}: {row['was']} -> {row['best']} ({row['speedup_vs_was']:.2f}x); "
                  + ", ".join(f"{n} {ms:.3f}" for n, ms in sorted(row["ms"].items(), key=lambda kv: kv[1]))
                  + (f"; failed: {row['errors']}" if row["errors"] else ""), flush=True)
            payload = tiles.tiles_payload(tuned, name, extra={
                "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": common.versions(), "git": common.git_info(), "scale": vars(scale),
                "method": "sum over mask modes of do_bench medians (ms); fwd alone, dkdv/dq as the whole backward",
                "entries": report,
            })
            common.write_json(payload, path)
    print(f"[tune_attention] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
