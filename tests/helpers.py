"""Small configs shared by the CPU tests."""

from ajepa.config import apply_overrides, get_preset


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
