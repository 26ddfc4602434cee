"""Frozen encoders for downstream use: safe checkpoint loading, safetensors export, embeddings.

    enc = ajepa.load_encoder("runs/tiny/checkpoint.pt")          # the EMA target encoder, eval mode
    feats = enc.embed(wave, sample_rate=44100)                   # [B, D] (mean over tokens)
    tokens = enc.embed(wave, 16000, pooling="none")              # [B, N, D] token map
    feats = enc.embed_files(["a.wav", "b.flac"])                 # [len(paths), D]

Checkpoints are read with ``torch.load(weights_only=True)``: no arbitrary code runs on load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from ajepa.audio import audio_rows, crop_or_pad, fbank, file_to_spec, load_audio, normalize, resample, waveform_to_spec
from ajepa.checkpoint import FORMAT_VERSION, load_checkpoint
from ajepa.config import Config, from_dict, get_preset, to_dict
from ajepa.masks import clip_min_rows
from ajepa.model.vit import ViTEncoder

WHICH = ("target", "context")
WINDOW_BATCH = 32  # windows of one clip per forward pass
POOLINGS = ("mean", "mean_all", "none")
SAFETENSORS_KIND = "ajepa-encoder"

def read_checkpoint(path: str | Path) -> dict:
    """Load an ajepa checkpoint with ``weights_only=True``; it must hold its config and model."""
    return load_checkpoint(path, require=("config", "model"))


def config_from_checkpoint(state: dict, path: str | Path = "checkpoint") -> Config:
    """The run's Config; missing keys (an older package) take today's defaults, unknown ones fail."""
    try:
        return from_dict(state["config"])
    except ValueError as exc:
        raise ValueError(f"{path}: its config cannot be read by this ajepa ({exc})") from None


def strict_load(module: nn.Module, weights: dict, what: str) -> None:
    """load_state_dict that names missing/unexpected keys and mismatched shapes in one message."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {', '.join(shapes)}")
    if problems:
        raise ValueError(f"{what}: weights do not fit the encoder ({'; '.join(problems)})")
    module.load_state_dict(weights)


def _encoder_weights(model_state: dict, which: str, path) -> dict:
    if which not in WHICH:
        raise ValueError(f"which={which!r}; choose one of {WHICH}")
    prefix = "target_encoder." if which == "target" else "encoder."
    weights = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{path}: the checkpoint holds no {prefix}* weights")
    return weights


def audio_token_mask(spec: torch.Tensor, cfg: Config, min_rows: int = 1) -> torch.Tensor:
    """bool [B, N]: the tokens whose time row holds at least one frame of the clip's own audio
    (ajepa.audio.audio_rows: the trailing frames equal to normalize(0) are padding); with `min_rows`,
    at least that many rows of each clip."""
    return row_token_mask(audio_rows(spec, cfg.audio, cfg.patch_shape[0]).clamp_min(min_rows), cfg.grid)


def row_token_mask(rows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """bool [B, N]: the tokens of each sample's first rows[b] time rows (a time-major Gt x Gf grid)."""
    gt, gf = grid
    keep_row = torch.arange(gt, device=rows.device)[None, :] < rows[:, None]  # [B, Gt]
    return keep_row[:, :, None].expand(-1, gt, gf).reshape(rows.shape[0], gt * gf)


class Encoder(nn.Module):
    """A frozen ViT encoder plus the audio frontend it was trained with."""

    def __init__(self, cfg: Config, vit: ViTEncoder | None = None):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.vit = vit or ViTEncoder(cfg.grid, cfg.patch_shape, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio,
                                     m.pos_scale)
        self.eval()
        self.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.vit.dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _autocast(self, amp: bool):
        if amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """spec [B, 1, frames, mel] (normalized) -> token map [B, N, D]. An encoder trained with
        model.clip_tokens_only attends only to the clip's own tokens (at least the rows training gave it)."""
        keep = None
        if self.cfg.model.clip_tokens_only:
            keep = audio_token_mask(spec, self.cfg, clip_min_rows(self.cfg.masks, self.cfg.grid))
        return self.vit.forward_dense(spec, keep=keep)

    @torch.no_grad()
    def embed_spec(self, spec: torch.Tensor, pooling: str = "mean", amp: bool = True) -> torch.Tensor:
        """Normalized spectrograms [B, 1, frames, mel] or [B, frames, mel] -> float32 features.

        pooling "mean": the mean over the tokens that hold the clip's own audio (not the zero-padding
        past a short clip's end; see audio_token_mask); "mean_all": the mean over every token (the
        behaviour before padding-aware pooling); "none": the token map [B, N, D]."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; choose one of {POOLINGS}")
        if spec.dim() == 3:
            spec = spec.unsqueeze(1)
        want = (1, self.cfg.audio.target_frames, self.cfg.audio.num_mel_bins)
        if spec.dim() != 4 or tuple(spec.shape[1:]) != want:
            raise ValueError(f"spec must be [B, {', '.join(map(str, want))}], got {tuple(spec.shape)}")
        was_training = self.training
        self.eval()
        try:
            with self._autocast(amp):
                tokens = self(spec.to(self.device, torch.float32))
        finally:
            self.train(was_training)
        tokens = tokens.float()
        if pooling == "mean_all":
            return tokens.mean(dim=1)
        if pooling == "mean":
            keep = audio_token_mask(spec.to(tokens.device, torch.float32), self.cfg).to(tokens.dtype)  # [B, N]
            return (tokens * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)
        return tokens

    @torch.no_grad()
    def embed(self, waveform, sample_rate: int, pooling: str = "mean", amp: bool = True,
              hop_frames: int | None = None) -> torch.Tensor:
        """Audio [S] or [B, S] at any sample rate -> [B, D] (pooling="mean": over the clip's own audio,
        "mean_all": over every token) or [B, N, D] ("none").

        Pooled embeddings cover the whole clip (`embed_clip`: windows of cfg.audio.target_frames back to
        back, the last padded, the mean over windows); the token map ("none") is the first window's."""
        wave = torch.as_tensor(waveform)
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        if wave.dim() != 2 or wave.shape[1] == 0:
            raise ValueError(f"waveform must be [S] or [B, S] with S > 0, got shape {tuple(wave.shape)}")
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        wave = wave.detach().float().cpu()
        if pooling in ("mean", "mean_all"):
            return torch.stack([self.embed_clip(w, sample_rate, hop_frames, amp, pooling) for w in wave])
        spec = torch.stack([waveform_to_spec(w, sample_rate, self.cfg.audio) for w in wave]).unsqueeze(1)
        return self.embed_spec(spec, pooling, amp)

    @torch.no_grad()
    def embed_files(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 32,
        pooling: str = "mean",
        amp: bool = True,
        progress: bool = False,
        hop_frames: int | None = None,
    ) -> torch.Tensor:
        """Embed audio files: [len(paths), D], each over the whole file (see `embed`), or the first
        window's token maps [len(paths), N, D] in batches (pooling "none")."""
        if pooling in ("mean", "mean_all"):
            from tqdm import tqdm

            return torch.stack([self.embed_clip(*load_audio(p), hop_frames, amp, pooling).cpu()
                                for p in tqdm(paths, desc="embed", disable=not progress, unit="file")]
                               ) if len(paths) else torch.zeros(0, self.dim)
        return self.embed_specs(
            (file_to_spec(p, self.cfg.audio) for p in paths), len(paths), batch_size, pooling, amp, progress
        )

    @torch.no_grad()
    def embed_specs(
        self,
        specs: Iterable[torch.Tensor],
        total: int | None = None,
        batch_size: int = 32,
        pooling: str = "mean",
        amp: bool = True,
        progress: bool = False,
        desc: str = "embed",
    ) -> torch.Tensor:
        """Embed an iterable of spectrograms ([frames, mel] or [1, frames, mel]) in batches."""
        from tqdm import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out, chunk = [], []
        with tqdm(total=total, desc=desc, disable=not progress, unit="clip") as bar:
            for spec in specs:
                chunk.append(spec.reshape(1, *spec.shape[-2:]))
                if len(chunk) == batch_size:
                    out.append(self.embed_spec(torch.stack(chunk), pooling, amp).cpu())
                    bar.update(len(chunk))
                    chunk = []
            if chunk:
                out.append(self.embed_spec(torch.stack(chunk), pooling, amp).cpu())
                bar.update(len(chunk))
        if not out:
            shape = (0, self.cfg.num_patches, self.dim) if pooling == "none" else (0, self.dim)
            return torch.zeros(shape)
        return torch.cat(out)

    # ------------------------------------------------------------------ whole clips

    def _windows(self, waveform, sample_rate: int, hop_frames: int | None) -> tuple[torch.Tensor, list[int], int]:
        """A whole clip as windows of target_frames frames every `hop_frames` (default: target_frames,
        back to back), the last one zero-padded: (normalized specs [W, 1, T, M], window starts, frames)."""
        a, p = self.cfg.audio, self.cfg.patch_shape[0]
        hop = a.target_frames if hop_frames is None else hop_frames
        if not 0 < hop <= a.target_frames or hop % p:
            raise ValueError(f"hop_frames={hop_frames}: must be a multiple of the patch's {p} frames "
                             f"in {p}..{a.target_frames}")
        wave = torch.as_tensor(waveform).detach().float().cpu()
        if wave.dim() != 1 or wave.numel() == 0:
            raise ValueError(f"waveform must be [S] with S > 0, got shape {tuple(wave.shape)}")
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        spec = fbank(resample(wave, sample_rate, a.sample_rate), a)  # [F, M], the whole clip
        starts = list(range(0, max(1, spec.shape[0] - a.target_frames + hop), hop))
        specs = torch.stack([normalize(crop_or_pad(spec[s:], a.target_frames), a) for s in starts])
        return specs.unsqueeze(1), starts, spec.shape[0]

    @torch.no_grad()
    def embed_clip(self, waveform, sample_rate: int, hop_frames: int | None = None, amp: bool = True,
                   pooling: str = "mean") -> torch.Tensor:
        """A whole clip [S] at any rate -> [D]: the mean over its windows of each window's mean over the
        tokens that hold audio (pooling "mean"; padding left out) or over every token ("mean_all")."""
        if pooling not in ("mean", "mean_all"):
            raise ValueError(f"pooling={pooling!r}: a whole clip pools with mean or mean_all")
        specs, _, _ = self._windows(waveform, sample_rate, hop_frames)
        return self._embed_windows(specs, pooling, amp).mean(dim=0)

    def _embed_windows(self, specs: torch.Tensor, pooling: str, amp: bool) -> torch.Tensor:
        """embed_spec over a clip's windows, WINDOW_BATCH at a time: memory stays bounded for long audio
        (20 minutes are 118 windows of 10.24 s)."""
        return torch.cat([self.embed_spec(specs[i : i + WINDOW_BATCH], pooling, amp)
                          for i in range(0, specs.shape[0], WINDOW_BATCH)])

    @torch.no_grad()
    def frames(self, waveform, sample_rate: int, hop_frames: int | None = None,
               amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole clip [S] at any rate -> (features [C, D], centre times in ms [C]): one vector per patch
        column (a patch's frames: 160 ms at 16 x 10 ms), the mean over its frequency patches, stitched
        across windows with no gap and no duplicate (each column from the last window that starts at or
        before it), up to the clip's last frame."""
        specs, starts, total = self._windows(waveform, sample_rate, hop_frames)
        tokens = self._embed_windows(specs, "none", amp)  # [W, N, D]
        gt, gf = self.cfg.grid
        columns = tokens.reshape(len(starts), gt, gf, -1).mean(dim=2)  # [W, Gt, D]
        p = self.cfg.patch_shape[0]
        count = -(-total // p)  # columns that hold at least one frame of the clip
        owner = [max(w for w, s in enumerate(starts) if s <= c * p) for c in range(count)]
        feats = torch.stack([columns[w, c - starts[w] // p] for c, w in enumerate(owner)])
        times = (torch.arange(count, dtype=torch.float64) * p + p / 2) * self.cfg.audio.frame_shift_ms
        return feats, times.float()

    # ------------------------------------------------------------------ files

    def save_pretrained(self, folder: str | Path) -> Path:
        """A folder in the layout Hugging Face tooling expects, offline: config.json + model.safetensors."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"kind": SAFETENSORS_KIND, "format_version": FORMAT_VERSION,
                                                        "config": to_dict(self.cfg)}, indent=2))
        self.save_safetensors(folder / "model.safetensors")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> Encoder:
        return load_encoder(folder, device=device)

    def save_safetensors(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the encoder's weights as safetensors, with its config as JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": SAFETENSORS_KIND,
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(to_dict(self.cfg)),
        }
        meta.update({k: str(v) for k, v in (extra or {}).items()})
        weights = {f"vit.{k}": v.detach().cpu().contiguous() for k, v in self.vit.state_dict().items()}
        save_file(weights, str(path), metadata=meta)
        return path


def _load_safetensors(path: Path) -> tuple[Config, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            weights = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("kind") != SAFETENSORS_KIND or "config" not in meta:
        raise ValueError(f"{path}: not an ajepa encoder export (metadata kind={meta.get('kind')!r})")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: export format {version} is newer than this ajepa understands ({FORMAT_VERSION}); upgrade ajepa"
        )
    try:
        cfg = from_dict(json.loads(meta["config"]))
    except ValueError as exc:
        raise ValueError(f"{path}: its config cannot be read by this ajepa ({exc})") from None
    return cfg, {k.removeprefix("vit."): v for k, v in weights.items()}


def _model_file(checkpoint: str | Path) -> Path:
    """The file behind `checkpoint`: itself, or a save_pretrained folder's model.safetensors."""
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no model.safetensors (a save_pretrained folder holds it)")
        path = path / "model.safetensors"
    return path


def load_encoder(checkpoint: str | Path, which: str = "target", device: str | torch.device = "cpu") -> Encoder:
    """An Encoder from a training checkpoint (.pt; `which` = "target" (EMA, default) or "context")
    or from an exported .safetensors file. Returned in eval mode with gradients off."""
    path = _model_file(checkpoint)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"encoder export not found: {path}")
        cfg, weights = _load_safetensors(path)
    else:
        state = read_checkpoint(path)
        cfg = config_from_checkpoint(state, path)
        weights = _encoder_weights(state["model"], which, path)
    enc = Encoder(cfg)
    strict_load(enc.vit, weights, str(path))
    return enc.to(device)


def random_encoder(cfg: Config, seed: int = 0, device: str | torch.device = "cpu") -> Encoder:
    """An untrained encoder of the shape `cfg` describes (the --random-init baseline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = Encoder(cfg)
    return enc.to(device)


def encoder_for(
    checkpoint: str | Path | None,
    random_init: bool = False,
    preset: str | None = None,
    which: str = "target",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Encoder:
    """The CLI's rule: the checkpoint's encoder, or with `random_init` an untrained encoder shaped
    like `preset` (or like the checkpoint's config when no preset is given)."""
    if not random_init:
        if checkpoint is None:
            raise ValueError("no encoder: give --checkpoint, or --random-init with --preset")
        return load_encoder(checkpoint, which, device)
    if preset is not None:
        return random_encoder(get_preset(preset), seed, device)
    if checkpoint is None:
        raise ValueError("--random-init needs --preset (or --checkpoint, whose shape it copies)")
    path = _model_file(checkpoint)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"encoder export not found: {path}")
        cfg = _load_safetensors(path)[0]
    else:
        cfg = config_from_checkpoint(read_checkpoint(path), path)
    return random_encoder(cfg, seed, device)


def dataset_features(
    enc: Encoder, dataset, batch_size: int = 32, progress: bool = False, pooling: str = "mean", desc: str = "embed"
) -> torch.Tensor:
    """Embed every clip of an ajepa dataset (crop from the start, no augmentation)."""
    specs = (dataset.spectrogram(i) for i in range(len(dataset)))
    return enc.embed_specs(specs, len(dataset), batch_size, pooling, progress=progress, desc=desc)


def dataset_paths(dataset) -> list[str]:
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        return [str(p) for p in paths]
    return [f"synthetic:{i}" for i in range(len(dataset))]
