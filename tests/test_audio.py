import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi

from ajepa.audio import AudioError, crop_or_pad, fbank, file_to_spec, load_audio, normalize, waveform_to_spec
from ajepa.config import AudioConfig

CFG = AudioConfig(target_frames=128)


def _tone(sr, seconds, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)


def test_fbank_equals_direct_torchaudio_call():
    wave = torch.from_numpy(_tone(16000, 1.3)[:, 0])
    expect = kaldi.fbank(
        (wave - wave.mean()).unsqueeze(0), htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25,
    )
    got = fbank(wave, AudioConfig())
    assert got.shape == (128, 128)  # (1.3 s - 25 ms) / 10 ms + 1 frames
    assert torch.equal(got, expect)


def test_normalize_uses_audioset_constants_by_default():
    x = torch.tensor([-4.2677393, -4.2677393 + 2 * 4.5689974])
    assert torch.allclose(normalize(x, AudioConfig()), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("ext,subtype", [(".wav", "PCM_16"), (".flac", "PCM_16"), (".ogg", "VORBIS")])
def test_decode_formats_stereo_to_mono_and_resample(tmp_path, ext, subtype):
    path = tmp_path / f"clip{ext}"
    sf.write(str(path), _tone(44100, 0.8, channels=2), 44100, subtype=subtype)
    wave, sr = load_audio(path)
    assert sr == 44100 and wave.dim() == 1
    spec = file_to_spec(path, CFG)
    assert spec.shape == (128, 128) and torch.isfinite(spec).all()
    # 0.8 s at 16 kHz gives 78 frames; the rest is zero padding before normalization
    assert torch.allclose(spec[78:], normalize(torch.zeros(1), CFG).expand(50, 128))


def test_crop_or_pad():
    spec = torch.arange(10.0)[:, None].expand(10, 3)
    assert torch.equal(crop_or_pad(spec, 4, offset=3)[:, 0], torch.tensor([3.0, 4, 5, 6]))
    assert torch.equal(crop_or_pad(spec, 4, offset=100)[:, 0], torch.tensor([6.0, 7, 8, 9]))
    padded = crop_or_pad(spec, 12)
    assert padded.shape == (12, 3) and torch.equal(padded[10:], torch.zeros(2, 3))


def test_random_crop_is_seeded():
    wave = torch.from_numpy(_tone(16000, 3.0)[:, 0])
    a = waveform_to_spec(wave, 16000, CFG, crop_offset=None, generator=torch.Generator().manual_seed(1))
    b = waveform_to_spec(wave, 16000, CFG, crop_offset=None, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_bad_audio_errors_name_the_problem(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    with pytest.raises(AudioError, match="bad.wav: cannot decode"):
        load_audio(bad)
    with pytest.raises(AudioError, match="NaN or Inf"):
        waveform_to_spec(torch.tensor([0.0, float("nan")] * 800), 16000, CFG)
    with pytest.raises(AudioError, match="empty"):
        waveform_to_spec(torch.zeros(0), 16000, CFG)
