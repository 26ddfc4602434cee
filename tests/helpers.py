"""Shared test helpers: small configs, the CUDA markers and the fp64-anchored tolerance rule."""

import pytest
import torch

from ajepa.config import apply_overrides, get_preset

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def micro_config(**extra):
    """A very small tiny-preset variant that trains in about a second per few steps on 2 cores."""
    overrides = {
        "model.embed_dim": 48, "model.depth": 2, "model.num_heads": 3,
        "model.pred_dim": 48, "model.pred_depth": 1, "model.pred_heads": 3,
        "train.batch_size": 4, "train.steps": 12, "train.num_workers": 0, "train.log_every": 1,
        "train.ckpt_every": 4, "train.device": "cpu", "train.impl": "reference",
        "data.synth_clips": 16, "optim.warmup_steps": 2,
    }
    overrides.update(extra)
    return apply_overrides(get_preset("tiny"), [f"{k}={v}" for k, v in overrides.items()])


def assert_within_baseline(out, ref, gold, factor, *, floor=0.0, name="out"):
    """DESIGN.md's tolerance rule (after flash-attention's tests): the tested result's max abs error
    against the fp64 `gold` is at most `factor` times the error of `ref`, the plain PyTorch
    reference computed in the same low precision, plus `floor` (0 unless a caller explains one)."""
    gold = gold.double()
    err = (out.double() - gold).abs().max().item()
    base = (ref.double() - gold).abs().max().item()
    bound = factor * base + floor
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x baseline {base:.3e} + {floor:.1e}"
