"""Compile every Triton kernel for a GPU target on a machine without one, and report its resources.

    PYTHONPATH=. python -m bench.aot                  # sm_90 (H100): every tile of the table and
                                                      # of the tuning candidates, bf16 and fp16
    PYTHONPATH=. python -m bench.aot --arch 80 --json aot.json

Triton compiles ahead of time for any target its bundled ptxas knows, so this finds, before a
rationed GPU lease starts, the kernels that fail to compile with the installed Triton and the
tiles that need more shared memory than an SM has (those would fail at launch with
OutOfResources). Registers, spills and shared memory come from the cubin (cuobjdump -res-usage).
Exit status 1 when a kernel the built-in table launches fails or does not fit.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.attention import fused as attn
from kernels.attention import tiles
from kernels.ema import fused as ema
from kernels.gather import fused as gather
from kernels.gelu import fused as bias_gelu
from kernels.layernorm import fused as layernorm

# shared memory one block may use (bytes): sm_90 228 KiB - 1 KiB reserved, sm_80 164 KiB - 1 KiB
SMEM_LIMIT = {90: 232448, 89: 101376, 86: 101376, 80: 166912}
_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class Result:
    kernel: str
    variant: str
    in_table: bool
    ok: bool
    seconds: float
    shared_bytes: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    error: str | None = None


def _signature(fn, types: dict[str, str], constexprs: dict[str, object]):
    """ASTSource arguments: pointers and scalars typed, unit strides specialized to 1 (as a launch
    with a contiguous last dim does), every other int and pointer assumed 16-divisible."""
    names = list(inspect.signature(fn.fn).parameters)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
            consts[(i,)] = constexprs[name]
        elif name in types:
            sig[name] = types[name]
            if types[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride_") and name.endswith("d"):  # unit stride of the last dim
            sig[name] = "constexpr"
            consts[(i,)] = 1
        else:
            sig[name] = "i64" if name.startswith("stride_") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _res_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, spill bytes) from cuobjdump -res-usage, None when the tool is missing."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    out = out[out.find("Function"):]  # the kernel's own line, not the module's "Common" section
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    spill = (int(stack.group(1)) if stack else 0) + (int(local.group(1)) if local else 0)
    return (int(reg.group(1)) if reg else None), spill


def compile_one(fn, types, constexprs, options, arch: int, kernel: str, variant: str, in_table: bool) -> Result:
    sig, consts, attrs = _signature(fn, types, constexprs)
    t0 = time.time()
    try:
        k = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options=options,
        )
    except Exception as e:  # noqa: BLE001 - any compiler error is the finding
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        return Result(kernel, variant, in_table, False, time.time() - t0, error=msg)
    shared = int(k.metadata.shared)
    regs, spill = _res_usage(k.asm["cubin"])
    ok = shared <= SMEM_LIMIT.get(arch, 101376)
    err = None if ok else f"needs {shared} B shared memory > {SMEM_LIMIT.get(arch, 101376)} B per block"
    return Result(kernel, variant, in_table, ok, time.time() - t0, shared, regs, spill, err)


def attention_jobs(dtypes, block_ds, table_only: bool = False):
    kernels = {
        "fwd": (attn._varlen_attn_fwd_kernel, "Q K V O".split(), ["LSE"]),
        "dkdv": (attn._varlen_attn_bwd_dkdv_kernel, "Q K V DO DK DV".split(), ["LSE", "DELTA"]),
        "dq": (attn._varlen_attn_bwd_dq_kernel, "Q K V DO DQ".split(), ["LSE", "DELTA"]),
        # the one-program-per-(sequence, head) backward, on the dk/dv tiles (opt-in: SEQ_BWD_MAX_SEQLEN)
        "seqbwd": (attn._varlen_attn_bwd_seq_kernel, "Q K V DO DK DV DQ".split(), ["LSE", "DELTA", "DQ_ACC"]),
    }
    for dtype in dtypes:
        for block_d in block_ds:
            head_dim = block_d
            for kind, (fn, data, fp32) in kernels.items():
                types = {n: f"*{_TL[dtype]}" for n in data}
                types |= {n: "*fp32" for n in fp32}
                types |= {"CU_SEQLENS": "*i32", "qk_scale": "fp32", "sm_scale": "fp32"}
                tile_kind = "dkdv" if kind == "seqbwd" else kind
                table = tiles.default_tile(tile_kind, block_d, dtype)
                for t in [table] if table_only else tiles.candidates(tile_kind, block_d, dtype):
                    cfg = t.kwargs()
                    constexprs = dict(
                        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                        DOT_PRECISION=attn._dot_precision(dtype),
                    )
                    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                    name = f"{_TL[dtype]} d{block_d} {t.name}"
                    if kind == "seqbwd":
                        yield fn, types, constexprs, opts, f"attn_{kind}", name, t == table
                        continue
                    yield (fn, types, constexprs | dict(WORK_LIST=False, S_BLOCK=1), opts, f"attn_{kind}", name,
                           t == table)
                    if t == table:  # the opt-in work-list grid (WORK_LIST_MAX_SEQUENCES), up to 256 sequences
                        yield (fn, types, constexprs | dict(WORK_LIST=True, S_BLOCK=256), opts,
                               f"attn_{kind}_worklist", name, True)
            types = {"O": f"*{_TL[dtype]}", "DO": f"*{_TL[dtype]}", "DELTA": "*fp32"}
            yield (attn._varlen_attn_bwd_preprocess_kernel, types,
                   dict(HEAD_DIM=block_d, BLOCK_T=64, BLOCK_D=block_d), dict(num_warps=4),
                   "attn_bwd_preprocess", f"{_TL[dtype]} d{block_d}", True)


def other_jobs(dtypes):
    import triton.language as tl

    for dtype in dtypes:
        e = _TL[dtype]
        for D in (512, 768):
            bd = triton.next_power_of_2(D)
            yield (gather._masked_gather_fwd_kernel, {"x": f"*{e}", "index": "*i64", "pos": f"*{e}", "out": f"*{e}"},
                   dict(HAS_POS=True, BLOCK_T=max(1, min(64, 4096 // bd)), BLOCK_D=bd), dict(num_warps=4),
                   "masked_gather_fwd", f"{e} D{D}", True)
            bwd_d = min(bd, 256)
            for splits in (1, 8):
                yield (gather._masked_gather_bwd_kernel,
                       {"grad": f"*{e}", "perm": "*i64", "rowptr": "*i64", "out": f"*{e}" if splits == 1 else "*fp32"},
                       dict(ACC_DTYPE=tl.float32, SPLITS=splits, BLOCK_R=max(1, min(16, 4096 // bwd_d)), BLOCK_D=bwd_d),
                       dict(num_warps=4), "masked_gather_bwd", f"{e} D{D} splits {splits}", True)
            yield (gather._gather_layer_norm_fwd_kernel,
                   {"x": f"*{e}", "index": "*i64", "out": f"*{e}", "eps": "fp32"},
                   dict(BLOCK_T=max(1, min(16, 4096 // bd)), BLOCK_D=bd), dict(num_warps=4),
                   "gather_layer_norm_fwd", f"{e} D{D}", True)
        yield (ema._ema_update_kernel, {"table": "*i64", "tau": "fp32", "one_minus_tau": "fp32"},
               dict(ONLINE_DTYPE=ema._TL_DTYPE[dtype], ALIGN=16, BLOCK=ema.BLOCK), dict(num_warps=8),
               "ema_update", f"online {e}", True)
        yield from norm_gelu_jobs(e)


def norm_gelu_jobs(e: str):
    """layer_norm and bias_gelu with the tiles their launchers pick: ViT widths (fp32 weights beside
    e-typed activations, as under autocast), the residual add on, every gradient wanted."""
    for D in (384, 768, 1024):
        block_m, block_d, warps = layernorm._tiles(D)
        tiles_ = dict(BLOCK_M=block_m, BLOCK_D=block_d)
        yield (layernorm._layer_norm_fwd_kernel,
               {"x": f"*{e}", "res": f"*{e}", "w": "*fp32", "b": "*fp32", "y": f"*{e}", "s": f"*{e}",
                "mean_out": "*fp32", "rstd_out": "*fp32", "eps": "fp32"},
               dict(HAS_RES=True, HAS_W=True, HAS_B=True, **tiles_), dict(num_warps=warps),
               "layer_norm_fwd", f"{e} D{D} residual", True)
        yield (layernorm._layer_norm_bwd_kernel,
               {"dy": f"*{e}", "ds": f"*{e}", "xs": f"*{e}", "w": "*fp32", "mean_in": "*fp32", "rstd_in": "*fp32",
                "dx": f"*{e}", "dres": f"*{e}", "dw_part": "*fp32", "db_part": "*fp32"},
               dict(HAS_DS=True, HAS_W=True, HAS_DRES=False, NEED_DW=True, NEED_DB=True, **tiles_),
               dict(num_warps=warps), "layer_norm_bwd", f"{e} D{D} residual", True)
    for N in (1536, 3072, 4096):
        block_m, block_n, warps = bias_gelu._tiles(N)
        for approx in (False, True):
            tiles_ = dict(APPROX_TANH=approx, BLOCK_M=block_m, BLOCK_N=block_n)
            variant = f"{e} N{N} {'tanh' if approx else 'erf'}"
            yield (bias_gelu._bias_gelu_fwd_kernel, {"x": f"*{e}", "b": "*fp32", "y": f"*{e}"},
                   tiles_, dict(num_warps=warps), "bias_gelu_fwd", variant, True)
            yield (bias_gelu._bias_gelu_bwd_kernel,
                   {"dy": f"*{e}", "x": f"*{e}", "b": "*fp32", "dx": f"*{e}", "db_part": "*fp32"},
                   dict(NEED_DB=True, **tiles_), dict(num_warps=warps), "bias_gelu_bwd", variant, True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--block-ds", default="16,32,64,128", help="padded head dims of the attention kernels")
    p.add_argument("--table-only", action="store_true", help="attention: the built-in table's tiles only")
    p.add_argument("--smem-limit", type=int, default=None, help="shared memory per block in bytes "
                   "(default: the target's, e.g. 232448 for sm_90)")
    p.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = p.parse_args(argv)
    names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in names if d not in tiles.DTYPES]
    if unknown or not names:
        p.error(f"--dtypes: unknown {', '.join(unknown) or '(empty list)'}; choose from {', '.join(tiles.DTYPES)}")
    dtypes = [tiles.DTYPES[d] for d in names]
    block_ds = [d.strip() for d in args.block_ds.split(",") if d.strip()]
    if not block_ds or not all(d.isdigit() and int(d) in tiles.BLOCK_DS for d in block_ds):
        p.error(f"--block-ds: {args.block_ds!r}; give a comma list of {', '.join(map(str, tiles.BLOCK_DS))}")
    block_ds = [int(d) for d in block_ds]
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench.aot: TRITON_INTERPRET=1 turns kernels into interpreted functions, which do not compile; "
              "run it without TRITON_INTERPRET", file=sys.stderr)
        return 2
    if args.smem_limit is not None:
        SMEM_LIMIT[args.arch] = args.smem_limit
    jobs = list(attention_jobs(dtypes, block_ds, args.table_only))
    jobs += list(other_jobs([d for d in dtypes if d != torch.float32]))
    results = []
    print(f"triton {triton.__version__}: compiling {len(jobs)} kernels for sm_{args.arch}", flush=True)
    for job in jobs:
        r = compile_one(*job[:4], args.arch, *job[4:])
        results.append(r)
        if not r.ok:
            print(f"  {'TABLE ' if r.in_table else ''}FAIL {r.kernel} {r.variant}: {r.error}", flush=True)
    print("| kernel | variant | table | shared KiB | regs | spill B | s |\n|---|---|---|---|---|---|---|")
    for r in results:
        if r.ok:
            print(f"| {r.kernel} | {r.variant} | {'*' if r.in_table else ''} | {r.shared_bytes / 1024:.0f} | "
                  f"{r.registers} | {r.spill_bytes} | {r.seconds:.1f} |")
    bad = [r for r in results if r.in_table and not r.ok]
    print(f"{sum(r.ok for r in results)}/{len(results)} compiled and fit; "
          f"{len(bad)} of the built-in table's kernels failed", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "arch": args.arch,
                                         "results": [asdict(r) for r in results]}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
