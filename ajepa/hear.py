"""The HEAR 2021 API (hearbenchmark.com) over an ajepa encoder.

    import ajepa.hear as hear
    model = hear.load_model("runs/tiny/checkpoint.pt")        # or an export: .safetensors / save_pretrained folder
    scene = hear.get_scene_embeddings(audio, model)            # audio float32 [n, samples] in [-1, 1], 16 kHz
    emb, ts = hear.get_timestamp_embeddings(audio, model)      # [n, T, D] and [n, T] centre times in ms

Whole clips: windows of the encoder's input length back to back, the last one padded and its padding
left out; scene embeddings are the mean over windows, timestamp embeddings one vector per 160 ms
patch column (`Encoder.frames`). Audio is moved to the model's device.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ajepa.eval.embed import Encoder, load_encoder


class HearModel(nn.Module):
    """What `load_model` returns: the encoder plus the attributes the HEAR API asks for."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.sample_rate = encoder.cfg.audio.sample_rate
        self.scene_embedding_size = encoder.dim
        self.timestamp_embedding_size = encoder.dim


def load_model(model_file_path: str = "", device: str | torch.device | None = None) -> HearModel:
    """A checkpoint (.pt, its EMA target encoder), a .safetensors export or a save_pretrained folder."""
    if not model_file_path:
        raise ValueError("load_model needs model_file_path: an ajepa checkpoint, .safetensors export or "
                         "save_pretrained folder (ajepa ships no downloadable weights)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HearModel(load_encoder(model_file_path, device=device))


def _check(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    if not isinstance(model, HearModel):
        raise TypeError("model must come from ajepa.hear.load_model")
    audio = torch.as_tensor(audio)
    if audio.dim() != 2 or audio.shape[1] == 0:
        raise ValueError(f"audio must be [n_sounds, n_samples], got shape {tuple(audio.shape)}")
    return audio.to(model.encoder.device, torch.float32)


@torch.no_grad()
def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """[n, samples] at model.sample_rate -> [n, scene_embedding_size] float32."""
    audio = _check(audio, model)
    return torch.stack([model.encoder.embed_clip(clip, model.sample_rate) for clip in audio])


@torch.no_grad()
def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, samples] at model.sample_rate -> (embeddings [n, T, D] float32, timestamps [n, T] in ms)."""
    audio = _check(audio, model)
    pairs = [model.encoder.frames(clip, model.sample_rate) for clip in audio]
    emb = torch.stack([e for e, _ in pairs])
    ts = torch.stack([t for _, t in pairs]).to(emb.device)
    return emb, ts
