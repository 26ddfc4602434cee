"""Frozen dataclass configs, named presets, YAML in/out and dotted overrides.

    cfg = get_preset("tiny")
    cfg = apply_overrides(cfg, ["train.steps=50", "masks.mode=tf"])
    save_config(cfg, "run/config.yaml"); cfg == load_config("run/config.yaml")
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

IMPLS = ("auto", "triton", "reference")
MASK_MODES = ("curriculum", "multiblock", "tf")
LOSSES = ("l2", "smooth_l1")
TARGET_NORMS = ("layer", "instance", "batch")
PARALLEL = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type or impossible setting."""


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_frames: int = 1024  # 10 ms hop: 1024 frames = 10.24 s
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    # AudioMAE's AudioSet statistics; `ajepa stats` computes a dataset's own.
    norm_mean: float = -4.2677393
    norm_std: float = 4.5689974


@dataclass(frozen=True)
class ModelConfig:
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pred_dim: int = 512
    pred_depth: int = 16
    pred_heads: int = 16
    loss: str = "l2"  # "l2" (the paper) | "smooth_l1" (I-JEPA's code)
    target_layers: int = 1  # average of the top K target-encoder blocks (data2vec 2.0 / EAT); 1 = the last
    target_norm: str = "layer"  # per-layer target normalization: "layer" (I-JEPA) | "instance" | "batch"
    signal_targets_only: bool = False  # leave constant patches (zero-padding, digital silence) out of the loss
    sigreg_weight: float = 0.0  # LeJEPA SIGReg on the context encoder's tokens; 0 disables
    sigreg_projections: int = 64  # random 1-D directions per SIGReg evaluation
    sigreg_content: bool = False  # SIGReg on the tokens minus their per-position batch mean (the clip-varying part)


@dataclass(frozen=True)
class MaskConfig:
    mode: str = "curriculum"  # "curriculum" | "multiblock" | "tf"
    context_scale: tuple[float, float] = (0.85, 1.0)
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    num_targets: int = 4
    tf_scale: tuple[float, float] = (0.05, 0.075)
    tf_num_targets: int = 3
    min_keep: int = 10
    curriculum_c0: float = 0.01


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_steps: int = 5000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    ema_start: float = 0.996
    ema_end: float = 1.0
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # audio folder or .csv/.jsonl manifest; None = built-in synthetic corpus
    synth_clips: int = 512
    random_crop: bool = True  # crop long clips at a random (seeded) offset, else from the start
    strict: bool = False  # a bad audio file is fatal (else it is skipped, logged once and counted)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 128
    seed: int = 0
    impl: str = "auto"  # kernel path: "auto" (Triton on CUDA) | "triton" | "reference"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    compile: bool = False
    num_workers: int = 2
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3  # checkpoints kept (checkpoint-<step>.pt); 0 keeps every one
    max_bad_steps: int = 5  # stop after this many consecutive non-finite steps
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) | "fsdp" (FSDP2 fully_shard)


@dataclass(frozen=True)
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (time, frequency)."""
        p = self.model.patch_size
        return self.audio.target_frames // p, self.audio.num_mel_bins // p

    @property
    def num_patches(self) -> int:
        t, f = self.grid
        return t * f


def _preset_tiny() -> Config:
    # SIGReg on the clip-varying part of the context tokens: without it the tiny run collapses (RankMe
    # falls, the features become mostly patch position) and probes no better than random init; see
    # docs/learning.md. A-JEPA's own recipe: --set model.sigreg_weight=0.
    return Config(
        audio=AudioConfig(target_frames=256),
        model=ModelConfig(embed_dim=192, depth=4, num_heads=3, pred_dim=96, pred_depth=2, pred_heads=3,
                          sigreg_weight=1.0, sigreg_content=True),
        optim=OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=30),
        data=DataConfig(synth_clips=256),
        train=TrainConfig(steps=600, batch_size=16, num_workers=1, log_every=10, ckpt_every=100),
    )


def _preset_small() -> Config:
    return Config(
        model=ModelConfig(embed_dim=384, depth=12, num_heads=6, pred_dim=256, pred_depth=8, pred_heads=8),
        optim=OptimConfig(lr=5e-4, warmup_steps=2000),
        train=TrainConfig(steps=50_000, batch_size=64),
    )


def _preset_base() -> Config:
    # ViT-B/16 encoder, 16-layer predictor of width 512, as in A-JEPA.
    return Config()


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": _preset_tiny,
    "small": _preset_small,
    "base": _preset_base,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return validate(PRESETS[name]())


# ---------------------------------------------------------------------------- typed conversion


def _convert(value, tp, where: str):
    """Convert a YAML/CLI value to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(data: dict, base: Config | None = None) -> Config:
    """Build a Config from nested dicts; missing keys keep `base`'s values (defaults if None)."""
    base = base or Config()
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in fields(Config)}
    updates = {}
    for sec_name, sec_data in data.items():
        if sec_name not in sections:
            raise ConfigError(f"unknown config section {sec_name!r}; sections are {sorted(sections)}")
        sec = getattr(base, sec_name)
        if not isinstance(sec_data, dict):
            raise ConfigError(f"{sec_name}: expected a mapping, got {sec_data!r}")
        hints = _hints(type(sec))
        kw = {}
        for key, value in sec_data.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {sec_name}.{key}; {sec_name} has {sorted(hints)}")
            kw[key] = _convert(value, hints[key], f"{sec_name}.{key}")
        updates[sec_name] = replace(sec, **kw)
    return validate(replace(base, **updates))


def to_dict(cfg: Config) -> dict:
    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()} for f in fields(cfg)}


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(path: str | Path, base: Config | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    return from_dict(data, base)


def apply_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """Apply `section.key=value` strings, e.g. ``train.steps=100``."""
    data: dict[str, dict] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        data.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(value) if value.strip() else value
    return from_dict(data, cfg) if data else cfg


# ---------------------------------------------------------------------------- validation


def _check_range(name: str, lo_hi: tuple[float, float], lo: float, hi: float) -> None:
    a, b = lo_hi
    if not (lo < a <= b <= hi):
        raise ConfigError(f"{name}={lo_hi}: need {lo} < min <= max <= {hi}")


def validate(cfg: Config) -> Config:
    """Reject impossible settings before any work starts; returns cfg unchanged."""
    a, m, k, o, t = cfg.audio, cfg.model, cfg.masks, cfg.optim, cfg.train
    p = m.patch_size
    if p < 1 or a.target_frames % p or a.num_mel_bins % p:
        raise ConfigError(
            f"audio.target_frames={a.target_frames} and audio.num_mel_bins={a.num_mel_bins} "
            f"must be multiples of model.patch_size={p}"
        )
    widths = (("model.embed_dim", m.embed_dim, m.num_heads), ("model.pred_dim", m.pred_dim, m.pred_heads))
    for name, dim, heads in widths:
        if heads < 1 or dim % heads:
            raise ConfigError(f"{name}={dim} must be divisible by its number of heads ({heads})")
        if not 8 <= dim // heads <= 128:
            raise ConfigError(
                f"{name}/heads = {dim // heads}: head dim must be in 8..128 (the attention kernel's range)")
    if m.depth < 1 or m.pred_depth < 1:
        raise ConfigError("model.depth and model.pred_depth must be >= 1")
    if m.loss not in LOSSES:
        raise ConfigError(f"model.loss={m.loss!r}; choose one of {LOSSES}")
    if m.target_norm not in TARGET_NORMS:
        raise ConfigError(f"model.target_norm={m.target_norm!r}; choose one of {TARGET_NORMS}")
    if not 1 <= m.target_layers <= m.depth:
        raise ConfigError(f"model.target_layers={m.target_layers} must be in 1..model.depth ({m.depth})")
    if not (math.isfinite(m.sigreg_weight) and m.sigreg_weight >= 0):
        raise ConfigError(f"model.sigreg_weight={m.sigreg_weight} must be finite and >= 0")
    if m.sigreg_projections < 1:
        raise ConfigError(f"model.sigreg_projections={m.sigreg_projections} must be >= 1")
    if k.mode not in MASK_MODES:
        raise ConfigError(f"masks.mode={k.mode!r}; choose one of {MASK_MODES}")
    _check_range("masks.context_scale", k.context_scale, 0.0, 1.0)
    _check_range("masks.target_scale", k.target_scale, 0.0, 1.0)
    _check_range("masks.tf_scale", k.tf_scale, 0.0, 1.0)
    _check_range("masks.target_aspect", k.target_aspect, 0.0, math.inf)
    if k.num_targets < 1 or k.tf_num_targets < 1:
        raise ConfigError("masks.num_targets and masks.tf_num_targets must be >= 1")
    if not 0.0 <= k.curriculum_c0 <= 1.0:
        raise ConfigError(f"masks.curriculum_c0={k.curriculum_c0} must be in [0, 1]")
    n = cfg.num_patches
    worst = max(k.num_targets * math.ceil(k.target_scale[1] * n), k.tf_num_targets * math.ceil(k.tf_scale[1] * n))
    if k.min_keep < 1 or n - worst < k.min_keep:
        raise ConfigError(
            f"masks.min_keep={k.min_keep}: the largest targets can cover {worst} of {n} patches, "
            f"leaving fewer than min_keep context patches; lower the target scales or min_keep"
        )
    if o.lr <= 0 or o.min_lr < 0 or o.warmup_steps < 0 or o.grad_clip < 0:
        raise ConfigError("optim.lr must be > 0; optim.min_lr, warmup_steps and grad_clip must be >= 0")
    if not (0.0 <= o.ema_start <= o.ema_end <= 1.0):
        raise ConfigError(f"optim.ema_start={o.ema_start}, ema_end={o.ema_end}: need 0 <= start <= end <= 1")
    if t.impl not in IMPLS:
        raise ConfigError(f"train.impl={t.impl!r}; choose one of {IMPLS}")
    if t.steps < 1 or t.batch_size < 1 or t.log_every < 1 or t.ckpt_every < 1 or t.num_workers < 0:
        raise ConfigError("train.steps, batch_size, log_every, ckpt_every must be >= 1 and num_workers >= 0")
    if t.keep_last < 0 or t.max_bad_steps < 1:
        raise ConfigError(f"train.keep_last={t.keep_last} must be >= 0 and train.max_bad_steps={t.max_bad_steps} >= 1")
    if t.parallel not in PARALLEL:
        raise ConfigError(f"train.parallel={t.parallel!r}; choose one of {PARALLEL}")
    if cfg.data.synth_clips < 1:
        raise ConfigError("data.synth_clips must be >= 1")
    if a.norm_std <= 0:
        raise ConfigError(f"audio.norm_std={a.norm_std} must be > 0")
    return cfg


def check_world_size(cfg: Config, world: int) -> None:
    """train.batch_size is the global batch: it must split evenly over `world` ranks."""
    if cfg.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible by the "
            f"world size {world}; choose a multiple of {world}"
        )
