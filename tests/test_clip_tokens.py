"""model.clip_tokens_only: the padding past a short clip's end stays out of masks, targets and embeddings."""

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import micro_config

from ajepa.audio import audio_rows, waveform_to_spec
from ajepa.config import ConfigError, DataConfig, apply_overrides, get_preset
from ajepa.data import ClipRows, build_dataset, make_loader
from ajepa.eval.embed import Encoder
from ajepa.maskgeom import context_room
from ajepa.masks import MaskSampler, clip_min_rows, pack_masks
from ajepa.model.ajepa import AJEPA
from ajepa.train import train
from kernels import gather_layer_norm


def _tiny(*overrides):
    return apply_overrides(get_preset("tiny"), ["model.depth=2", "model.embed_dim=48", "model.num_heads=2",
                                                "model.pred_dim=32", "model.pred_depth=1", "model.pred_heads=2",
                                                *overrides])


def _indices_by_sample(index: torch.Tensor, n: int, b: int) -> torch.Tensor:
    return index[index // n == b] % n


@pytest.mark.parametrize("step", [0, 99])  # multiblock targets at step 0, time-frequency ones at the end
def test_masks_stay_inside_each_clip(step):
    cfg = get_preset("tiny")
    gt, gf = cfg.grid
    n = gt * gf
    sampler = MaskSampler(cfg.masks, cfg.grid, 100, seed=3)
    rows = [gt, 5, 1, 9, 3]
    masks = sampler(step, len(rows), rows)
    assert masks.use_tf == (step == 99)
    kept = [max(r, sampler.min_rows) for r in rows]
    assert sampler.min_rows == 3 and kept == [gt, 5, 3, 9, 3]
    for b, r in enumerate(kept):
        ctx = _indices_by_sample(masks.ctx_index, n, b)
        tgt = _indices_by_sample(masks.tgt_index, n, b)
        assert ctx.numel() >= cfg.masks.min_keep and tgt.numel() > 0
        assert int(ctx.max()) < r * gf and int(tgt.max()) < r * gf
    want = torch.cat([torch.arange(r * gf) + b * n for b, r in enumerate(kept)])
    assert torch.equal(masks.clip_index, want)
    assert masks.cu_clip.tolist() == [0, *np.cumsum([r * gf for r in kept]).tolist()]
    assert masks.max_clip == gt * gf
    assert torch.equal(masks.clip_index[masks.tgt_clip_index], masks.tgt_index)  # packed rows of the targets
    # Clips that fill the grid draw exactly the masks of the default sampler, which packs no clip tokens.
    full, plain = sampler(step, 3, [gt] * 3), sampler(step, 3)
    assert torch.equal(full.ctx_index, plain.ctx_index) and torch.equal(full.tgt_index, plain.tgt_index)
    assert plain.clip_index is None and plain.cu_clip is None


def test_clip_min_rows_is_the_fewest_rows_with_room():
    cfg = get_preset("tiny")
    m, (_, gf) = cfg.masks, cfg.grid
    r = clip_min_rows(m, cfg.grid)
    kinds = [(False, m.num_targets, m.target_scale, m.target_aspect), (True, m.tf_num_targets, m.tf_scale, (1.0, 1.0))]
    assert all(context_room((r, gf), *k, m.min_keep, m.tf_time_share) >= 0.5 for k in kinds)
    assert any(context_room((r - 1, gf), *k, m.min_keep, m.tf_time_share) < 0.5 for k in kinds)


def test_pack_masks_refuses_masks_past_the_clip():
    ctx, tgt = np.arange(0, 10), [np.arange(20, 24)]
    with pytest.raises(ValueError, match="sample 0: masks reach past its clip's 16 tokens"):
        pack_masks([(ctx, tgt)], 128, False, clip_tokens=[16])
    assert pack_masks([(ctx, tgt)], 128, False, clip_tokens=[24]).clip_index.tolist() == list(range(24))


def test_clip_rows_from_lengths_match_the_spectrograms():
    cfg = get_preset("tiny").audio
    sr = cfg.sample_rate
    g = torch.Generator().manual_seed(0)
    waves = [0.3 * torch.randn(int(s * sr), generator=g) for s in (0.3, 0.7, 1.61, 2.5, 4.0)]
    specs = torch.stack([waveform_to_spec(w, sr, cfg).unsqueeze(0) for w in waves])
    rows = ClipRows(cfg, 16)
    from_specs = rows(specs, None)
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    assert from_specs == rows(padded, torch.tensor([w.numel() for w in waves]))
    # kaldi frames 28, 68, 159, 248 and 256 (the crop): ceil(frames / 16) rows, or / 8 for 8-frame patches
    assert from_specs == [2, 5, 10, 16, 16]
    assert audio_rows(specs, cfg, 8).tolist() == [4, 9, 20, 31, 32]


def _short_clips(cfg, batch: int, rows: list[int]) -> torch.Tensor:
    """Normalized spectrograms whose clips hold `rows` patch rows, padded as crop_or_pad pads (log-mel 0)."""
    torch.manual_seed(0)
    spec = torch.randn(batch, 1, cfg.audio.target_frames, cfg.audio.num_mel_bins)
    pad = -cfg.audio.norm_mean / (2 * cfg.audio.norm_std)
    for b, r in enumerate(rows):
        spec[b, :, r * cfg.patch_shape[0]:] = pad
    return spec


def test_targets_ignore_padding_and_match_a_masked_dense_encoder():
    cfg = _tiny("model.clip_tokens_only=true")
    rows = [16, 4, 7, 10]
    spec = _short_clips(cfg, 4, rows)
    assert audio_rows(spec, cfg.audio, 16).tolist() == rows
    masks = MaskSampler(cfg.masks, cfg.grid, 100, 0)(0, 4, rows)
    torch.manual_seed(1)
    model = AJEPA(cfg, impl="reference")
    tgt = model.targets(spec, masks)
    # the packed target encoder = a dense one whose tokens attend only to their clip's tokens
    keep = torch.zeros(4 * 128, dtype=torch.bool).index_fill(0, masks.clip_index, True).view(4, 128)
    dense = model.target_encoder.forward_dense(spec, "reference", keep=keep)
    torch.testing.assert_close(tgt, gather_layer_norm(dense, masks.tgt_index, impl="reference"), atol=2e-5, rtol=0)
    assert torch.equal(model.target_tokens(spec, masks), dense)
    # New content in the padding changes nothing: not the targets, not the loss.
    noisy = spec.clone()
    for b, r in enumerate(rows):
        noisy[b, :, r * 16:] = torch.randn_like(noisy[b, :, r * 16:])
    torch.manual_seed(2)
    loss = model(spec, masks)
    torch.manual_seed(2)
    assert torch.equal(model(noisy, masks), loss)
    # ...whereas the default model's target encoder reads the padding of the same batch.
    plain = AJEPA(_tiny(), impl="reference")
    plain.load_state_dict(model.state_dict())
    full = MaskSampler(cfg.masks, cfg.grid, 100, 0)(0, 4)
    assert not torch.allclose(plain.targets(spec, full), plain.targets(noisy, full))


def test_encoder_embeds_like_the_packed_training_path():
    cfg = _tiny("model.clip_tokens_only=true")
    spec = _short_clips(cfg, 3, [5, 2, 16])
    torch.manual_seed(0)
    enc = Encoder(cfg)
    tokens = enc(spec)
    kept = [5, 3, 16]  # clip_min_rows (3) for the 2-row clip, as training gives it
    gf = cfg.grid[1]
    for b, r in enumerate(kept):
        index = torch.arange(r * gf) + b * cfg.num_patches
        cu = torch.tensor([0, r * gf], dtype=torch.int32)
        packed = enc.vit.forward_packed(spec, index, cu, r * gf, "reference")
        torch.testing.assert_close(tokens[b, :r * gf], packed, atol=2e-5, rtol=0)
    pooled = enc.embed_spec(spec)
    torch.testing.assert_close(pooled[0], tokens[0, :5 * gf].mean(0), atol=1e-5, rtol=0)
    plain = Encoder(_tiny(), enc.vit)  # the same weights, attending to every token
    assert not torch.allclose(plain(spec)[0, :5 * gf], tokens[0, :5 * gf], atol=1e-3)


def test_config_refuses_clip_tokens_only_with_multilayer_targets():
    for bad in (["model.target_layers=2"], ["model.target_norm=instance"], ["model.clip_loss_weight=1"]):
        with pytest.raises(ConfigError, match="model.clip_tokens_only=true needs"):
            _tiny("model.clip_tokens_only=true", *bad)


def _short_wavs(folder, sr=16000, n=8):
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        sf.write(str(folder / f"{i}.wav"), (0.2 * g.standard_normal(int((0.5 + 0.25 * i) * sr))).astype("float32"), sr)
    return folder


def test_the_loader_draws_masks_inside_each_clip(tmp_path):
    cfg = micro_config(**{"model.clip_tokens_only": "true"})
    data = build_dataset(DataConfig(path=str(_short_wavs(tmp_path / "wavs"))), cfg.audio)
    loader = make_loader(data, MaskSampler(cfg.masks, cfg.grid, 4), 4, 2, 0,
                         clip_rows=ClipRows(cfg.audio, cfg.patch_shape[0]))
    n, gf = cfg.num_patches, cfg.grid[1]
    for batch in loader:
        rows = audio_rows(batch.spec, cfg.audio, 16).clamp_min(3)
        assert rows.min() < cfg.grid[0]  # some clips are shorter than the crop
        assert batch.masks.cu_clip.diff().tolist() == (rows * gf).tolist()
        for b in range(4):
            assert int(_indices_by_sample(batch.masks.ctx_index, n, b).max()) < int(rows[b]) * gf


def test_training_with_clip_tokens_only_runs_and_logs_health(tmp_path):
    cfg = micro_config(**{"model.clip_tokens_only": "true", "data.path": str(_short_wavs(tmp_path / "wavs")),
                          "train.steps": 4})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 4 and all(np.isfinite(loss) for _, loss in result.losses)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 4 and all('"rankme"' in line for line in metrics)


def test_fused_clip_only_targets_and_loss_match_the_reference():
    """The packed target encoder on the Triton path (varlen attention over each clip's tokens), held to
    DESIGN.md's rule: its error against float64 at most 2x the fp32 reference path's (plus a few ulps)."""
    from helpers import DEVICE, assert_within_baseline

    cfg = _tiny("model.clip_tokens_only=true", "model.sigreg_weight=0")
    rows = [16, 4, 7]
    spec = _short_clips(cfg, 3, rows).to(DEVICE)
    masks = MaskSampler(cfg.masks, cfg.grid, 100, 0)(99, 3, rows).to(DEVICE)
    torch.manual_seed(0)
    gold_model = AJEPA(cfg, impl="reference").to(DEVICE, torch.float64)
    out = {}
    for name, impl, dtype in (("gold", "reference", torch.float64), ("reference", "reference", torch.float32),
                              ("triton", "triton", torch.float32)):
        model = AJEPA(cfg, impl=impl).to(DEVICE, dtype)
        model.load_state_dict(gold_model.state_dict())
        with torch.no_grad():
            out[name] = (model.targets(spec.to(dtype), masks).double(), model(spec.to(dtype), masks).double())
    for i, what in enumerate(("targets", "loss")):
        gold = out["gold"][i]
        floor = 4 * torch.finfo(torch.float32).eps * max(1.0, gold.abs().max().item())
        assert_within_baseline(out["triton"][i], out["reference"][i], gold, 2, floor=floor, name=what)
