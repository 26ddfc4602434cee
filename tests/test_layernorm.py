"""layer_norm (optional fused residual add): Triton path (interpreter on CPU) against the PyTorch reference.

Tolerance (DESIGN.md): every output and gradient of the Triton path is within 2x the error of the
PyTorch reference run in the same precision, both measured against the reference in float64. Both
compute the statistics in fp32 and round the outputs once to their dtype; they differ in the order
of the sums (the row reductions, and dweight / dbias, which the Triton path sums as per-program
partials added afterwards) and of a few products (dweight = dy * xhat: PyTorch's CPU kernel forms
xhat as rstd * x - rstd * mean, the Triton kernel as (x - mean) * rstd).

Floor: where a result is only a few fp32 roundings away from fp64 (fp32 outputs of short rows, dweight
of 1 or 7 rows), each path's max error is 1-2 fp32 ulps and the ratio of the two is noise (measured:
dweight of one row at 2.6x the reference's error, both under 1 ulp). So every comparison also allows
2 fp32 ulps of the largest gold value (over 10 seeds of every case here at most 0.5 ulp was needed);
an error the rounding itself does not explain stays visible. Without the floor every other case
(fp16, and the longer rows and sums) measured within 1.8x (seed 0).
"""

import pytest
import torch
import torch.nn as nn
from helpers import DEVICE, assert_within_baseline, requires_cuda
from torch._subclasses.fake_tensor import FakeTensorMode

from kernels import layer_norm
from kernels.layernorm import MAX_DIM, fused, layer_norm_ref

FLOAT_DTYPES = [torch.float32, torch.float16]
FACTOR = 2
ULPS = 2  # the floor, in fp32 ulps of the largest gold value (see above)
# awkward on purpose: one row, odd row counts, non-power-of-2 widths, a [B, N, D] input
SHAPES = [(1, 48), (7, 192), (333, 200), (3, 37, 24)]


@pytest.fixture
def allocations(monkeypatch):
    """Shapes of the buffers the Triton path allocates through the toolkit's allocator, which
    (conftest's autouse poison fixture) fills them with NaN, so an element no program wrote fails."""
    shapes = []
    real = fused.new_output

    def recording(shape, dtype, device):
        shapes.append(tuple(shape))
        return real(shape, dtype, device)

    monkeypatch.setattr(fused, "new_output", recording)
    return shapes


def _inputs(shape, dtype, gen, affine="both", residual=False, param_dtype=torch.float32):
    D = shape[-1]
    x = (3 + 2 * torch.randn(shape, generator=gen)).to(dtype)  # an offset mean: the variance is two-pass
    w = (1 + 0.5 * torch.randn(D, generator=gen)).to(param_dtype) if affine in ("both", "weight") else None
    b = (0.5 * torch.randn(D, generator=gen)).to(param_dtype) if affine in ("both", "bias") else None
    r = torch.randn(shape, generator=gen).to(dtype) if residual else None
    gy = torch.randn(shape, generator=gen).to(dtype)
    gs = torch.randn(shape, generator=gen).to(dtype) if residual else None
    move = lambda t: None if t is None else t.to(DEVICE)
    return tuple(map(move, (x, w, b, r, gy, gs)))


def _run(impl, x, w, b, r, gy, gs, eps=1e-5, upcast=False):
    """Outputs and gradients of every tensor input: [y, (s), dx, (dw), (db), (dres)]."""
    cast = (lambda t: None if t is None else t.double()) if upcast else (lambda t: t)
    leaves = [None if t is None else cast(t).detach().clone().requires_grad_(True) for t in (x, w, b, r)]
    x, w, b, r = leaves
    out = layer_norm(x, w, b, eps, residual=r, impl=impl)
    outs, grads = ([out], [cast(gy)]) if r is None else (list(out), [cast(gy), cast(gs)])
    inputs = [t for t in leaves if t is not None]
    return outs + list(torch.autograd.grad(outs, inputs, grads))


def _within(t, lo, gold, name):
    floor = ULPS * torch.finfo(torch.float32).eps * gold.abs().max().item()
    assert_within_baseline(t, lo, gold, FACTOR, floor=floor, name=name)


def _names(w, b, r):
    names = ["y"] + (["s"] if r is not None else []) + ["dx"]
    return names + (["dweight"] if w is not None else []) + (["dbias"] if b is not None else []) + \
        (["dresidual"] if r is not None else [])


def _check_against_fp64(shape, dtype, affine, residual, gen, eps=1e-5):
    args = _inputs(shape, dtype, gen, affine, residual)
    tri = _run("triton", *args, eps=eps)
    ref = _run("reference", *args, eps=eps)
    gold = _run("reference", *args, eps=eps, upcast=True)
    x, w, b, r = args[:4]
    for name, t, lo, g in zip(_names(w, b, r), tri, ref, gold):
        like = {"dweight": w, "dbias": b, "dresidual": r, "s": r}.get(name, x)
        assert t.dtype == like.dtype and t.shape == like.shape, name
        assert torch.isfinite(t).all(), name
        _within(t, lo, g, f"{name} {tuple(shape)} {dtype}")
    return tri, args


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_matches_fp64_within_2x(shape, dtype, residual, allocations):
    gen = torch.Generator().manual_seed(0)
    tri, args = _check_against_fp64(shape, dtype, "both", residual, gen)
    assert allocations, "the NaN-poisoning allocator was not used"
    again = _run("triton", *args)
    assert all(torch.equal(a, c) for a, c in zip(tri, again)), "the Triton path is not deterministic"


@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
@pytest.mark.parametrize("residual", [False, True])
def test_partial_affine(affine, residual):
    """nn.LayerNorm(bias=False), elementwise_affine=False, and a shift without a scale."""
    _check_against_fp64((7, 48), torch.float32, affine, residual, torch.Generator().manual_seed(1))


def test_param_dtype_equal_to_input_fp16():
    """fp16 weight and bias (a model cast to half) beside fp16 activations."""
    gen = torch.Generator().manual_seed(2)
    args = _inputs((33, 200), torch.float16, gen, residual=True, param_dtype=torch.float16)
    tri, ref = _run("triton", *args), _run("reference", *args)
    gold = _run("reference", *args, upcast=True)
    for name, t, lo, g in zip(_names(*args[1:4]), tri, ref, gold):
        assert t.dtype == torch.float16, name
        _within(t, lo, g, name)


def test_residual_in_another_dtype():
    """fp16 branch output added into an fp32 residual stream: s is fp32, y fp16, dres fp32, dx fp16."""
    gen = torch.Generator().manual_seed(3)
    x, w, b, _, gy, _ = _inputs((21, 48), torch.float16, gen)
    r = torch.randn(21, 48, generator=gen).to(DEVICE)
    gs = torch.randn(21, 48, generator=gen).to(DEVICE)
    tri = _run("triton", x, w, b, r, gy, gs)
    ref = _run("reference", x, w, b, r, gy, gs)
    gold = _run("reference", x, w, b, r, gy, gs, upcast=True)
    dtypes = [torch.float16, torch.float32, torch.float16, torch.float32, torch.float32, torch.float32]
    for name, t, lo, g, dt in zip(_names(w, b, r), tri, ref, gold, dtypes):
        assert t.dtype == dt, name
        _within(t, lo, g, name)


def test_residual_stream_is_the_plain_add():
    """s is bit-equal to `x + residual` (what the model's reference path computes) and y normalizes it."""
    gen = torch.Generator().manual_seed(4)
    for dtype in FLOAT_DTYPES:
        x, w, b, r, _, _ = _inputs((7, 192), dtype, gen, residual=True)
        y, s = layer_norm(x, w, b, 1e-6, residual=r, impl="triton")
        assert torch.equal(s, x + r)
        y_alone = layer_norm(x + r, w, b, 1e-6, impl="triton")
        assert torch.equal(y, y_alone)


def test_reference_is_nn_layernorm():
    """The reference is the documented function: nn.LayerNorm, bit for bit in fp32."""
    gen = torch.Generator().manual_seed(5)
    x, w, b, r, _, _ = _inputs((2, 7, 48), torch.float32, gen, residual=True)
    ln = nn.LayerNorm(48, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    assert torch.equal(layer_norm_ref(x, w, b, 1e-6), ln(x))
    y, s = layer_norm_ref(x, w, b, 1e-6, residual=r)
    assert torch.equal(s, x + r) and torch.equal(y, ln(x + r))


def test_strided_inputs_and_stride0_grad():
    """A transposed x and residual (read through strides) and out.sum()'s all-stride-0 gradient."""
    gen = torch.Generator().manual_seed(6)
    x = (1 + torch.randn(48, 13, generator=gen)).to(DEVICE).t()
    r = torch.randn(48, 13, generator=gen).to(DEVICE).t()
    w = torch.randn(48, generator=gen).to(DEVICE)
    b = torch.randn(48, generator=gen).to(DEVICE)
    results = []
    for impl in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, r)]
        y, s = layer_norm(*leaves[:3], 1e-5, residual=leaves[3], impl=impl)
        (y.sum() + s.sum()).backward()
        results.append([y, s] + [t.grad for t in leaves])
    for name, t, ref in zip(["y", "s", "dx", "dw", "db", "dres"], *results):
        torch.testing.assert_close(t, ref, rtol=1e-5, atol=1e-5, msg=name)


def test_only_weight_needs_grad():
    gen = torch.Generator().manual_seed(7)
    x, w, b, _, gy, _ = _inputs((9, 24), torch.float32, gen)
    grads = []
    for impl in ("triton", "reference"):
        wl = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(layer_norm(x, wl, b, impl=impl), wl, gy)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_no_rows(device):
    x = torch.randn(0, 48, device=device, requires_grad=True)
    w = torch.ones(48, device=device, requires_grad=True)
    b = torch.zeros(48, device=device, requires_grad=True)
    r = torch.randn(0, 48, device=device, requires_grad=True)
    y, s = layer_norm(x, w, b, residual=r, impl="triton")
    assert y.shape == s.shape == (0, 48)
    (y.sum() + s.sum()).backward()
    assert x.grad.shape == (0, 48) and r.grad.shape == (0, 48)
    assert torch.equal(w.grad, torch.zeros(48)) and torch.equal(b.grad, torch.zeros(48))


def test_no_grad_saves_nothing():
    x = torch.randn(5, 24, device=DEVICE)
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        y = layer_norm(x, w, None, impl="triton")
    assert not y.requires_grad
    torch.testing.assert_close(y, layer_norm(x, w.detach(), None, impl="reference"))


def test_eager_calls_skip_the_op_dispatch(monkeypatch):
    """Eager calls launch through the autograd.Function; the custom ops are for torch.compile only."""

    def no_op(*args, **kwargs):
        raise AssertionError("eager call went through the custom op")

    monkeypatch.setattr(fused, "layer_norm_fwd_op", no_op)
    monkeypatch.setattr(fused, "layer_norm_bwd_op", no_op)
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    y, s = layer_norm(x, None, None, residual=torch.randn(5, 24, device=DEVICE), impl="triton")
    (y.sum() + s.square().sum()).backward()
    assert x.grad is not None


def test_auto_is_reference_on_cpu():
    x = torch.randn(3, 24)
    assert torch.equal(layer_norm(x), layer_norm_ref(x))
    with pytest.raises(ValueError, match="impl"):
        layer_norm(x, impl="cuda")


def _bad_inputs():
    # on the device the Triton path runs on (CUDA, else the CPU interpreter); "meta" is the wrong device
    x = torch.randn(5, 24, device=DEVICE)
    w = torch.randn(24, device=DEVICE)
    return [
        ("x", dict(x=torch.randint(0, 5, (5, 24), device=DEVICE))),
        ("x", dict(x=torch.randn((), device=DEVICE))),
        ("x", dict(x=torch.randn(5, 0, device=DEVICE))),
        ("x", dict(x=[[1.0, 2.0]])),
        ("weight", dict(weight=torch.randn(23, device=DEVICE))),
        ("weight", dict(weight=torch.randn(1, 24, device=DEVICE))),
        ("weight", dict(weight=torch.randn(24, device="meta"))),
        ("weight", dict(weight=torch.ones(24, dtype=torch.int64, device=DEVICE))),
        ("weight", dict(weight=[1.0] * 24)),
        ("bias", dict(bias=torch.randn(25, device=DEVICE))),
        ("bias", dict(bias=torch.randn(24, device="meta"))),
        ("eps", dict(eps=-1e-5)),
        ("eps", dict(eps=float("nan"))),
        ("eps", dict(eps="1e-5")),
        ("eps", dict(eps=True)),
        ("residual", dict(residual=torch.randn(5, 23, device=DEVICE))),
        ("residual", dict(residual=torch.randn(24, device=DEVICE))),
        ("residual", dict(residual=torch.randn(5, 24, device="meta"))),
        ("residual", dict(residual=torch.ones(5, 24, dtype=torch.int32, device=DEVICE))),
        ("residual", dict(residual=x.tolist())),
    ], x, w


def _triton_only_bad_inputs():
    x = torch.randn(5, 24, device=DEVICE)
    return [
        ("x", dict(x=x.double())),
        ("x", dict(x=torch.randn(2, MAX_DIM + 1, device=DEVICE))),
        ("weight", dict(weight=torch.randn(24, dtype=torch.float64, device=DEVICE))),
        ("residual", dict(residual=x.double())),
    ] + ([("x", dict(x=x.bfloat16()))] if DEVICE.type == "cpu" else []), x


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("k", range(len(_bad_inputs()[0])))
def test_bad_input_raises(impl, k, monkeypatch):
    cases, x, w = _bad_inputs()
    name, bad = cases[k]

    def no_work(*args, **kwargs):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(fused, "layer_norm_triton", no_work)
    args = dict(x=x, weight=w, bias=None, eps=1e-5, residual=None) | bad
    with pytest.raises(ValueError, match=rf": {name}\b"):
        layer_norm(**args, impl=impl)


@pytest.mark.parametrize("k", range(len(_triton_only_bad_inputs()[0])))
def test_bad_input_for_triton_raises(k, monkeypatch):
    """Inputs the reference takes (fp64, very wide rows, bf16 off CUDA) but the Triton path does not."""
    cases, x = _triton_only_bad_inputs()
    name, bad = cases[k]
    monkeypatch.setattr(fused, "layer_norm_triton", None)
    args = dict(x=x, weight=None, bias=None, eps=1e-5, residual=None) | bad
    with pytest.raises(ValueError, match=rf": (impl='triton' .*)?{name}\b"):
        layer_norm(**args, impl="triton")
    layer_norm(**args, impl="reference")  # the reference path computes these


# ------------------------------------------------------------------------------- custom ops


def test_opcheck():
    # schema, fake impl, autograd registration and AOT dispatch, run for real through the interpreter
    gen = torch.Generator().manual_seed(8)
    x, w, b, r, gy, gs = _inputs((2, 7, 48), torch.float32, gen, residual=True)
    for args in ((x, w, b, None, 1e-5), (x, w, b, r, 1e-6), (x, None, None, r, 1e-5), (x, w, None, None, 0.1)):
        torch.library.opcheck(fused.layer_norm_fwd_op, args)
    # inputs that need grad: opcheck also runs the autograd formula registered on the forward op
    grad_args = [None if t is None else t.clone().requires_grad_(True) for t in (x, w, b, r)]
    torch.library.opcheck(fused.layer_norm_fwd_op, (*grad_args, 1e-5))
    y, s, mean, rstd = fused.layer_norm_fwd_op(x, w, b, r, 1e-5)
    torch.library.opcheck(fused.layer_norm_bwd_op, (gy, gs, s, w, mean, rstd, True, True, True))
    torch.library.opcheck(fused.layer_norm_bwd_op, (gy, None, x, None, mean, rstd, False, False, False))
    r16 = r.half()
    y, s, mean, rstd = fused.layer_norm_fwd_op(x, w, b, r16, 1e-5)
    torch.library.opcheck(fused.layer_norm_bwd_op, (gy, gs.half(), s, w, mean, rstd, True, True, False))


@pytest.mark.parametrize("residual_dtype", [None, torch.float32, torch.float16])
def test_fake_shapes(residual_dtype):
    """The fake impls give the shapes and dtypes the kernels produce, without running anything."""
    with FakeTensorMode():
        x = torch.empty(4, 9, 40, dtype=torch.float16)
        w = torch.empty(40)
        r = None if residual_dtype is None else torch.empty(4, 9, 40, dtype=residual_dtype)
        y, s, mean, rstd = fused.layer_norm_fwd_op(x, w, w, r, 1e-5)
        assert y.shape == x.shape and y.dtype == torch.float16
        assert s.shape == ((0,) if r is None else x.shape) and s.dtype == (x.dtype if r is None else r.dtype)
        assert mean.shape == rstd.shape == (36,) and mean.dtype == rstd.dtype == torch.float32
        dx, dres, dw, db = fused.layer_norm_bwd_op(y, s if r is not None else None, s if r is not None else x, w,
                                                   mean, rstd, r is not None, True, False)
        assert dx.shape == x.shape and dx.dtype == torch.float16
        split = r is not None and r.dtype != x.dtype
        assert dres.shape == (x.shape if split else (0,)) and dw.shape == (40,) and db.shape == (0,)
        assert dw.dtype == db.dtype == torch.float32
        # the public entry point under a dispatch mode takes the custom op, not the direct launch
        y, s = layer_norm(x.float(), w, None, residual=x.float(), impl="triton")
        assert y.shape == s.shape == x.shape and y.dtype == s.dtype == torch.float32
    # the meta device dispatches to the same fake impl
    x = torch.empty(3, 200, device="meta")
    y, s, mean, rstd = fused.layer_norm_fwd_op(x, None, None, x, 1e-5)
    assert y.device.type == "meta" and y.shape == s.shape == (3, 200) and mean.shape == (3,)


def test_compile_fullgraph():
    """The custom ops keep torch.compile's graph whole (fullgraph raises on a break); forward and
    backward through the ops equal the eager autograd.Function's, bit for bit."""
    gen = torch.Generator().manual_seed(9)
    x, w, b, r, _, _ = _inputs((7, 48), torch.float32, gen, residual=True)

    def step(x, w, b, r):
        y, s = layer_norm(x, w, b, 1e-6, residual=r, impl="triton")
        return (y * s).sum() + layer_norm(s, w, None, impl="triton").square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, r)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# ------------------------------------------------------------------------------- CUDA only


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(128 * 512, 768), (4099, 384), (5, 1280)])
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_large(shape, dtype, residual):
    _check_against_fp64(shape, dtype, "both", residual, torch.Generator().manual_seed(10), eps=1e-6)
