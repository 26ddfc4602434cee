"""audio.auto_norm: the training data's own fbank statistics replace norm_mean/norm_std, once, and are recorded."""

from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import micro_config

from ajepa.audio import AudioError
from ajepa.config import AudioConfig, DataConfig, get_preset, load_config
from ajepa.data import build_dataset
from ajepa.stats import AUTO_NORM_CLIPS, dataset_stats, resolve_auto_norm
from ajepa.trainer import train


def test_tiny_preset_normalizes_by_its_data_and_base_keeps_audioset_statistics():
    assert get_preset("tiny").audio.auto_norm
    assert not get_preset("base").audio.auto_norm and not AudioConfig().auto_norm


def test_resolve_replaces_the_statistics_and_clears_the_flag():
    cfg = micro_config(**{"data.synth_clips": 12})
    resolved, stats = resolve_auto_norm(cfg)
    assert not resolved.audio.auto_norm
    assert (resolved.audio.norm_mean, resolved.audio.norm_std) == (stats.mean, stats.std)
    assert (stats.mean, stats.std) != (cfg.audio.norm_mean, cfg.audio.norm_std)
    # every clip of a small corpus is measured: the statistics are those of `ajepa stats`
    full = dataset_stats(cfg, progress=False)
    assert (stats.mean, stats.std, stats.frames) == (full.mean, full.std, full.frames)
    # with the statistics in place, the corpus' spectrograms are centred: mean 0 over their audio frames
    ds = build_dataset(resolved.data, resolved.audio, resolved.train.seed)
    frames = torch.cat([ds.raw_fbank(i) for i in range(len(ds))])
    normalized = (frames - resolved.audio.norm_mean) / (2 * resolved.audio.norm_std)
    assert abs(normalized.mean().item()) < 1e-4 and normalized.std().item() == pytest.approx(0.5, rel=1e-3)
    # a config without the flag comes back as it was
    assert resolve_auto_norm(resolved) == (resolved, None)


def test_a_large_dataset_is_sampled_across_its_length(tmp_path):
    cfg = micro_config(**{"data.synth_clips": AUTO_NORM_CLIPS * 2})
    spread = dataset_stats(cfg, limit=AUTO_NORM_CLIPS, progress=False, spread=True)
    first = dataset_stats(cfg, limit=AUTO_NORM_CLIPS, progress=False)
    _, auto = resolve_auto_norm(cfg)
    assert (auto.mean, auto.std) == (spread.mean, spread.std) != (first.mean, first.std)


def test_training_records_the_statistics_it_used(tmp_path):
    cfg = micro_config(**{"train.steps": 2})
    expected, _ = resolve_auto_norm(cfg)
    train(cfg, tmp_path / "run", progress=False)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.audio == expected.audio and not saved.audio.auto_norm
    # resuming with the preset's flag resolves to the same values, so the checkpoint's audio config matches
    train(replace(cfg, train=replace(cfg.train, steps=4)), tmp_path / "run", resume=True, progress=False)


def test_unreadable_data_fails_before_the_run_folder_is_written(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"{i}.wav").write_bytes(b"junk")
    cfg = micro_config(**{"train.steps": 2, "data.path": str(data)})
    assert cfg.audio.auto_norm
    with pytest.raises(AudioError, match="no readable audio: all 2 files failed"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_silent_data_is_refused_by_name(tmp_path):
    for i in range(3):
        sf.write(str(tmp_path / f"{i}.wav"), np.zeros(16000, np.float32), 16000)
    cfg = replace(micro_config(), data=DataConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="audio.auto_norm: .* std"):
        resolve_auto_norm(cfg)


def test_random_init_probe_data_is_normalized_by_its_own_statistics():
    from ajepa.cli.eval import _dataset
    from ajepa.eval.embed import random_encoder

    enc = random_encoder(micro_config())
    ds = _dataset(enc, None, 12, 3)
    stats = dataset_stats(replace(micro_config(**{"data.synth_clips": 12}), train=replace(enc.cfg.train, seed=3)),
                          progress=False)
    assert not enc.cfg.audio.auto_norm and (enc.cfg.audio.norm_mean, enc.cfg.audio.norm_std) == (stats.mean, stats.std)
    assert ds.audio == enc.cfg.audio  # the probe's spectrograms use them too
