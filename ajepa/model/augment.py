"""The context encoder's view of a batch: optional per-clip nuisance changes the target encoder never sees.

The predictor must then regress the clean clip's target latents from a changed context, so the context
encoder is pushed to be invariant to those changes (as BYOL-A's and LeJEPA's augmented views do):

- a shift along the mel axis by a whole number of bins, drawn per clip (a rough stand-in for another
  voice's pitch and formants; the vacated bins repeat the edge bin);
- a gain in dB, drawn per clip, added to every frame that holds audio (zero-padding stays padding).

Draws use the global torch RNG, as SIGReg's random directions do.
"""

from __future__ import annotations

import math

import torch

from ajepa.audio import normalize
from ajepa.config import AudioConfig


def mel_shift(spec: torch.Tensor, max_bins: int) -> torch.Tensor:
    """spec [B, 1, frames, mel] with each clip moved by its own shift in [-max_bins, max_bins] mel bins."""
    B, _, T, M = spec.shape
    shift = torch.randint(-max_bins, max_bins + 1, (B,), device=spec.device)
    src = (torch.arange(M, device=spec.device)[None, :] - shift[:, None]).clamp_(0, M - 1)  # [B, M]
    return torch.gather(spec, 3, src[:, None, None, :].expand(B, 1, T, M))


def gain(spec: torch.Tensor, max_db: float, audio: AudioConfig) -> torch.Tensor:
    """spec with each clip's audio frames raised by its own gain in [-max_db, max_db] dB. The fbank is the
    natural log of mel power, so g dB adds g ln(10) / 10 before normalization."""
    B = spec.shape[0]
    db = (torch.rand(B, device=spec.device, dtype=spec.dtype) * 2 - 1) * max_db
    step = db * (math.log(10) / 10) / (2.0 * audio.norm_std)  # in normalized units
    pad = normalize(torch.zeros((), dtype=spec.dtype), audio).to(spec.device)
    is_audio = ~(spec == pad).all(dim=-1, keepdim=True)  # [B, 1, frames, 1]: padding frames stay as they are
    return spec + step.view(B, 1, 1, 1) * is_audio


def context_view(spec: torch.Tensor, max_mel_shift: int, max_gain_db: float, audio: AudioConfig) -> torch.Tensor:
    """What the context encoder sees (model.ctx_mel_shift, model.ctx_gain_db); spec itself when both are 0."""
    if max_gain_db > 0:
        spec = gain(spec, max_gain_db, audio)
    if max_mel_shift > 0:
        spec = mel_shift(spec, max_mel_shift)
    return spec
