"""`ajepa prepare`: webdataset shards of 16-bit PCM plus an index, resumable and atomic; training and
the frontend read them like the files they came from."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import micro_config

from ajepa.audio import batch_fbank, load_audio, resample, waveform_to_spec
from ajepa.cli import main
from ajepa.config import get_preset
from ajepa.data import ShardDataset, build_dataset, synth_clip
from ajepa.prepare import prepare
from ajepa.train import train


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "audio"
    for i in range(20):
        folder = root / ("a", "b", "c")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        sr = 16000 if i % 4 else 22050  # some files need resampling
        wave, _ = synth_clip(i, 1.0 + 0.1 * i, sr)
        sf.write(str(folder / f"{i:02d}.wav"), wave, sr)
    (root / "a" / "bad.wav").write_bytes(b"RIFF not audio")
    return root


def test_prepare_writes_shards_an_index_and_the_bad_files(corpus, tmp_path):
    cfg = get_preset("tiny").audio
    index = prepare(corpus, tmp_path / "shards", cfg, shard_size=8, workers=2, progress=False)
    assert [s["nsamples"] for s in index["shardlist"]] == [7, 8, 5]  # 21 files; a/bad.wav (shard 0) skipped
    assert index["total_clips"] == 20 and index["classes"] == ["a", "b", "c"]
    assert len(index["bad_files"]) == 1 and index["bad_files"][0][0].endswith("bad.wav")
    assert index["total_hours"] == pytest.approx(sum(1.0 + 0.1 * i for i in range(20)) / 3600, rel=1e-3)
    assert json.loads((tmp_path / "shards" / "index.json").read_text()) == index
    assert not list((tmp_path / "shards").glob(".*"))  # no temporary file left


def test_prepare_is_resumable_shard_by_shard(corpus, tmp_path):
    cfg = get_preset("tiny").audio
    out = tmp_path / "shards"
    prepare(corpus, out, cfg, shard_size=8, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (out / "shard-000001.tar.json").unlink()  # as if killed while shard 1 was being written
    again = prepare(corpus, out, cfg, shard_size=8, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]
    assert after["shard-000002.tar"] == before["shard-000002.tar"]
    assert after["shard-000001.tar"] != before["shard-000001.tar"] and again["total_clips"] == 20


def test_shards_read_back_as_the_files_they_came_from(corpus, tmp_path):
    cfg = get_preset("tiny").audio
    prepare(corpus, tmp_path / "shards", cfg, shard_size=8, progress=False)
    shards = ShardDataset(tmp_path / "shards", cfg, random_crop=False)
    files = build_dataset(micro_config(**{"data.path": str(corpus)}).data, cfg)
    by_path = {str(p): i for i, p in enumerate(files.paths)}
    assert len(shards) == 20 and shards.classes == files.classes
    for i in (0, 4, 13):  # 16 kHz and resampled files
        j = by_path[str(shards.paths[i])]
        assert shards.labels[i] == files.labels[j]
        wave, sr = load_audio(files.paths[j])
        pcm = (resample(wave, sr, cfg.sample_rate).clamp(-1, 1) * 32767).round() / 32767  # what a shard stores
        torch.testing.assert_close(shards.spectrogram(i)[0], waveform_to_spec(pcm, cfg.sample_rate, cfg),
                                   atol=1e-5, rtol=0)
        # 16-bit storage itself moves only the quietest bins: on average the spectrogram barely changes
        assert (shards.spectrogram(i) - files.spectrogram(j)).abs().mean() < 0.01


def test_training_from_shards_is_a_pure_function_of_seed_and_step(corpus, tmp_path):
    prepare(corpus, tmp_path / "shards", get_preset("tiny").audio, shard_size=8, progress=False)
    cfg = micro_config(**{"data.path": str(tmp_path / "shards"), "train.steps": 4})
    first = train(cfg, tmp_path / "r1", progress=False)
    second = train(cfg, tmp_path / "r2", progress=False)
    assert first.losses == second.losses and all(np.isfinite(v) for _, v in first.losses)


def test_prepare_and_shard_errors_are_one_line(corpus, tmp_path, capsys):
    assert main(["prepare", "--data", str(corpus), "--out", str(tmp_path / "s"), "--no-progress",
                 "--shard-size", "0"]) == 2
    assert "--shard-size (0)" in capsys.readouterr().err
    prepare(corpus, tmp_path / "s", get_preset("tiny").audio, shard_size=8, progress=False)
    assert main(["train", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "r"),
                 "--set", "audio.sample_rate=8000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "shards hold 16000 Hz audio" in err and len(err.splitlines()) == 1


def test_waveform_crops_give_the_per_clip_spectrograms(corpus, tmp_path):
    """What the loader hands over for the device frontend (the samples under each crop), put through
    batch_fbank, is the per-clip spectrogram at the same seeded crop: files (a 60 s one read by seeking,
    a 22.05 kHz one resampled), shards and the built-in corpus."""
    cfg = get_preset("tiny").audio
    sf.write(str(corpus / "b" / "long.wav"), synth_clip(99, 60.0, 16000)[0], 16000)
    prepare(corpus, tmp_path / "shards", cfg, shard_size=8, progress=False)
    datasets = [build_dataset(micro_config(**{"data.path": str(corpus)}).data, cfg),
                ShardDataset(tmp_path / "shards", cfg), build_dataset(micro_config().data, cfg)]
    for ds in datasets:
        for i in range(0, len(ds), 5):
            waves = ds.crop(i, torch.Generator().manual_seed(i))
            got = batch_fbank(waves[None], torch.tensor([waves.numel()]), cfg)[0]
            want = ds.spectrogram(i, torch.Generator().manual_seed(i))[0]
            torch.testing.assert_close(got, want, atol=2e-4, rtol=0, msg=f"{type(ds).__name__} item {i}")
