"""An X-ARES-style encoder (the `xares` benchmark's interface) over an ajepa encoder.

    enc = XaresEncoder.from_checkpoint("runs/tiny/checkpoint.pt")    # or .safetensors / save_pretrained folder
    feats = enc(wav)                                                 # wav [B, S] at 16 kHz -> [B, T, D]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ajepa.eval.embed import Encoder, load_encoder


class XaresEncoder(nn.Module):
    """`sampling_rate`, `output_dim`, `hop_size_in_ms` and `forward(wav [B, S]) -> [B, T, D]`: one vector
    per 160 ms patch column over the whole clip (`Encoder.frames`)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        a = encoder.cfg.audio
        self.sampling_rate = a.sample_rate
        self.output_dim = encoder.dim
        self.hop_size_in_ms = encoder.cfg.patch_shape[0] * a.frame_shift_ms

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> XaresEncoder:
        return cls(load_encoder(path, device=device))

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        wav = torch.as_tensor(wav)
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)
        if wav.dim() != 2 or wav.shape[1] == 0:
            raise ValueError(f"wav must be [B, samples], got shape {tuple(wav.shape)}")
        return torch.stack([self.encoder.frames(w, self.sampling_rate)[0] for w in wav])
