"""ema_update: Triton multi-tensor launch (interpreter on CPU) against the I-JEPA per-parameter loop."""

import copy
import inspect

import pytest
import torch
import torch.nn as nn
from helpers import requires_cuda

from kernels.ema import EmaPlan, ema_update, fused

EPS32 = torch.finfo(torch.float32).eps


class TinyViT(nn.Module):
    """A few Linear / LayerNorm / raw Parameter tensors of mixed, odd sizes."""

    def __init__(self, dim=24, hidden=72, tokens=7):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.embed = nn.Linear(48, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 1)
        self.scale = nn.Parameter(torch.ones(1))


def loop_ema(target, online, tau):
    """The I-JEPA update, verbatim in spirit."""
    with torch.no_grad():
        for t, o in zip(target, online):
            t.mul_(tau).add_(o.to(t.dtype), alpha=1 - tau)


def assert_rounding_close(got, want, before, online, tau):
    """Both sides are a couple of roundings of tau*t + (1-tau)*o: allow 2 eps of the terms."""
    bound = 2 * EPS32 * (tau * before.abs() + (1 - tau) * online.float().abs())
    diff = (got - want).abs()
    assert (diff <= bound).all(), (diff - bound).max()


def _perturbed_pair(device, online_dtype):
    torch.manual_seed(0)
    online = TinyViT().to(device)
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    return target, online.to(online_dtype)


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tau", [0.996, 0.5, torch.tensor(0.9)])
def test_tiny_vit_matches_loop(online_dtype, tau, device):
    target, online = _perturbed_pair(device, online_dtype)
    want = [p.detach().clone() for p in target.parameters()]
    before = [p.detach().clone() for p in target.parameters()]
    loop_ema(want, online.parameters(), float(tau))
    ema_update(target.parameters(), online.parameters(), tau, impl="triton")
    for got, w, b, o in zip(target.parameters(), want, before, online.parameters()):
        assert_rounding_close(got.detach(), w, b, o.detach(), float(tau))
        assert not torch.equal(got, b)


def _mixed(device, online_dtype=torch.float32, seed=1):
    """Sizes around the block edge, a 1-element tensor, an empty one, 2-D and 3-D shapes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (fused.BLOCK,), (fused.BLOCK + 1,), (3, 7), (0,), (2 * fused.BLOCK - 1,), (2, 3, 5)]
    target = [torch.randn(s, generator=gen).to(device) for s in shapes]
    online = [torch.randn(s, generator=gen).to(online_dtype).to(device) for s in shapes]
    return target, online


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("online_dtype", [torch.float32, torch.float16])
def test_mixed_sizes(impl, online_dtype, device):
    target, online = _mixed(device, online_dtype)
    before = [t.clone() for t in target]
    want = [t.clone() for t in target]
    loop_ema(want, online, 0.7)
    ema_update(target, online, 0.7, impl=impl)
    for got, w, b, o in zip(target, want, before, online):
        assert_rounding_close(got, w, b, o, 0.7)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_tau_endpoints_exact(impl, device):
    target, online = _mixed(device, torch.float16)
    before = [t.clone() for t in target]
    ema_update(target, online, 1.0, impl=impl)
    assert all(torch.equal(t, b) for t, b in zip(target, before))
    ema_update(target, online, 0.0, impl=impl)
    assert all(torch.equal(t, o.float()) for t, o in zip(target, online))


def test_flat_buffers(device):
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(fused.BLOCK + 77, generator=gen).to(device)
    o = torch.randn(fused.BLOCK + 77, generator=gen).to(device)
    want, before = t.clone(), t.clone()
    loop_ema([want], [o], 0.9)
    ema_update(t, o, 0.9, impl="triton")
    assert_rounding_close(t, want, before, o, 0.9)


class CountLaunches:
    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_one_launch_and_cached_table(monkeypatch, device):
    counter = CountLaunches(fused._ema_update_kernel)
    monkeypatch.setattr(fused, "_ema_update_kernel", counter)
    fused._TABLE_CACHE.clear()
    target, online = _perturbed_pair(device, torch.float32)
    n_params = len(list(target.parameters()))
    assert n_params >= 10
    ema_update(target.parameters(), online.parameters(), 0.99, impl="triton")
    assert counter.launches == 1
    assert len(fused._TABLE_CACHE) == 1
    ema_update(target.parameters(), online.parameters(), 0.98, impl="triton")
    assert counter.launches == 2
    assert len(fused._TABLE_CACHE) == 1, "second step rebuilt the pointer table"


def test_table_follows_new_tensors(device):
    """A parameter swapped for a new tensor (e.g. after a checkpoint load) is updated, not the old one."""
    target, online = _perturbed_pair(device, torch.float32)
    ema_update(target.parameters(), online.parameters(), 0.9, impl="triton")
    old = target.fc1.weight.data
    old_copy = old.clone()
    target.fc1.weight.data = old.clone() + 1
    before = [p.detach().clone() for p in target.parameters()]
    want = [p.detach().clone() for p in target.parameters()]
    loop_ema(want, online.parameters(), 0.9)
    ema_update(target.parameters(), online.parameters(), 0.9, impl="triton")
    assert torch.equal(old, old_copy)
    for got, w, b, o in zip(target.parameters(), want, before, online.parameters()):
        assert_rounding_close(got.detach(), w, b, o.detach(), 0.9)
        assert not torch.equal(got, b)


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_aligned_and_unaligned_storage(online_dtype, shift, device):
    """Views starting `shift` elements into a buffer: shift 0 keeps every pointer 16-byte aligned
    (the vectorized path), 1 and 3 do not (the scalar path). Both must compute the loop's result,
    full blocks and tails alike."""
    n = 2 * fused.BLOCK + 37
    torch.manual_seed(shift)
    tbuf = torch.randn(n + 2 * fused.BLOCK + 32, device=device)
    obuf = torch.randn(tbuf.numel(), device=device).to(online_dtype)
    start2 = 8 * ((n + 15) // 8) + shift  # a second pair, a gap after the first; 16 bytes x 8 apart
    targets = [tbuf[shift:shift + n], tbuf[start2:start2 + fused.BLOCK]]
    onlines = [obuf[shift:shift + n], obuf[start2:start2 + fused.BLOCK]]
    assert fused._table(targets, onlines)[3] == (16 if shift == 0 else 1)
    before = [t.clone() for t in targets]
    want = [t.clone() for t in targets]
    loop_ema(want, onlines, 0.75)
    ema_update(targets, onlines, 0.75, impl="triton")
    for got, w, b, o in zip(targets, want, before, onlines):
        assert_rounding_close(got, w, b, o, 0.75)
    untouched = torch.ones(tbuf.numel(), dtype=torch.bool, device=device)
    untouched[shift:shift + n] = False
    untouched[start2:start2 + fused.BLOCK] = False
    assert torch.isfinite(tbuf).all()
    assert untouched.sum() == tbuf.numel() - n - fused.BLOCK


@pytest.mark.parametrize("with_nonempty", [False, True])
def test_empty_tensors(with_nonempty, device):
    """Zero-element pairs (alone, or beside a real one in another online dtype) are no work, not an error."""
    targets = [torch.zeros(0, device=device), torch.zeros(0, 3, device=device)]
    onlines = [torch.zeros(0, device=device), torch.zeros(0, 3, device=device)]
    if with_nonempty:
        targets.append(torch.ones(5, device=device))
        onlines.append(torch.full((5,), 3.0, device=device, dtype=torch.float16))
    ema_update(targets, onlines, 0.5, impl="triton")
    if with_nonempty:
        assert torch.equal(targets[-1], torch.full((5,), 2.0, device=device))


def test_tau_is_a_runtime_argument():
    params = inspect.signature(fused._ema_update_kernel.fn).parameters
    for name in ("tau", "one_minus_tau"):
        assert params[name].annotation is inspect.Parameter.empty


def test_online_non_contiguous_and_target_contiguity(device):
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(5, 9, generator=gen).to(device)
    o = torch.randn(9, 5, generator=gen).to(device).t()
    want, before = t.clone(), t.clone()
    loop_ema([want], [o], 0.8)
    ema_update([t], [o], 0.8, impl="triton")
    assert_rounding_close(t, want, before, o, 0.8)
    with pytest.raises(ValueError, match="target"):
        ema_update([t.t()], [o.t()], 0.8, impl="triton")


def _bad_inputs(device):
    t = [torch.randn(3, device=device), torch.randn(2, 2, device=device)]
    o = [torch.randn(3, device=device), torch.randn(2, 2, device=device)]
    return [
        ("length", t, o[:1], 0.9),
        ("shape", t, [o[0], torch.randn(4, device=device)], 0.9),
        ("target", [t[0], t[1].half()], o, 0.9),
        ("online", t, [o[0], o[1].double()], 0.9),
        ("online", t, [o[0], o[1].long()], 0.9),
        ("device", t, [o[0], torch.randn(2, 2, device="meta")], 0.9),
        ("tau", t, o, 1.5),
        ("tau", t, o, -0.01),
        ("tau", t, o, float("nan")),
        ("tau", t, o, torch.tensor([0.9])),
        ("tau", t, o, "0.9"),
        ("online", t, [o[0], [1.0, 2.0]], 0.9),
        ("both", t[0], o, 0.9),
    ]


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("k", range(13))
def test_bad_input_raises_before_any_update(impl, k, device):
    name, t, o, tau = _bad_inputs(device)[k]
    before = [x.clone() for x in t] if isinstance(t, list) else [t.clone()]
    with pytest.raises(ValueError, match=name):
        ema_update(t, o, tau, impl=impl)
    after = t if isinstance(t, list) else [t]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_opcheck(device):
    t = [torch.randn(5, device=device), torch.randn(3, 2, device=device)]
    o = [torch.randn(5, device=device), torch.randn(3, 2, device=device)]
    torch.library.opcheck(torch.ops.ajepa.ema_update_.default, (t, o, 0.9, 0.1))


def test_auto_is_reference_on_cpu(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("auto must not pick Triton for CPU tensors")

    monkeypatch.setattr(fused, "ema_update_op", no_triton)
    t, o = [torch.zeros(3)], [torch.ones(3)]
    ema_update(t, o, 0.75)
    assert torch.equal(t[0], torch.full((3,), 0.25))


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_bf16_online_cuda(impl):
    target, online = _perturbed_pair(torch.device("cuda"), torch.bfloat16)
    want = [p.detach().clone() for p in target.parameters()]
    before = [p.detach().clone() for p in target.parameters()]
    loop_ema(want, online.parameters(), 0.996)
    ema_update(target.parameters(), online.parameters(), 0.996, impl=impl)
    for got, w, b, o in zip(target.parameters(), want, before, online.parameters()):
        assert_rounding_close(got.detach(), w, b, o.detach(), 0.996)


# ---------------------------------------------------------------------------- EmaPlan: the work done once


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_plan_matches_the_loop_over_repeated_calls(impl, device):
    """A plan built once gives ema_update's result on every call, tau changing per call."""
    target, online = _perturbed_pair(device, torch.float16)
    want = [p.detach().clone() for p in target.parameters()]
    plan = EmaPlan(list(target.parameters()), list(online.parameters()), impl=impl)
    for tau in (0.9, 0.5, torch.tensor(0.99)):
        before = [w.clone() for w in want]
        loop_ema(want, online.parameters(), float(tau))
        plan(tau)
        for got, w, b, o in zip(target.parameters(), want, before, online.parameters()):
            assert_rounding_close(got.detach(), w, b, o.detach(), float(tau))


def test_plan_follows_reallocated_parameters(device):
    """After the parameters move (here .double().float(): new storage for every tensor) the plan's
    guard rebuilds its table, so the update lands in the live tensors, not in freed memory."""
    target, online = _perturbed_pair(device, torch.float32)
    plan = EmaPlan(list(target.parameters()), list(online.parameters()), impl="triton")
    plan(0.5)
    old = plan.where
    target.double().float()
    online.double().float()
    want = [p.detach().clone() for p in target.parameters()]
    loop_ema(want, online.parameters(), 0.5)
    plan(0.5)
    assert plan.where != old
    for got, w in zip(target.parameters(), want):
        torch.testing.assert_close(got.detach(), w, rtol=0, atol=4 * EPS32 * (1 + w.abs().max().item()))


def test_ajepa_rebuilds_its_plan_when_parameters_move():
    from helpers import micro_config

    from ajepa.model import AJEPA

    model = AJEPA(micro_config(), impl="reference")
    model.update_target(0.9)
    assert model._ema_plan is not None
    model.float()  # Module._apply: the plan is dropped, the next update builds a new one
    assert model._ema_plan is None
    model.update_target(0.9)
    model.load_state_dict(model.state_dict(), assign=True)  # new parameter objects
    assert model._ema_plan is None
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.5)
    for t, b, o in zip(model.target_encoder.parameters(), before, model.encoder.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * o)


def test_plan_checks_its_arguments_once_and_tau_every_call():
    t, o = [torch.zeros(3)], [torch.zeros(4)]
    with pytest.raises(ValueError, match=r"EmaPlan: target\[0\] shape"):
        EmaPlan(t, o)
    plan = EmaPlan([torch.zeros(3)], [torch.ones(3)], impl="reference")
    with pytest.raises(ValueError, match="tau must lie in"):
        plan(1.5)
    with pytest.raises(ValueError, match="EmaPlan: online\\[0\\] must be contiguous"):
        EmaPlan([torch.zeros(3, 2)], [torch.zeros(2, 3).t()], impl="triton")
