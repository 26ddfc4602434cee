"""Audio frontend: decode, mono, resample, kaldi fbank, crop/pad, normalize (as AudioMAE)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from ajepa.config import AudioConfig

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


class AudioError(ValueError):
    """An audio file or signal that cannot be turned into a spectrogram."""


def load_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Decode a WAV/FLAC/OGG file with soundfile. Returns (mono float32 [S], sample_rate)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    import soundfile as sf  # imported on first use: the built-in corpus needs no audio decoder

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [S, C]
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError/TypeError by format
        hint = "unsupported or corrupt format: " if "not recognised" in str(exc).lower() else ""
        raise AudioError(f"{path}: cannot decode ({hint}{exc})") from exc
    return to_mono(torch.from_numpy(np.ascontiguousarray(data.T))), int(sr)


def to_mono(wave: torch.Tensor) -> torch.Tensor:
    """[S] or [C, S] -> [S] by averaging channels."""
    if wave.dim() == 1:
        return wave
    if wave.dim() == 2:
        return wave.mean(dim=0)
    raise AudioError(f"waveform must be [S] or [C, S], got shape {tuple(wave.shape)}")


def resample(wave: torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    if sr == target_sr:
        return wave
    return AF.resample(wave, orig_freq=sr, new_freq=target_sr)


def fbank(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """Kaldi log-mel filterbank of a mono 1-D waveform at cfg.sample_rate: [frames, num_mel_bins]."""
    if wave.dim() != 1:
        raise AudioError(f"fbank expects a mono 1-D waveform, got shape {tuple(wave.shape)}")
    min_len = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    if wave.numel() < min_len:
        wave = torch.nn.functional.pad(wave, (0, min_len - wave.numel()))
    wave = wave - wave.mean()
    return kaldi.fbank(
        wave.unsqueeze(0),
        htk_compat=True,
        sample_frequency=cfg.sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=cfg.num_mel_bins,
        dither=0.0,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
    )


def crop_or_pad(spec: torch.Tensor, frames: int, offset: int = 0) -> torch.Tensor:
    """[F0, M] -> [frames, M]: zero-pad at the end, or crop starting at `offset`."""
    n = spec.shape[0]
    if n < frames:
        return torch.nn.functional.pad(spec, (0, 0, 0, frames - n))
    offset = max(0, min(offset, n - frames))
    return spec[offset : offset + frames]


def normalize(spec: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    return (spec - cfg.norm_mean) / (2.0 * cfg.norm_std)


def waveform_to_spec(
    wave: torch.Tensor, sr: int, cfg: AudioConfig, crop_offset: int | None = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Full frontend for one clip: -> normalized [target_frames, num_mel_bins].

    crop_offset=None draws the crop offset of a long clip from `generator`.
    """
    wave = to_mono(wave).float()
    if wave.numel() == 0:
        raise AudioError("empty waveform (0 samples)")
    if not torch.isfinite(wave).all():
        raise AudioError("waveform holds NaN or Inf samples")
    spec = fbank(resample(wave, sr, cfg.sample_rate), cfg)
    if crop_offset is None:
        extra = spec.shape[0] - cfg.target_frames
        crop_offset = int(torch.randint(0, extra + 1, (1,), generator=generator)) if extra > 0 else 0
    return normalize(crop_or_pad(spec, cfg.target_frames, crop_offset), cfg)


def file_to_spec(path: str | Path, cfg: AudioConfig, **kw) -> torch.Tensor:
    wave, sr = load_audio(path)
    try:
        return waveform_to_spec(wave, sr, cfg, **kw)
    except AudioError as exc:
        raise AudioError(f"{path}: {exc}") from exc
