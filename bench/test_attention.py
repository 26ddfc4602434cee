"""varlen_attention against the attention a user would run instead, at A-JEPA shapes.

Cases (real sampler masks, base preset on a GPU): the context encoder (12 heads x 64, one
sequence per sample) and the predictor (16 heads x 32, one sequence per (sample, target block)),
for multiblock and time-frequency masks; forward and forward+backward.

Peers, each skipped with its reason when unavailable:
- reference:   kernels' reference path (pad, masked SDPA, unpad), what ajepa runs without Triton
- sdpa_padded: F.scaled_dot_product_attention alone on already padded [S, H, L, d] batches with a
               key-padding mask (FLOPs counted as the useful varlen FLOPs: padding is waste)
- xformers:    memory_efficient_attention with fmha.BlockDiagonalMask (dispatches to FlashAttention)
- torch_varlen: torch.nn.attention.varlen.varlen_attn (torch >= 2.10)
- flex:        compiled FlexAttention with a document mask (block mask built from the layout,
               outside the timing)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench import cases, common

SUITE = "attention"
SCALE = cases.bench_scale(common.bench_device())
IMPLS = ["triton", "triton_seqbwd", "triton_worklist", "reference", "sdpa_padded", "xformers", "torch_varlen", "flex"]


@dataclass
class Case:
    label: str
    lengths: list[int]
    cu: torch.Tensor  # int32 [S+1] on the device
    max_len: int
    heads: int
    head_dim: int
    sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # rotated (q, k, v) [T, H, d]
    seq_id: torch.Tensor  # int64 [T]
    pos: torch.Tensor  # int64 [T]
    elem: int


_CACHE: dict = {}


def case_for(device: torch.device, site: str, mode: str) -> Case:
    key = (site, mode)
    if key not in _CACHE:
        _CACHE.clear()
        cu, H, d, lens = cases.attention_site(SCALE.preset, mode, SCALE.batch_size, site)
        T = sum(lens)
        dtype = cases.dtype_for(device)
        elem = torch.empty((), dtype=dtype).element_size()
        n_sets = common.rotation_count(3 * T * H * d * elem, common.l2_bytes(device))
        sets = [tuple(torch.randn(T, H, d, device=device, dtype=dtype) for _ in range(3)) for _ in range(n_sets)]
        cu_dev = cu.to(device)
        seq_id = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
        pos = torch.arange(T, device=device) - cu_dev.long()[seq_id]
        label = f"{site}/{mode}: S={len(lens)} T={T} max={max(lens)} H={H} d={d} {cases.dtype_name(dtype)}"
        _CACHE[key] = Case(label, lens, cu_dev, max(lens), H, d, sets, seq_id, pos, elem)
    return _CACHE[key]


# ---------------------------------------------------------------------------- implementations
# Each builder returns (prepare, run, unpack): prepare(q, k, v) lays out one input set (untimed),
# run(*prepared) is the timed call, unpack(out) gives [T, H, d] for the correctness check.


def _ours(impl: str, c: Case):
    def run(q, k, v):
        return kernels.varlen_attention(q, k, v, c.cu, c.max_len, impl=impl, validate=False)

    return (lambda q, k, v: (q, k, v)), run, (lambda o: o)


def _sdpa_padded(c: Case):
    S, L = len(c.lengths), c.max_len
    lens = torch.tensor(c.lengths, device=c.cu.device)
    mask = (torch.arange(L, device=c.cu.device)[None, :] < lens[:, None])[:, None, None, :]  # [S, 1, 1, L]

    def pad(x):
        buf = x.new_zeros(S, L, c.heads, c.head_dim)
        buf[c.seq_id, c.pos] = x
        return buf.transpose(1, 2).contiguous()  # [S, H, L, d]

    def prepare(q, k, v):
        return pad(q), pad(k), pad(v)

    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return prepare, run, lambda o: o.transpose(1, 2)[c.seq_id, c.pos]


def _enable_pytorch_backed_xformers_ops() -> None:
    """xformers wheels carry a compiled extension built against one torch (0.0.35: torch 2.10). Under
    another torch it fails to load, and xformers then marks every op "wasn't built with CUDA
    support", even the ones that call PyTorch's own kernels (fa2F-pt: aten._flash_attention_*,
    cutlassF-pt: aten._efficient_attention_*), which need no extension. Re-enable those: the
    dispatch stays xformers' own, and the op it picks is recorded with each result."""
    from xformers import _cpp_lib
    from xformers.ops.fmha import common as fmha_common

    if _cpp_lib._build_metadata is None and not fmha_common._built_with_cuda:
        fmha_common._built_with_cuda = True
        err = str(_cpp_lib._cpp_library_load_exception).strip().splitlines()
        XFORMERS_NOTES["compiled_extension"] = f"not loaded under torch {torch.__version__}: {' '.join(err)[:300]}"


def _xformers_op_name(c: Case) -> str | None:
    """The forward op xformers' dispatcher picks for this case."""
    try:
        from xformers.ops.fmha import _dispatch_fw
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
        from xformers.ops.fmha.common import Inputs

        q = c.sets[0][0][None]
        bias = BlockDiagonalMask.from_seqlens(list(c.lengths), device=q.device)
        return _dispatch_fw(Inputs(query=q, key=q, value=q, attn_bias=bias), False).NAME
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        return f"unknown ({type(e).__name__})"


XFORMERS_NOTES: dict[str, str] = {}


def _xformers(c: Case):
    common.skip_unless_cuda("xformers BlockDiagonalMask (FlashAttention kernels)")
    try:
        from xformers.ops import fmha, memory_efficient_attention
    except ImportError as e:
        pytest.skip(
            f"xformers is not installed ({e}); on the device carry the 0.0.35 wheel in .whl/ (see bench/README.md)"
        )
    _enable_pytorch_backed_xformers_ops()
    bias = fmha.BlockDiagonalMask.from_seqlens(list(c.lengths), device=c.cu.device)

    def run(q, k, v):
        return memory_efficient_attention(q, k, v, attn_bias=bias)

    return (lambda q, k, v: (q[None], k[None], v[None])), run, (lambda o: o[0])


def _torch_varlen(c: Case):
    common.skip_unless_cuda("torch.nn.attention.varlen.varlen_attn (FlashAttention kernels)")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (added in torch 2.10)")

    def run(q, k, v):
        # positional: the keyword set changed between torch 2.10 and 2.12; non-causal is the default
        return varlen_attn(q, k, v, c.cu, c.cu, c.max_len, c.max_len)

    return (lambda q, k, v: (q, k, v)), run, (lambda o: o)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(c: Case):
    common.skip_unless_cuda("FlexAttention (compiled Triton kernels)")
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.flex_attention")
    doc = c.seq_id.to(torch.int32)

    def document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    # built from the layout (create_block_mask would evaluate the mask on all T x T pairs)
    block_mask = cases.document_block_mask(c.seq_id, c.cu, document)
    flex = _compiled_flex()

    def layout(x):  # [T, H, d] -> [1, H, T, d]
        return x.transpose(0, 1).unsqueeze(0).contiguous()

    def run(q, k, v):
        return flex(q, k, v, block_mask=block_mask)

    return (lambda q, k, v: (layout(q), layout(k), layout(v))), run, (lambda o: o[0].transpose(0, 1))


# Opt-in launch options of kernels/attention/fused.py, off by default until a GPU run shows they pay; the bench
# times each beside the default: SEQ_BWD_MAX_SEQLEN (one program per (sequence, head) in the backward, up to 512)
# and WORK_LIST_MAX_SEQUENCES (the work-list grid: the sequences' blocks back to back, no dead programs).
OPTIONS = {"triton_seqbwd": ("SEQ_BWD_MAX_SEQLEN", 512), "triton_worklist": ("WORK_LIST_MAX_SEQUENCES", 4096)}


def _with_option(impl: str, fn):
    """fn with impl's launch option set (fn itself for the other impls)."""
    if impl not in OPTIONS:
        return fn
    from kernels.attention import fused

    name, value = OPTIONS[impl]

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        saved = getattr(fused, name)
        setattr(fused, name, value)
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(fused, name, saved)
    return wrapped


BUILDERS = {
    "triton": functools.partial(_ours, "triton"),
    "triton_seqbwd": functools.partial(_ours, "triton"),
    "triton_worklist": functools.partial(_ours, "triton"),
    "reference": functools.partial(_ours, "reference"),
    "sdpa_padded": _sdpa_padded,
    "xformers": _xformers,
    "torch_varlen": _torch_varlen,
    "flex": _flex,
}

PEERS_THAT_MAY_FAIL = {"xformers", "torch_varlen", "flex"}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _peer_guard(impl: str, fn):
    """Run fn(); a peer that cannot run this case is skipped with the error as the reason
    (our own paths, triton and reference, fail instead)."""
    try:
        return fn()
    except Exception as e:
        if impl in PEERS_THAT_MAY_FAIL and not isinstance(e, pytest.skip.Exception):
            reason = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
            pytest.skip(f"{impl} failed on this case: {type(e).__name__}: {reason[:1500]}")
        raise


def _bench(site, mode, impl, op, device, measure):
    if impl.startswith("triton"):
        common.skip_unless_cuda("triton varlen_attention", triton=True)
    c = case_for(device, site, mode)
    prepare, run, unpack = _peer_guard(impl, lambda: BUILDERS[impl](c))
    q0, k0, v0 = c.sets[0]
    bf16 = q0.dtype == torch.bfloat16
    got = _peer_guard(impl, lambda: unpack(run(*prepare(q0, k0, v0))))
    want = kernels.varlen_attention(q0, k0, v0, c.cu, c.max_len, impl="reference", validate=False)
    err = _rel_err(got, want)
    tol = 2e-2 if bf16 else 1e-4
    assert err < tol, f"{impl} output differs from the reference: relative error {err:.3g} >= {tol}"
    extra = {"rel_err_vs_reference": err}
    if impl == "xformers":
        extra["xformers_op"] = _xformers_op_name(c)
        extra.update({f"xformers_{k}": v for k, v in XFORMERS_NOTES.items()})

    if op == "fwd":
        prepared = [prepare(q, k, v) for q, k, v in c.sets]
        fn = common.Cycle([_with_option(impl, functools.partial(run, *p)) for p in prepared])
        leaves = None
    else:
        calls, leaves = [], []
        for i, (q, k, v) in enumerate(c.sets):
            p = [t.detach().requires_grad_() for t in prepare(q, k, v)]
            d_t = torch.randn_like(q)
            dout = prepare(d_t, d_t, d_t)[0]  # zeros at padded rows, so padding adds no gradient

            def step(p=p, dout=dout):
                run(*p).backward(dout)

            step = _with_option(impl, step)

            if i == 0:  # gradients of the first set against the reference path's
                _peer_guard(impl, step)
                ref = [t.detach().requires_grad_() for t in (q, k, v)]
                kernels.varlen_attention(*ref, c.cu, c.max_len, impl="reference", validate=False).backward(d_t)
                for name, a, b in zip("qkv", p, ref):
                    e = _rel_err(unpack(a.grad), b.grad)
                    gtol = 5e-2 if bf16 else 1e-4
                    assert e < gtol, f"{impl} d{name} differs from the reference: relative error {e:.3g} >= {gtol}"
                    extra[f"rel_err_d{name}"] = e
                    a.grad = None
            calls.append(step)
            leaves += p
        fn = common.Cycle(calls)
    T = sum(c.lengths)
    padded = len(c.lengths) * c.max_len**2
    measure(
        SUITE,
        c.label,
        op,
        impl,
        fn,
        flops=common.attention_flops(c.lengths, c.heads, c.head_dim, op),
        bytes_moved=common.attention_bytes(T, c.heads, c.head_dim, c.elem, op),
        grad_to_none=leaves,
        rotated_sets=len(c.sets),
        padded_work_ratio=padded / sum(s * s for s in c.lengths),
        **extra,
    )


@pytest.mark.parametrize("op", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "flex"])
@pytest.mark.parametrize("mode", SCALE.modes)
@pytest.mark.parametrize("site", ["enc", "pred"])
def test_varlen_attention(site, mode, impl, op, device, measure):
    if impl == "triton_seqbwd" and op == "fwd":
        pytest.skip("triton_seqbwd differs from triton in the backward only")
    _bench(site, mode, impl, op, device, measure)


# FlexAttention last: it compiles per shape (tens of seconds), so a suite cut by its time budget
# loses only these cases.
@pytest.mark.parametrize("op", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("mode", SCALE.modes)
@pytest.mark.parametrize("site", ["enc", "pred"])
def test_varlen_attention_flex(site, mode, op, device, measure):
    _bench(site, mode, "flex", op, device, measure)
