"""masked_gather / gather_layer_norm: Triton path (interpreter on CPU) against the PyTorch reference."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_within_baseline, requires_cuda

from kernels.gather import fused, gather_layer_norm, gather_segments, masked_gather, masked_gather_ref

FLOAT_DTYPES = [torch.float32, torch.float16]
# DESIGN.md's rule, unchanged: the gathers copy exactly, and the scatter-add backward and the
# layer norm sum in another order than torch, so their error vs fp64 is held to 2x torch's own.
FACTOR = 2


@pytest.fixture
def allocations(monkeypatch):
    """Shapes of the buffers the Triton path allocates through the toolkit's allocator, which
    (conftest's autouse poison fixture) fills them with NaN, so an unwritten row fails."""
    shapes = []
    real = fused.new_output

    def recording(shape, dtype, device):
        shapes.append(shape)
        return real(shape, dtype, device)

    monkeypatch.setattr(fused, "new_output", recording)
    return shapes


def _grads(fn, x, pos, index, g):
    x = x.detach().clone().requires_grad_(True)
    pos = None if pos is None else pos.detach().clone().requires_grad_(True)
    out = fn(x, index, pos)
    inputs = (x,) if pos is None else (x, pos)
    return out, torch.autograd.grad(out, inputs, g)


def _tri(x, index, pos=None):
    return masked_gather(x, index, pos, impl="triton")


def _ref(x, index, pos=None):
    return masked_gather(x, index, pos, impl="reference")


def _case(name, device, dtype, gen):
    """(x, index, pos) for the awkward shapes the issue names."""
    if name == "random":  # N not a power of two, odd D, a subset per sample
        B, N, D = 3, 37, 24
        index = torch.cat([b * N + torch.randperm(N, generator=gen)[:9] for b in range(B)])
    elif name == "T1_D200":
        B, N, D = 2, 5, 200
        index = torch.tensor([7])
    elif name == "all_tokens":
        B, N, D = 2, 7, 24
        index = torch.randperm(B * N, generator=gen)
    elif name == "single_token":
        B, N, D = 1, 1, 24
        index = torch.tensor([0])
    else:
        raise KeyError(name)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    pos = torch.randn(N, D, generator=gen).to(dtype)
    return x.to(device), index.to(device), pos.to(device)


CASES = ["random", "T1_D200", "all_tokens", "single_token"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_pos", [True, False])
def test_forward_exact(case, dtype, with_pos, device, allocations):
    gen = torch.Generator().manual_seed(0)
    x, index, pos = _case(case, device, dtype, gen)
    pos = pos if with_pos else None
    out = _tri(x, index, pos)
    assert out.shape == (index.numel(), x.shape[-1]) and out.is_contiguous()
    assert torch.equal(out, _ref(x, index, pos))
    assert allocations, "the NaN-poisoning allocator was not used"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_forward_2d_x_and_strided_x(dtype, device):
    gen = torch.Generator().manual_seed(1)
    # [R, D] rows with a pos table of period P (R = 3 * P)
    x2 = torch.randn(33, 24, generator=gen).to(dtype).to(device)
    pos = torch.randn(11, 24, generator=gen).to(dtype).to(device)
    index = torch.tensor([32, 0, 11, 5, 5], device=device)
    assert torch.equal(_tri(x2, index, pos), _ref(x2, index, pos))
    # a transposed (non-contiguous) x and pos
    xt = torch.randn(2, 24, 13, generator=gen).to(dtype).to(device).transpose(1, 2)
    pt = torch.randn(24, 13, generator=gen).to(dtype).to(device).t()
    index = torch.tensor([0, 25, 13, 12], device=device)
    assert torch.equal(_tri(xt, index, pt), _ref(xt, index, pt))


def test_mask_token_use(device):
    """Predictor input: mask_token expanded over [B, N, D] (stride 0) + pos at target indices."""
    gen = torch.Generator().manual_seed(2)
    B, N, D = 2, 9, 24
    pos = torch.randn(N, D, generator=gen).to(device)
    token = torch.randn(1, 1, D, generator=gen).to(device)
    index = torch.tensor([1, 2, 10, 17], device=device)
    g = torch.randn(4, D, generator=gen).to(device)
    outs = []
    for fn in (_tri, _ref):
        t = token.clone().requires_grad_(True)
        out = fn(t.expand(B, N, D), index, pos)
        (gt,) = torch.autograd.grad(out, t, g)
        outs.append((out, gt))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_exact_with_duplicates(dtype, device):
    """At most two contributions per row of x and of pos: summation order cannot matter."""
    gen = torch.Generator().manual_seed(3)
    B, N, D = 2, 13, 24
    # sample 0: n in {0, 1, 2, 3, 3}; sample 1: n in {5, 6, 7, 0}
    index = torch.tensor([0, 1, 2, 3, 3, N + 5, N + 6, N + 7, N + 0], device=device)
    assert torch.bincount(index).max() == 2 and torch.bincount(index % N).max() == 2
    x = torch.randn(B, N, D, generator=gen).to(dtype).to(device)
    pos = torch.randn(N, D, generator=gen).to(dtype).to(device)
    g = torch.randn(index.numel(), D, generator=gen).to(dtype).to(device)
    out_t, (gx_t, gp_t) = _grads(_tri, x, pos, index, g)
    out_r, (gx_r, gp_r) = _grads(_ref, x, pos, index, g)
    assert torch.equal(out_t, out_r)
    assert torch.equal(gx_t, gx_r)
    assert torch.equal(gp_t, gp_r)
    # rows nobody gathered get an exact zero gradient, not garbage
    untouched = torch.ones(B * N, dtype=torch.bool, device=device)
    untouched[index] = False
    assert gx_t.reshape(-1, D)[untouched].eq(0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_many_duplicates(dtype, device):
    """Overlapping target blocks: rows gathered up to 6 times, pos rows up to 12 times.

    Rule (DESIGN.md): error vs an fp64 reference at most 2x that of the PyTorch
    reference run in the same precision.
    """
    gen = torch.Generator().manual_seed(4)
    B, N, D = 2, 7, 200
    index = torch.cat([torch.randint(0, B * N, (30,), generator=gen), torch.full((5,), 3)])
    index = index.to(device)
    assert torch.bincount(index).max() >= 6
    _check_grads_against_fp64(B, N, D, index, dtype, device, gen)


def _check_grads_against_fp64(B, N, D, index, dtype, device, gen):
    """x and pos gradients of the Triton path within 2x the same-precision reference's error
    against fp64 (DESIGN.md); returns the Triton gradients."""
    x = torch.randn(B, N, D, generator=gen).to(dtype).to(device)
    pos = torch.randn(N, D, generator=gen).to(dtype).to(device)
    g = torch.randn(index.numel(), D, generator=gen).to(dtype).to(device)
    _, (gx_t, gp_t) = _grads(_tri, x, pos, index, g)
    _, (gx_r, gp_r) = _grads(_ref, x, pos, index, g)
    _, (gx_64, gp_64) = _grads(_ref, x.double(), pos.double(), index, g.double())
    for name, got, low, exact in (("grad x", gx_t, gx_r, gx_64), ("grad pos", gp_t, gp_r, gp_64)):
        assert torch.isfinite(got).all()
        assert_within_baseline(got, low, exact, FACTOR, name=name)
    again = _grads(_tri, x, pos, index, g)[1]
    assert all(torch.equal(a, b) for a, b in zip(again, (gx_t, gp_t)))  # deterministic
    return gx_t, gp_t


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_long_segments_split(dtype, device, allocations):
    """pos rows gathered ~30 times each (every token of 24 samples, some twice): the pos gradient
    sums its long segments in several splits (fp32 partials, then a fixed-order sum). Same rule
    as above against fp64; the NaN-poisoned partial buffer catches a split that wrote nothing."""
    gen = torch.Generator().manual_seed(11)
    B, N, D = 24, 5, 40
    index = torch.cat([torch.arange(B * N), torch.randint(0, B * N, (37,), generator=gen)]).to(device)
    assert fused._bwd_splits(index.numel(), N) > 1 and fused._bwd_splits(index.numel(), B * N) == 1
    _check_grads_against_fp64(B, N, D, index, dtype, device, gen)
    assert any(shape[0] > N for shape in allocations), "no split partial buffer was allocated"


def test_backward_of_sum_stride0_grad(device):
    """out.sum() hands the backward an expanded (all strides 0) gradient."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 6, 24, generator=gen).to(device)
    pos = torch.randn(6, 24, generator=gen).to(device)
    index = torch.tensor([0, 7, 7, 11], device=device)
    grads = []
    for fn in (_tri, _ref):
        xr, pr = x.clone().requires_grad_(True), pos.clone().requires_grad_(True)
        fn(xr, index, pr).sum().backward()
        grads.append((xr.grad, pr.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_backward_deterministic(device):
    gen = torch.Generator().manual_seed(5)
    index = torch.randint(0, 20, (40,), generator=gen).to(device)
    x = torch.randn(4, 5, 24, generator=gen).to(device)
    pos = torch.randn(5, 24, generator=gen).to(device)
    g = torch.randn(40, 24, generator=gen).to(device)
    _, first = _grads(_tri, x, pos, index, g)
    _, second = _grads(_tri, x, pos, index, g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("D,index", [(24, [0, 9, 9, 40]), (200, [3]), (24, list(range(42)))])
def test_gather_layer_norm(dtype, D, index, device):
    gen = torch.Generator().manual_seed(6)
    x = (3 + 2 * torch.randn(2, 21, D, generator=gen)).to(dtype).to(device)
    index = torch.tensor(index, device=device)
    out = gather_layer_norm(x, index, impl="triton")
    ref = gather_layer_norm(x, index, impl="reference")
    exact = F.layer_norm(x.double().reshape(-1, D), (D,), eps=1e-5)[index]
    assert out.dtype == dtype and out.shape == (index.numel(), D) and not out.requires_grad
    assert_within_baseline(out, ref, exact, FACTOR, name="layer norm")
    # and the reference is the documented function: layer-norm everything, then gather
    full = F.layer_norm(x.float().reshape(-1, D), (D,), eps=1e-5)[index].to(dtype)
    assert torch.equal(ref, full)


def test_empty_index(device):
    x = torch.randn(2, 3, 24, device=device)
    index = torch.empty(0, dtype=torch.int64, device=device)
    assert _tri(x, index).shape == (0, 24)
    assert gather_layer_norm(x, index, impl="triton").shape == (0, 24)


def test_auto_is_reference_on_cpu():
    x = torch.randn(2, 3, 24)
    index = torch.tensor([1])
    assert torch.equal(masked_gather(x, index), masked_gather_ref(x, index))
    with pytest.raises(ValueError, match="impl"):
        masked_gather(x, index, impl="cuda")


def _bad_inputs():
    # on the device the Triton path runs on (CUDA, else the CPU interpreter); "meta" is the wrong device
    x = torch.randn(2, 5, 24, device=DEVICE)
    pos = torch.randn(5, 24, device=DEVICE)
    i = torch.tensor([0, 9], device=DEVICE)
    return [
        ("index", x, i.to(torch.int32), None),
        ("index", x, i.float(), None),
        ("index", x, i[None], None),
        ("index", x, torch.tensor([0, 10], device=DEVICE), None),
        ("index", x, torch.tensor([-1, 0], device=DEVICE), None),
        ("index", x, torch.tensor([0, 1], device="meta"), None),
        ("x", torch.randint(0, 5, (2, 5, 24), device=DEVICE), i, None),
        ("x", torch.randn(24, device=DEVICE), i, None),
        ("x", torch.randn(1, 2, 5, 24, device=DEVICE), i, None),
        ("pos", x, i, torch.randn(4, 24, device=DEVICE)),
        ("pos", x, i, torch.randn(5, 23, device=DEVICE)),
        ("pos", x, i, pos.double()),
        ("pos", x, i, torch.randn(5, 24, device="meta")),
        ("pos", x, i, torch.randn(5, 24, 1, device=DEVICE)),
    ]


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("k", range(len(_bad_inputs())))
def test_bad_input_raises(impl, k, monkeypatch):
    name, x, index, pos = _bad_inputs()[k]

    def no_work(*args, **kwargs):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(fused, "masked_gather_triton", no_work)
    with pytest.raises(ValueError, match=rf": {name}\b"):
        masked_gather(x, index, pos, impl=impl)
    if pos is None:
        monkeypatch.setattr(fused, "gather_layer_norm_triton", no_work)
        with pytest.raises(ValueError, match=rf": {name}\b"):
            gather_layer_norm(x, index, impl=impl)


def test_validate_false_skips_range_check(monkeypatch):
    def no_sync(*args, **kwargs):
        raise AssertionError("validate=False must not read index values")

    monkeypatch.setattr(torch, "aminmax", no_sync)
    x = torch.randn(2, 5, 24, device=DEVICE)
    index = torch.tensor([0, 9], device=DEVICE)
    assert torch.equal(
        masked_gather(x, index, impl="triton", validate=False),
        masked_gather(x, index, impl="reference", validate=False),
    )


def test_opcheck(device):
    x = torch.randn(2, 5, 24, device=device)
    pos = torch.randn(5, 24, device=device)
    index = torch.tensor([0, 3, 3, 9], device=device)
    perm, rowptr = gather_segments(index, 10)
    torch.library.opcheck(torch.ops.ajepa.masked_gather_fwd.default, (x, index, pos, 5, None, None))
    torch.library.opcheck(torch.ops.ajepa.masked_gather_fwd.default, (x, index, None, 5, perm, rowptr))
    g = torch.randn(4, 24, device=device)
    torch.library.opcheck(torch.ops.ajepa.masked_gather_bwd.default, (g, perm, rowptr, 10))
    torch.library.opcheck(torch.ops.ajepa.gather_layer_norm.default, (x, index, 1e-5))
    # inputs that need grad: opcheck also runs the autograd formula registered on the forward op
    x, pos = x.requires_grad_(), pos.requires_grad_()
    torch.library.opcheck(torch.ops.ajepa.masked_gather_fwd.default, (x, index, pos, 5, None, None))
    torch.library.opcheck(torch.ops.ajepa.masked_gather_fwd.default, (x, index, None, 5, None, None))
    torch.library.opcheck(torch.ops.ajepa.masked_gather_fwd.default, (x, index, pos, 5, perm, rowptr))


@pytest.mark.parametrize("case", CASES + ["duplicates"])
def test_segments_plan_gives_the_same_backward_and_no_sort(case, device, monkeypatch):
    """With gather_segments(index) shipped in, the Triton backward equals the device-sorted one bit for
    bit, and it launches no sort (the host-time fix: pack_masks sorts in the loader instead)."""
    gen = torch.Generator().manual_seed(3)
    if case == "duplicates":  # the predictor's pattern: each context repeated once per target block
        x, pos = torch.randn(2, 6, 24, generator=gen), None
        index = torch.tensor([0, 1, 2, 0, 1, 2, 5, 7, 8, 7, 8, 11, 11, 11])
        x, index = x.to(device), index.to(device)
    else:
        x, index, _ = _case(case, device, torch.float32, gen)
        pos = None
    g = torch.randn(index.numel(), x.shape[-1], generator=gen).to(device)
    plan = gather_segments(index, x.shape[:-1].numel())
    _, (want,) = _grads(_tri, x, pos, index, g)

    def no_sort(*args, **kwargs):
        raise AssertionError("the backward sorted although a plan was given")

    monkeypatch.setattr(torch, "sort", no_sort)
    _, (got,) = _grads(lambda x, i, p: masked_gather(x, i, p, impl="triton", segments=plan, validate=False),
                       x, pos, index, g)
    assert torch.equal(got, want)


def test_gather_segments_values():
    index = torch.tensor([4, 1, 4, 0, 1, 4])
    perm, rowptr = gather_segments(index, 6)
    assert perm.tolist() == [3, 1, 4, 0, 2, 5]  # stable: equal rows keep their order
    assert rowptr.tolist() == [0, 1, 3, 3, 3, 6, 6]
    empty_perm, empty_ptr = gather_segments(torch.empty(0, dtype=torch.int64), 3)
    assert empty_perm.numel() == 0 and empty_ptr.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="gather_segments: index values must lie in"):
        gather_segments(index, 4)
    with pytest.raises(ValueError, match="gather_segments: n_rows"):
        gather_segments(index, -1)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_segments_name_the_argument(impl, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(fused, "masked_gather_triton", no_work)
    x = torch.randn(2, 5, 24, device=DEVICE)
    index = torch.tensor([0, 3, 3, 9], device=DEVICE)
    perm, rowptr = gather_segments(index, 10)
    bad = [
        ("segments", perm),  # not a pair
        ("segments perm", (perm.int(), rowptr)),
        ("segments rowptr", (perm, rowptr.float())),
        ("segments", (perm, rowptr[:-1])),  # rows of another x
        ("segments", (perm[:3], rowptr)),  # a 1-D int64 perm of the wrong length
    ]
    for name, segments in bad:
        with pytest.raises(ValueError, match=rf"masked_gather: {name}\b"):
            masked_gather(x, index, impl=impl, segments=segments)
    stale = gather_segments(torch.tensor([0, 3, 4, 9], device=DEVICE), 10)  # another index's plan
    with pytest.raises(ValueError, match="segments do not match index"):
        masked_gather(x, index, impl=impl, segments=stale)


def test_eager_calls_skip_the_op_dispatch(monkeypatch):
    """Eager calls launch through the autograd.Function; the custom ops are for torch.compile only."""

    def no_op(*args, **kwargs):
        raise AssertionError("eager call went through the custom op")

    for name in ("masked_gather_fwd_op", "masked_gather_bwd_op", "gather_layer_norm_op"):
        monkeypatch.setattr(fused, name, no_op)
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    pos = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    index = torch.tensor([0, 3, 3, 9], device=DEVICE)
    masked_gather(x, index, pos, impl="triton").square().sum().backward()
    assert x.grad is not None and pos.grad is not None
    gather_layer_norm(x.detach(), index, impl="triton")


def test_compile_fullgraph(device):
    """The op is opaque to torch.compile: no graph break, forward and backward match eager."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 24, generator=gen).to(device)
    pos = torch.randn(5, 24, generator=gen).to(device)
    index = torch.tensor([0, 3, 3, 9], device=device)

    def loss(x, pos, index):
        return (masked_gather(x, index, pos, impl="triton", validate=False) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ps = [pos.clone().requires_grad_(True) for _ in range(2)]
    compiled(xs[0], ps[0], index).backward()
    loss(xs[1], ps[1], index).backward()
    assert torch.equal(xs[0].grad, xs[1].grad) and torch.equal(ps[0].grad, ps[1].grad)


@requires_cuda
@pytest.mark.parametrize("case", CASES)
def test_bf16_cuda(case):
    gen = torch.Generator().manual_seed(8)
    x, index, pos = _case(case, torch.device("cuda"), torch.bfloat16, gen)
    assert torch.equal(_tri(x, index, pos), _ref(x, index, pos))
    g = torch.randn(index.numel(), x.shape[-1], generator=gen).to(torch.bfloat16).cuda()
    _, (gx_t, gp_t) = _grads(_tri, x, pos, index, g)
    _, (gx_r, gp_r) = _grads(_ref, x, pos, index, g)
    _, (gx_64, gp_64) = _grads(_ref, x.double(), pos.double(), index, g.double())
    for name, got, low, exact in (("grad x", gx_t, gx_r, gx_64), ("grad pos", gp_t, gp_r, gp_64)):
        assert_within_baseline(got, low, exact, FACTOR, name=name)
    ln = gather_layer_norm(x, index, impl="triton")
    exact = F.layer_norm(x.double().reshape(-1, x.shape[-1]), (x.shape[-1],))[index]
    ln_ref = gather_layer_norm(x, index, impl="reference")
    assert_within_baseline(ln, ln_ref, exact, FACTOR, name="layer norm")
