"""Health statistics, SIGReg and the learning-recipe options of the model."""

import math

import pytest
import torch
from helpers import micro_config

from ajepa.config import ConfigError, apply_overrides, get_preset
from ajepa.masks import MaskSampler
from ajepa.model import AJEPA
from ajepa.model.ajepa import clip_means, normalize_targets, position_centered, signal_patches
from ajepa.model.health import CollapseWatch, feature_std, health_stats, position_share, rankme
from ajepa.model.sigreg import epps_pulley, sigreg


def test_rankme_known_spectra():
    g = torch.Generator().manual_seed(0)
    # Rank one: every row a multiple of one vector.
    z = torch.randn(500, 1, generator=g) * torch.randn(1, 32, generator=g)
    assert rankme(z) == pytest.approx(1.0, abs=1e-3)
    # Orthogonal columns of equal norm: all singular values equal -> full rank.
    q, _ = torch.linalg.qr(torch.randn(200, 16, generator=g, dtype=torch.float64))
    assert rankme(q * 3.0) == pytest.approx(16.0, rel=1e-4)
    # Two equal singular values and the rest zero -> 2; a 3:1 split -> exp(H(0.75, 0.25)).
    s = torch.zeros(100, 8, dtype=torch.float64)
    s[0, 0], s[1, 1] = 3.0, 1.0
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert rankme(s) == pytest.approx(math.exp(h), rel=1e-4)
    s[1, 1] = 3.0
    assert rankme(s) == pytest.approx(2.0, rel=1e-4)
    # Wide matrices (n < D) use the other Gram matrix and agree with the SVD.
    w = torch.randn(10, 300, generator=g)
    sv = torch.linalg.svdvals(w.double())
    p = sv / sv.sum() + 1e-7
    assert rankme(w) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)


def test_feature_std():
    z = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    assert feature_std(z) == pytest.approx(((8 / 3) ** 0.5 + 0.0) / 2)


def test_position_share_separates_position_from_content():
    g = torch.Generator().manual_seed(1)
    B, N, D = 64, 40, 8
    pos = torch.randn(1, N, D, generator=g).expand(B, N, D)
    content = torch.randn(B, N, D, generator=g)
    assert position_share(pos + 1e-9 * content) > 0.999  # identical for every clip
    assert position_share(content) < 0.02  # no position effect (the B-clip mean's noise is corrected)
    # Equal between-position and within-position variance -> about 1/2.
    share = position_share(pos + content)
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError):
        position_share(torch.randn(1, N, D))


def test_health_stats_and_collapse_watch():
    g = torch.Generator().manual_seed(2)
    healthy = torch.randn(16, 64, 32, generator=g)
    stats = health_stats(healthy)
    assert set(stats) == {"rankme", "feat_std", "pos_share"}
    assert stats["rankme"] > 25 and 0.9 < stats["feat_std"] < 1.1 and stats["pos_share"] < 0.05
    watch = CollapseWatch()
    assert watch.check(10, stats) is None
    collapsed = torch.randn(1, 64, 32, generator=g).expand(16, 64, 32) + 1e-6 * healthy
    msg = watch.check(20, health_stats(collapsed))
    assert msg is not None and "step 20" in msg and "position" in msg
    assert watch.check(30, health_stats(collapsed)) is None  # warns once
    # A RankMe drop to under a quarter of its first value fires on its own.
    watch = CollapseWatch()
    watch.check(0, {"rankme": 40.0, "feat_std": 1.0, "pos_share": 0.1})
    assert watch.check(10, {"rankme": 20.0, "feat_std": 1.0, "pos_share": 0.1}) is None
    assert "RankMe 9.00" in watch.check(20, {"rankme": 9.0, "feat_std": 1.0, "pos_share": 0.1})


def test_sigreg_gaussian_small_collapsed_large_and_differentiable():
    g = torch.Generator().manual_seed(3)
    gauss = torch.randn(4096, 16, generator=g)
    ep = epps_pulley(gauss[:, :4])
    assert ep.shape == (4,) and float(ep.max()) < 2e-3
    low = float(sigreg(gauss, 32, generator=torch.Generator().manual_seed(0)))
    point = float(sigreg(torch.zeros(4096, 16), 32, generator=torch.Generator().manual_seed(0)))
    line = float(sigreg(torch.randn(4096, 1, generator=g) * torch.ones(1, 16) / 4, 32,
                     generator=torch.Generator().manual_seed(0)))
    scaled = float(sigreg(gauss * 0.2, 32, generator=torch.Generator().manual_seed(0)))
    assert low < 2e-3 and point > 0.3 and line > 50 * low and scaled > 50 * low
    z = (0.1 * torch.randn(256, 8, generator=g)).requires_grad_()
    before = sigreg(z, 16, generator=torch.Generator().manual_seed(0))
    before.backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    with torch.no_grad():
        after = sigreg(z - 0.5 * z.grad / z.grad.norm(), 16, generator=torch.Generator().manual_seed(0))
    assert float(after) < before.item()  # a step against the gradient lowers the statistic


def test_normalize_targets_modes():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 10, 12, generator=g) * 3 + torch.randn(1, 10, 12, generator=g) * 5
    lay = normalize_targets(h, "layer")
    assert torch.allclose(lay.mean(-1), torch.zeros(6, 10), atol=1e-5)
    ins = normalize_targets(h, "instance")
    assert torch.allclose(ins.mean(1), torch.zeros(6, 12), atol=1e-5)
    assert torch.allclose(ins.var(1, unbiased=False), torch.ones(6, 12), atol=1e-3)
    bat = normalize_targets(h, "batch")
    assert torch.allclose(bat.mean(0), torch.zeros(10, 12), atol=1e-5)
    assert position_share(bat) < position_share(h)


def test_signal_patches_marks_constant_patches():
    spec = torch.randn(2, 1, 64, 32)
    spec[0, 0, 32:] = 0.47  # padding in the second half of clip 0
    spec[1, 0, :16, :16] = -1.0  # one silent patch in clip 1
    keep = signal_patches(spec, 16)  # grid 4 x 2
    assert keep.shape == (2, 8)
    assert keep[0].tolist() == [True] * 4 + [False] * 4
    assert keep[1].tolist() == [False] + [True] * 7


def _tiny(*overrides):
    return apply_overrides(get_preset("tiny"), ["model.depth=2", "model.embed_dim=48", "model.num_heads=2",
                                                "model.pred_dim=32", "model.pred_depth=1", "model.pred_heads=2",
                                                *overrides])


def test_recipe_options_change_the_loss_and_train():
    torch.manual_seed(0)
    cfg0 = _tiny()
    spec = torch.randn(4, 1, 256, 128)
    spec[:2, :, 160:] = 0.47
    masks = MaskSampler(cfg0.masks, cfg0.grid, 100, 0)(0, 4)
    base = AJEPA(cfg0, impl="reference")
    ref = base(spec, masks)
    variants = [["model.target_norm=batch"], ["model.target_layers=2", "model.target_norm=instance"],
                ["model.signal_targets_only=true"], ["model.sigreg_weight=1.0"],
                ["model.sigreg_weight=1.0", "model.sigreg_content=true"], ["model.sigreg_clip_weight=1.0"],
                ["model.clip_loss_weight=1.0"]]
    for ov in variants:
        m = AJEPA(_tiny(*ov), impl="reference")
        m.load_state_dict(base.state_dict())
        loss = m(spec, masks)
        assert torch.isfinite(loss) and abs(loss.item() - ref.item()) > 1e-4, ov
        loss.backward()
        assert all(p.grad is not None for p in m.encoder.blocks[0].parameters()), ov


def test_recipe_config_validation():
    for bad, field in (("model.target_norm=foo", "model.target_norm"),
                       ("model.target_layers=0", "model.target_layers"),
                       ("model.target_layers=9", "model.target_layers"),
                       ("model.sigreg_weight=-1", "model.sigreg_weight"),
                       ("model.sigreg_weight=nan", "model.sigreg_weight"),
                       ("model.sigreg_projections=0", "model.sigreg_projections"),
                       ("model.sigreg_content=maybe", "model.sigreg_content"),
                       ("model.sigreg_clip_weight=-0.5", "model.sigreg_clip_weight"),
                       ("model.clip_loss_weight=inf", "model.clip_loss_weight")):
        with pytest.raises(ConfigError, match=field):
            apply_overrides(get_preset("tiny"), [bad])


def test_position_centered_removes_the_shared_part():
    N, D = 5, 3
    pos_part = torch.arange(N * D, dtype=torch.float32).view(N, D) * 10
    # Samples 0 and 1 see positions 0-3, sample 2 sees 1 and 4 (position 4: only one sample).
    index = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8, 11, 14])
    content = torch.randn(index.numel(), D)
    z = position_centered(pos_part[index % N] + content, index, N)
    assert z.shape == (10, D)
    pos = index % N
    want = torch.stack([content[i] - content[pos == pos[i]].mean(0) for i in range(len(index))])
    assert torch.equal(want[-1], torch.zeros(D))  # the lone token at position 4
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-4)


def test_clip_means_average_each_samples_visible_tokens():
    N, D = 6, 4
    index = torch.tensor([0, 2, 3, 7, 8, 9, 11, 16])  # sample 0: 3 tokens, 1: 4 tokens, 2: 1 token, 3: none
    tokens = torch.randn(index.numel(), D)
    got = clip_means(tokens, index, N, batch=4)
    want = torch.stack([tokens[:3].mean(0), tokens[3:7].mean(0), tokens[7], torch.zeros(D)])
    torch.testing.assert_close(got, want)


def test_clip_loss_is_the_l2_between_mean_context_and_mean_target_tokens():
    """model.clip_loss_weight=w adds w x MSE(each clip's mean context token, its mean layer-normed target
    token) to the token loss; recomputed here from the model's own pieces."""
    torch.manual_seed(0)
    cfg = _tiny("model.sigreg_weight=0", "model.clip_loss_weight=3.0")
    spec = torch.randn(4, 1, 256, 128)
    masks = MaskSampler(cfg.masks, cfg.grid, 100, 0)(0, 4)
    m = AJEPA(cfg, impl="reference")
    plain = AJEPA(_tiny("model.sigreg_weight=0"), impl="reference")
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        ctx = m.encoder.forward_packed(spec, masks.ctx_index, masks.cu_ctx, masks.max_ctx, "reference")
        h = m.target_encoder.forward_dense(spec, "reference")
        tgt = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6).mean(1)
        extra = ((clip_means(ctx, masks.ctx_index, cfg.num_patches, 4) - tgt) ** 2).mean()
        assert extra > 0
        torch.testing.assert_close(m(spec, masks), plain(spec, masks) + 3.0 * extra, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the context view


def test_mel_shift_moves_each_clip_by_its_own_whole_bins():
    from ajepa.model.augment import mel_shift

    torch.manual_seed(0)
    spec = torch.arange(8.0).repeat(3, 1, 5, 1)  # [3, 1, 5, 8]: bin m holds m
    out = mel_shift(spec, 2)
    for b in range(3):
        s = int(out[b, 0, 0, 4] - 4) * -1  # content of bin m comes from bin m - s
        assert -2 <= s <= 2
        want = (torch.arange(8) - s).clamp(0, 7).float()
        assert torch.equal(out[b, 0], want.repeat(5, 1))
    torch.manual_seed(0)
    assert torch.equal(mel_shift(spec, 2), out)  # the global RNG: reproducible under a seed


def test_gain_moves_audio_frames_and_leaves_padding():
    from ajepa.audio import normalize
    from ajepa.config import AudioConfig
    from ajepa.model.augment import context_view, gain

    audio = AudioConfig()
    pad = float(normalize(torch.zeros(()), audio))
    spec = torch.randn(4, 1, 6, 8)
    spec[:, :, 4:] = pad  # the last two frames of every clip are padding
    torch.manual_seed(1)
    out = gain(spec, 6.0, audio)
    assert torch.equal(out[:, :, 4:], spec[:, :, 4:])
    step = (out - spec)[:, 0, :4]  # one constant per clip over its audio frames
    assert torch.allclose(step, step[:, :1, :1].expand_as(step))
    most = 6.0 * math.log(10) / 10 / (2 * audio.norm_std)
    assert (step[:, 0, 0].abs() <= most + 1e-6).all() and step[:, 0, 0].abs().max() > 0
    assert context_view(spec, 0, 0.0, audio) is spec


def test_the_context_view_reaches_the_context_encoder_only():
    cfg = micro_config(**{"model.sigreg_weight": 0, "model.ctx_mel_shift": 3, "model.ctx_gain_db": 6.0})
    plain = micro_config(**{"model.sigreg_weight": 0})
    torch.manual_seed(0)
    model = AJEPA(cfg, impl="reference")
    base = AJEPA(plain, impl="reference")
    base.load_state_dict(model.state_dict())
    spec = torch.randn(3, 1, cfg.audio.target_frames, cfg.audio.num_mel_bins)
    masks = MaskSampler(cfg.masks, cfg.grid, 10)(0, 3)
    assert torch.equal(model.targets(spec, masks), base.targets(spec, masks))  # targets: the clean clip
    torch.manual_seed(5)
    augmented = model(spec, masks)
    assert not torch.equal(augmented, base(spec, masks))
    with pytest.raises(ConfigError, match="model.ctx_mel_shift"):
        micro_config(**{"model.ctx_mel_shift": 10_000})
    with pytest.raises(ConfigError, match="model.ctx_gain_db"):
        micro_config(**{"model.ctx_gain_db": -1.0})


def test_pos_scale_scales_the_encoders_positions_only(tmp_path):
    from ajepa.eval.embed import load_encoder, random_encoder
    from ajepa.model.vit import sincos_pos_embed

    cfg = micro_config(**{"model.pos_scale": 0.25})
    plain = micro_config()
    torch.manual_seed(0)
    model, base = AJEPA(cfg, impl="reference"), AJEPA(plain, impl="reference")
    full = sincos_pos_embed(cfg.grid, cfg.model.embed_dim)
    for enc in (model.encoder, model.target_encoder, random_encoder(cfg).vit):
        assert torch.equal(enc.pos_embed, full * 0.25)
    assert torch.equal(base.encoder.pos_embed, full)
    assert torch.equal(model.predictor.pos_embed, base.predictor.pos_embed)  # the predictor keeps its own
    # Same weights, other positions: the features differ; the scale travels with the exported encoder.
    base.load_state_dict(model.state_dict())
    spec = torch.randn(2, 1, cfg.audio.target_frames, cfg.audio.num_mel_bins)
    out, ref = model.encoder.forward_dense(spec, "reference"), base.encoder.forward_dense(spec, "reference")
    assert not torch.allclose(out, ref)
    enc = random_encoder(cfg, seed=3)
    path = enc.save_safetensors(tmp_path / "enc.safetensors")
    back = load_encoder(path)
    assert back.cfg.model.pos_scale == 0.25 and torch.equal(back.vit.pos_embed, full * 0.25)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="model.pos_scale"):
            micro_config(**{"model.pos_scale": bad})
