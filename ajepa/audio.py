"""Audio frontend: decode, mono, resample, kaldi fbank, crop/pad, normalize (as AudioMAE)."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from ajepa.config import AudioConfig

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


class AudioError(ValueError):
    """An audio file or signal that cannot be turned into a spectrogram."""


def _check_file(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        try:
            path.stat()
        except OSError as exc:
            if exc.errno == 40:  # ELOOP
                raise AudioError(f"{path}: symlink loop") from None
        raise AudioError(f"{path}: broken symlink (points to {os.readlink(path)})")
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")


def load_audio(path: str | Path, start: int = 0, frames: int = -1) -> tuple[torch.Tensor, int]:
    """Decode a WAV/FLAC/OGG file with soundfile: samples [start, start + frames) (all by default).
    Returns (mono float32 [S], sample_rate)."""
    path = Path(path)
    _check_file(path)
    import soundfile as sf  # imported on first use: the built-in corpus needs no audio decoder

    try:
        data, sr = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)  # [S, C]
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


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _mel_bank(num_bins: int, padded: int, sample_rate: int) -> torch.Tensor:
    """kaldi's mel filter bank [num_bins, padded // 2 + 1] (the Nyquist column zero), as kaldi.fbank builds it
    with its defaults (low 20 Hz, high = Nyquist, no VTLN)."""
    bank, _ = kaldi.get_mel_banks(num_bins, padded, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
    return torch.nn.functional.pad(bank, (0, 1))


def batch_fbank(waves: torch.Tensor, lengths: torch.Tensor, cfg: AudioConfig, validate: bool = True) -> torch.Tensor:
    """The frontend for a whole batch in one computation, on whatever device `waves` is on:
    mono waveforms at cfg.sample_rate, padded [B, S], with their `lengths` [B] -> normalized
    log-mel spectrograms [B, cfg.target_frames, cfg.num_mel_bins].

    Per clip it computes what `fbank` + `crop_or_pad` (offset 0) + `normalize` compute: the clip's
    mean removed (a clip shorter than one window is zero-padded to one first), kaldi framing
    (snip_edges: 1 + (L - win) // hop frames), per-frame DC removal, pre-emphasis 0.97, a symmetric
    Hanning window, the power spectrum of the window zero-padded to a power of two, kaldi's mel
    bank and the log, floored at float eps; frames past the clip's end are zero before
    normalization, as padding is. Matches `torchaudio.compliance.kaldi.fbank` per clip to within
    float rounding (tests/test_audio.py). `validate=False` skips the lengths check, a host sync on a GPU
    (the training loop's collator builds them)."""
    if waves.dim() != 2 or lengths.dim() != 1 or lengths.numel() != waves.shape[0]:
        raise AudioError(f"batch_fbank: waves must be [B, S] and lengths [B], got {tuple(waves.shape)} "
                         f"and {tuple(lengths.shape)}")
    if validate and (bool((lengths < 1).any()) or bool((lengths > waves.shape[1]).any())):
        raise AudioError(f"batch_fbank: lengths must be in 1..{waves.shape[1]}")
    waves, device = waves.float(), waves.device
    B, S = waves.shape
    win = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    hop = int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
    T = cfg.target_frames
    lengths = lengths.to(device=device, dtype=torch.long).clamp(min=win)  # short clips: one zero-padded window
    need = (T - 1) * hop + win
    waves = torch.nn.functional.pad(waves, (0, max(0, need - S)))[:, : max(need, S)]
    samples = torch.arange(waves.shape[1], device=device)
    inside = samples[None, :] < lengths[:, None]
    waves = torch.where(inside, waves, 0.0)
    waves = torch.where(inside, waves - waves.sum(1, keepdim=True) / lengths[:, None], 0.0)
    frames = waves[:, :need].unfold(1, win, hop)  # [B, T, win]
    frames = frames - frames.mean(-1, keepdim=True)
    frames = frames - 0.97 * torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames * torch.hann_window(win, periodic=False, device=device)
    power = torch.fft.rfft(frames, n=_pow2(win)).abs().pow(2)
    mel = power @ _mel_bank(cfg.num_mel_bins, _pow2(win), cfg.sample_rate).to(device).T
    mel = mel.clamp_min(torch.finfo(mel.dtype).eps).log()
    valid = torch.arange(T, device=device)[None, :] < (1 + (lengths - win) // hop)[:, None]
    return normalize(torch.where(valid[..., None], mel, 0.0), cfg)


def crop_or_pad(spec: torch.Tensor, frames: int, offset: int = 0) -> torch.Tensor:
    """[F0, M] -> [frames, M]: zero-pad at the end, or crop starting at `offset`."""
    n = spec.shape[0]
    if n < frames:
        return torch.nn.functional.pad(spec, (0, 0, 0, frames - n))
    offset = max(0, min(offset, n - frames))
    return spec[offset : offset + frames]


def normalize(spec: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    return (spec - cfg.norm_mean) / (2.0 * cfg.norm_std)


def audio_rows(spec: torch.Tensor, cfg: AudioConfig, patch_frames: int) -> torch.Tensor:
    """int64 [B]: how many patch rows (of `patch_frames` frames) of normalized spectrograms
    spec [B, 1, frames, mel] (or [B, frames, mel]) hold the clip's own audio.

    crop_or_pad zero-pads a short clip's log-mel at its end, so its padding frames equal normalize(0)
    in every mel bin: the trailing run of such frames is padding. A row with at least one frame of
    audio counts; a clip that is all padding counts every row."""
    pad = normalize(torch.zeros((), dtype=spec.dtype), cfg).to(spec.device)
    frames = spec.shape[-2]
    is_pad = (spec.reshape(spec.shape[0], frames, -1) == pad).all(dim=-1)  # [B, frames]
    trailing = is_pad.flip(1).to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]
    real = frames - trailing
    return torch.where(real > 0, (real + patch_frames - 1) // patch_frames,
                       torch.full_like(real, frames // patch_frames))


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


SEEK_FACTOR = 4  # files over this many crops long are read only under the crop


def _hop(cfg: AudioConfig) -> int:
    return int(cfg.sample_rate * cfg.frame_shift_ms / 1000)


def crop_samples(cfg: AudioConfig) -> int:
    """Samples (at cfg.sample_rate) that cfg.target_frames kaldi frames span."""
    return (cfg.target_frames - 1) * _hop(cfg) + int(cfg.sample_rate * cfg.frame_length_ms / 1000)


def crop_plan(samples: int, cfg: AudioConfig, crop_offset: int | None, generator) -> int | None:
    """The crop's first frame for a clip of `samples` samples at cfg.sample_rate, drawn as
    `waveform_to_spec` draws it (crop_offset None) or clamped; None when the clip is short enough
    (under SEEK_FACTOR crops) to be framed whole."""
    if samples < SEEK_FACTOR * crop_samples(cfg):
        return None
    extra = kaldi_frames(samples, cfg) - cfg.target_frames
    if crop_offset is None:
        crop_offset = int(torch.randint(0, extra + 1, (1,), generator=generator)) if extra > 0 else 0
    return max(0, min(crop_offset, extra))


def crop_wave(wave: torch.Tensor, cfg: AudioConfig, crop_offset: int | None, generator=None):
    """(wave, crop_offset) for `waveform_to_spec`: a long clip at cfg.sample_rate is cut to the samples
    under its crop first (offset 0 after), so its fbank is computed over the crop only."""
    first = crop_plan(wave.numel(), cfg, crop_offset, generator)
    if first is None:
        return wave, crop_offset
    start = first * _hop(cfg)
    return wave[start : start + crop_samples(cfg)], 0


def window_span(samples: int, cfg: AudioConfig, crop_offset: int | None, generator=None) -> slice:
    """The samples under the crop of a clip of `samples` samples at cfg.sample_rate: kaldi frames
    offset .. offset + target_frames - 1, the offset drawn as `waveform_to_spec` draws it (crop_offset
    None) or clamped. A clip shorter than the crop is covered whole."""
    extra = kaldi_frames(samples, cfg) - cfg.target_frames
    if crop_offset is None:
        crop_offset = int(torch.randint(0, extra + 1, (1,), generator=generator)) if extra > 0 else 0
    start = max(0, min(crop_offset, extra)) * _hop(cfg)
    return slice(start, start + crop_samples(cfg))


def window_of(wave: torch.Tensor, cfg: AudioConfig, crop_offset: int | None, generator=None) -> torch.Tensor:
    """`wave[window_span(...)]`: the samples under the clip's crop."""
    return wave[window_span(wave.numel(), cfg, crop_offset, generator)]


def kaldi_frames(samples: int, cfg: AudioConfig) -> int:
    """Frames kaldi.fbank gives for `samples` samples at cfg.sample_rate (snip_edges; short clips pad to one)."""
    win = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    shift = int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
    return 1 + (samples - win) // shift if samples >= win else 1


def _crop_window(path: Path, cfg: AudioConfig, crop_offset: int | None, generator) -> tuple[torch.Tensor, int] | None:
    """For a file much longer than the crop: decode only the samples the crop's frames need.

    Returns (mono wave, sample_rate) starting at the crop, or None to decode the whole file (short
    files, unreadable headers: the full path reports those). The crop offset is drawn exactly as
    `waveform_to_spec` draws it from the whole file's frame count."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:
        return None
    sr, total = int(info.samplerate), int(info.frames)
    if sr <= 0 or total <= 0:
        return None
    resampled = math.ceil(total * cfg.sample_rate / sr)
    crop_offset = crop_plan(resampled, cfg, crop_offset, generator)
    if crop_offset is None:  # short enough: decode it whole, bit-identical to waveform_to_spec
        return None
    shift, need = _hop(cfg), crop_samples(cfg)
    start = crop_offset * shift  # the crop's first sample at cfg.sample_rate
    if sr == cfg.sample_rate:
        wave, _ = load_audio(path, start=start, frames=need)
        return wave, sr
    # Read from a sample where the resampler's phase matches the whole file's (a multiple of
    # sr / gcd file samples), with a margin that keeps its edge effects out of the crop.
    g = math.gcd(sr, cfg.sample_rate)
    period_in, period_out = sr // g, cfg.sample_rate // g
    first_out = max(0, (start - 64) // period_out * period_out)
    lo = first_out // period_out * period_in
    hi = min(total, math.ceil((start + need + 64) * sr / cfg.sample_rate))
    wave, _ = load_audio(path, start=lo, frames=hi - lo)
    wave = resample(wave, sr, cfg.sample_rate)
    skip = start - first_out
    return wave[skip : skip + need], cfg.sample_rate


def file_to_crop(path: str | Path, cfg: AudioConfig, crop_offset: int | None = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The samples under a file's crop, mono at cfg.sample_rate (at most `crop_samples(cfg)` of them):
    the loader's share of the work when the fbank runs batched on the device (`batch_fbank`)."""
    path = Path(path)
    _check_file(path)
    window = _crop_window(path, cfg, crop_offset, generator)
    if window is not None:
        wave = window[0]
    else:
        wave, sr = load_audio(path)
        wave = window_of(resample(wave, sr, cfg.sample_rate), cfg, crop_offset, generator)
    if wave.numel() == 0:
        raise AudioError(f"{path}: empty waveform (0 samples)")
    if not bool(wave.isfinite().all()):
        raise AudioError(f"{path}: waveform holds NaN or Inf samples")
    return wave


def file_to_spec(path: str | Path, cfg: AudioConfig, crop_offset: int | None = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """`waveform_to_spec` of a file. A long file is not decoded whole: only the samples under the
    crop are read (soundfile seeks), so a 10-minute file costs what a 10-second one does."""
    path = Path(path)
    _check_file(path)
    window = _crop_window(path, cfg, crop_offset, generator)
    if window is not None:
        wave, sr = window
        crop_offset = 0
    else:
        wave, sr = load_audio(path)
    try:
        return waveform_to_spec(wave, sr, cfg, crop_offset=crop_offset, generator=generator)
    except AudioError as exc:
        raise AudioError(f"{path}: {exc}") from exc
