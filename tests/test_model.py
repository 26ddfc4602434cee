import torch
import torch.nn.functional as F
from helpers import micro_config

from ajepa.masks import MaskSampler
from ajepa.model import AJEPA, sincos_pos_embed


def _setup(seed=0, batch=3):
    cfg = micro_config(**{"model.sigreg_weight": 0})  # the bare JEPA loss (SIGReg: tests/test_health.py)
    torch.manual_seed(seed)
    model = AJEPA(cfg, impl="reference")
    spec = torch.randn(batch, 1, cfg.audio.target_frames, cfg.audio.num_mel_bins)
    masks = MaskSampler(cfg.masks, cfg.grid, 100, seed=seed)(3, batch)
    return cfg, model, spec, masks


def test_sincos_positions_distinct_and_time_major():
    pos = sincos_pos_embed((4, 3), 16)
    assert pos.shape == (12, 16)
    assert torch.cdist(pos, pos).add(torch.eye(12)).min() > 0  # all positions distinct
    # tokens in the same time row share the time half of the channels
    assert torch.equal(pos[3, :8], pos[5, :8]) and not torch.equal(pos[3, :8], pos[6, :8])


def test_shapes_and_loss():
    cfg, model, spec, masks = _setup()
    pred = model.predict(spec, masks)
    tgt = model.targets(spec, masks)
    assert pred.shape == tgt.shape == (masks.num_targets, cfg.model.embed_dim)
    assert not tgt.requires_grad
    # targets are layer-normed without affine: zero mean, unit variance per row
    assert torch.allclose(tgt.mean(-1), torch.zeros(len(tgt)), atol=1e-5)
    loss = model(spec, masks)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.allclose(loss, F.mse_loss(pred, tgt))


def test_packed_context_encoder_matches_per_sample_dense_run():
    """No token sees another sample: each sample alone, dense over its own visible tokens, gives
    the same output as the packed batch."""
    cfg, model, spec, masks = _setup(batch=4)
    enc = model.encoder
    packed = enc.forward_packed(spec, masks.ctx_index, masks.cu_ctx, masks.max_ctx, "reference")
    N = cfg.num_patches
    cu = masks.cu_ctx.tolist()
    for b in range(4):
        idx = masks.ctx_index[cu[b]:cu[b + 1]] - b * N
        x = (enc.patch_embed(spec[b:b + 1]) + enc.pos_embed)[:, idx]  # [1, L, D]
        for blk in enc.blocks:
            x = blk(x)
        torch.testing.assert_close(packed[cu[b]:cu[b + 1]], enc.norm(x)[0], rtol=1e-5, atol=1e-5)


def test_gradients_reach_encoder_predictor_and_mask_token_not_target():
    _, model, spec, masks = _setup()
    model(spec, masks).backward()
    assert model.predictor.mask_token.grad is not None and model.predictor.mask_token.grad.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target_encoder.parameters())


def test_ema_update_moves_target_towards_encoder():
    _, model, _, _ = _setup()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for t0, t1, o in zip(before, model.target_encoder.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * o, rtol=1e-6, atol=1e-6)
