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

from ajepa.device import DEVICE_PATTERN
from ajepa.maskgeom import context_room
from kernels import IMPLS, MAX_HEAD_DIM, MIN_HEAD_DIM

MASK_MODES = ("curriculum", "multiblock", "tf")
FRONTENDS = ("auto", "cpu", "gpu")
LOSSES = ("l2", "smooth_l1")
TARGET_NORMS = ("layer", "instance", "batch")
PARALLEL = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type or impossible setting."""


MAX_YAML_BYTES = 1 << 20  # a config is a few hundred bytes; anything near this is not one
_SHORT = 80


def _short(value) -> str:
    """repr(value), cut to a readable length: an error message never prints a huge value."""
    text = repr(value)
    return text if len(text) <= _SHORT else f"{text[:_SHORT - 15]}... ({len(text)} chars)"


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases: a config never needs them, and a few
    nested aliases expand to gigabytes (the 'billion laughs' document)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not allowed in a config "
                              f"(line {event.start_mark.line + 1})")
        node = super().compose_node(parent, index)
        if getattr(node, "anchor", None):
            raise ConfigError(f"YAML anchors (&{node.anchor}) are not allowed in a config")
        return node


def parse_yaml(text: str, where: str):
    """Parse one YAML document safely: no aliases, at most MAX_YAML_BYTES, errors as ConfigError."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_YAML_BYTES} bytes; not a config")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML{at}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None


def read_text(path: Path, what: str) -> str:
    """A text file's contents, with one-line errors for unreadable or non-UTF-8 files."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES and what == "config":
            raise ConfigError(f"{what} file {path}: larger than {MAX_YAML_BYTES} bytes; not a config")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} file {path}: not UTF-8 text (byte {exc.start})") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} file {path}: is a folder, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{what} file {path}: cannot be read ({exc.strerror or exc})") from None


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
    # Replace norm_mean/norm_std by the training data's own fbank mean and std (ajepa.stats.resolve_auto_norm,
    # over up to 256 clips spread across the dataset) before training starts. The run's config.yaml and
    # checkpoints record the values with auto_norm false, so every later use of the run normalizes alike.
    auto_norm: bool = False
    # Where the fbank runs: "cpu" per clip in the loader workers, "gpu" batched on the training device
    # (ajepa.audio.batch_fbank; workers only read and crop audio), "auto": gpu on CUDA, else cpu.
    frontend: str = "auto"


@dataclass(frozen=True)
class ModelConfig:
    patch_size: int = 16
    patch_frames: int = 0  # a patch's extent in time (frames); 0 = patch_size (square). Its extent in mel is patch_size
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
    # Keep the zero-padding past a short clip's end out of training and embedding: masks are drawn on the clip's
    # own time rows, and the target encoder (and Encoder.embed*) attend only to those tokens
    clip_tokens_only: bool = False
    sigreg_weight: float = 0.0  # LeJEPA SIGReg on the context encoder's tokens; 0 disables
    sigreg_projections: int = 64  # random 1-D directions per SIGReg evaluation
    sigreg_content: bool = False  # SIGReg on the tokens minus their per-position batch mean (the clip-varying part)
    sigreg_clip_weight: float = 0.0  # SIGReg on the clip embeddings (each clip's mean context token); 0 disables
    clip_loss_weight: float = 0.0  # L2 from each clip's mean context token to its mean target token; 0 disables
    ctx_mel_shift: int = 0  # the context view moves each clip by up to this many mel bins (model/augment.py)
    ctx_gain_db: float = 0.0  # the context view changes each clip's level by up to this many dB; 0 = off
    # The encoders' fixed sin-cos positions times this (the predictor keeps its own at 1). At 1 they swamp a random
    # encoder's mean-pooled features; at 0.25 random init probes as high as the pretrained tiny default
    # (docs/learning.md, tenth pass)
    pos_scale: float = 1.0


@dataclass(frozen=True)
class MaskConfig:
    mode: str = "curriculum"  # "curriculum" | "multiblock" | "tf"
    context_scale: tuple[float, float] = (0.85, 1.0)
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    num_targets: int = 4
    tf_scale: tuple[float, float] = (0.05, 0.075)
    tf_num_targets: int = 3
    tf_time_share: float = 0.5  # share of time-frequency blocks that are time strips (the rest: frequency bands)
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
    num_workers: int = -1  # loader processes per rank; -1: one per core of the rank's share, less one, 1..8
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
    def patch_shape(self) -> tuple[int, int]:
        """A patch's (frames, mel bins): model.patch_frames (or patch_size) x model.patch_size."""
        m = self.model
        return (m.patch_frames or m.patch_size), m.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (time, frequency)."""
        pt, pf = self.patch_shape
        return self.audio.target_frames // pt, self.audio.num_mel_bins // pf

    @property
    def num_patches(self) -> int:
        t, f = self.grid
        return t * f


def _preset_tiny() -> Config:
    # SIGReg on the clip-varying part of the context tokens: without it the tiny run collapses (RankMe
    # falls, the features become mostly patch position) and probes no better than random init. lr 1e-4:
    # at 1e-3 (batch 16) the speech probe stayed at random init's level; over seven training seeds each, 1e-4
    # probes as 2e-4 did (+12.6 against +12.0 points over random init) and lifts RankMe of the clip embeddings
    # from 1.95-2.20x random init's to 2.47-2.67x (docs/learning.md, eighth pass). The previous rate:
    # --set optim.lr=2e-4. A-JEPA's objective alone (no SIGReg): --set model.sigreg_weight=0 (at A-JEPA's
    # rate: add optim.lr=1e-3).
    # audio.auto_norm: the input is normalized by the training data's own fbank statistics, not AudioSet's: on
    # speech the margin over random init went from +4 to +8-16 points over seven seeds, partly because random
    # init probes lower; on the built-in synthetic corpus it fell from +13-18 to +4-6 (docs/learning.md, fourth
    # pass). AudioSet's statistics: --set audio.auto_norm=false.
    return Config(
        audio=AudioConfig(target_frames=256, auto_norm=True),
        model=ModelConfig(embed_dim=192, depth=4, num_heads=3, pred_dim=96, pred_depth=2, pred_heads=3,
                          sigreg_weight=1.0, sigreg_content=True),
        optim=OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=30),
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
        raise ConfigError(f"unknown preset {_short(name)}; choose one of {sorted(PRESETS)}")
    return validate(PRESETS[name]())


# ---------------------------------------------------------------------------- typed conversion


def _convert(value, tp, where: str):
    """Convert a YAML/CLI value to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {_short(value)}")
        return tuple(_convert(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected a boolean, got {_short(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {_short(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {_short(value)}") from None
    if tp is str:
        # Strings stay strings: `path: 0x10` or `path: null`-like YAML scalars are never re-read
        # as something else, they are refused (quote them).
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_short(value)} (quote it in YAML)")
        return value
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
        if not isinstance(sec_name, str) or sec_name not in sections:
            raise ConfigError(f"unknown config section {_short(sec_name)}; sections are {sorted(sections)}")
        sec = getattr(base, sec_name)
        if not isinstance(sec_data, dict):
            raise ConfigError(f"{sec_name}: expected a mapping, got {_short(sec_data)}")
        hints = _hints(type(sec))
        kw = {}
        for key, value in sec_data.items():
            if not isinstance(key, str) or key not in hints:
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
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(read_text(path, "config"), f"config file {path}")
    return from_dict(data if data is not None else {}, base)


def _is_string_field(section: str, key: str) -> bool:
    cls = {f.name: f.default_factory for f in fields(Config)}.get(section)
    tp = _hints(cls).get(key) if cls is not None else None
    return tp is not None and (tp is str or str in typing.get_args(tp))


def apply_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """Apply `section.key=value` strings, e.g. ``train.steps=100``.

    A string field (a path, a device, a mode) takes the text after `=` as it is; other fields read
    it as a YAML scalar or list (``0.1,0.2`` and ``[0.1, 0.2]`` both give a pair)."""
    data: dict[str, dict] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {_short(item)} must look like section.key=value, e.g. train.steps=100")
        if _is_string_field(*parts) or not value.strip():
            parsed = value
        else:
            parsed = parse_yaml(value, f"--set {parts[0]}.{parts[1]}")
        data.setdefault(parts[0], {})[parts[1]] = parsed
    return from_dict(data, cfg) if data else cfg


def set_fields(cfg: Config, values: dict[str, object]) -> Config:
    """Set `section.key` fields to already-typed values (command-line flags), validated."""
    data: dict[str, dict] = {}
    for dotted, value in values.items():
        section, key = dotted.split(".")
        data.setdefault(section, {})[key] = value
    return from_dict(data, cfg) if data else cfg


# ---------------------------------------------------------------------------- validation


def _check_range(name: str, lo_hi: tuple[float, float], lo: float, hi: float) -> None:
    a, b = lo_hi
    if not (lo < a <= b <= hi):
        raise ConfigError(f"{name}={lo_hi}: need {lo} < min <= max <= {hi}")


MAX_PATCHES = 1 << 16
MIN_CONTEXT_ROOM = 0.25  # the sampler redraws up to 200 times: 0.75 ** 200 is never


def _check_finite(cfg: Config) -> None:
    """Every number in the config is finite: NaN slips through every `<` check and Inf overflows."""
    for sec in fields(cfg):
        section = getattr(cfg, sec.name)
        for f in fields(section):
            value = getattr(section, f.name)
            items = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ConfigError(f"{sec.name}.{f.name}={_short(value)} must be finite (not NaN or Inf)")


def _positive(**named) -> None:
    for name, value in named.items():
        if not value > 0:
            raise ConfigError(f"{name.replace('__', '.')}={value} must be > 0")


def validate(cfg: Config) -> Config:
    """Reject impossible settings before any work starts; returns cfg unchanged."""
    _check_finite(cfg)
    a, m, k, o, t = cfg.audio, cfg.model, cfg.masks, cfg.optim, cfg.train
    _positive(audio__sample_rate=a.sample_rate, audio__num_mel_bins=a.num_mel_bins,
              audio__target_frames=a.target_frames, audio__frame_length_ms=a.frame_length_ms,
              audio__frame_shift_ms=a.frame_shift_ms, audio__norm_std=a.norm_std, model__patch_size=m.patch_size,
              model__embed_dim=m.embed_dim, model__pred_dim=m.pred_dim, model__mlp_ratio=m.mlp_ratio)
    limits = (("audio.sample_rate", a.sample_rate, 1_000_000), ("audio.num_mel_bins", a.num_mel_bins, 4096),
              ("audio.target_frames", a.target_frames, 1 << 20), ("model.patch_size", m.patch_size, 1024),
              ("model.patch_frames", m.patch_frames, 1024),
              ("model.embed_dim", m.embed_dim, 1 << 16), ("model.pred_dim", m.pred_dim, 1 << 16),
              ("model.depth", m.depth, 1024), ("model.pred_depth", m.pred_depth, 1024),
              ("model.mlp_ratio", m.mlp_ratio, 64), ("masks.num_targets", k.num_targets, 1024),
              ("masks.tf_num_targets", k.tf_num_targets, 1024))
    for name, value, limit in limits:
        if value > limit:  # far past any real setting: a typo, not a config
            raise ConfigError(f"{name}={value} is larger than {limit}; not a plausible setting")
    if a.frame_length_ms * a.sample_rate < 1000 or a.frame_shift_ms * a.sample_rate < 1000:
        raise ConfigError(f"audio.frame_length_ms={a.frame_length_ms} and frame_shift_ms={a.frame_shift_ms} "
                          f"must each span at least one sample at audio.sample_rate={a.sample_rate}")
    if m.embed_dim % 4 or m.pred_dim % 4:
        raise ConfigError(f"model.embed_dim={m.embed_dim} and model.pred_dim={m.pred_dim} must be multiples of 4 "
                          "(the 2-D sin-cos positions)")
    if int(m.embed_dim * m.mlp_ratio) < 1 or int(m.pred_dim * m.mlp_ratio) < 1:
        raise ConfigError(f"model.mlp_ratio={m.mlp_ratio} leaves an empty MLP hidden layer")
    if not DEVICE_PATTERN.match(t.device):
        raise ConfigError(f"train.device={_short(t.device)}; choose auto, cpu, cuda or cuda:N")
    if m.patch_frames < 0:
        raise ConfigError(f"model.patch_frames={m.patch_frames} must be >= 0 (0: the same as model.patch_size)")
    pt, pf = cfg.patch_shape
    if pf < 1 or a.num_mel_bins % pf:
        raise ConfigError(f"audio.num_mel_bins={a.num_mel_bins} must be a multiple of model.patch_size={pf}")
    if a.target_frames % pt:
        which = "model.patch_frames" if m.patch_frames else "model.patch_size"
        raise ConfigError(f"audio.target_frames={a.target_frames} must be a multiple of {which}={pt}")
    widths = (("model.embed_dim", m.embed_dim, m.num_heads), ("model.pred_dim", m.pred_dim, m.pred_heads))
    for name, dim, heads in widths:
        if heads < 1 or dim % heads:
            raise ConfigError(f"{name}={dim} must be divisible by its number of heads ({heads})")
        if not MIN_HEAD_DIM <= dim // heads <= MAX_HEAD_DIM:
            raise ConfigError(f"{name}/heads = {dim // heads}: head dim must be in "
                              f"{MIN_HEAD_DIM}..{MAX_HEAD_DIM} (the attention kernel's range)")
    if m.depth < 1 or m.pred_depth < 1:
        raise ConfigError("model.depth and model.pred_depth must be >= 1")
    if m.loss not in LOSSES:
        raise ConfigError(f"model.loss={_short(m.loss)}; choose one of {LOSSES}")
    if m.target_norm not in TARGET_NORMS:
        raise ConfigError(f"model.target_norm={_short(m.target_norm)}; choose one of {TARGET_NORMS}")
    if not 1 <= m.target_layers <= m.depth:
        raise ConfigError(f"model.target_layers={m.target_layers} must be in 1..model.depth ({m.depth})")
    for name in ("sigreg_weight", "sigreg_clip_weight", "clip_loss_weight"):
        if not (math.isfinite(getattr(m, name)) and getattr(m, name) >= 0):
            raise ConfigError(f"model.{name}={getattr(m, name)} must be finite and >= 0")
    if not 0 <= m.ctx_mel_shift < a.num_mel_bins:
        raise ConfigError(f"model.ctx_mel_shift={m.ctx_mel_shift} must be in 0..{a.num_mel_bins - 1} "
                          "(below audio.num_mel_bins)")
    if not (math.isfinite(m.ctx_gain_db) and m.ctx_gain_db >= 0):
        raise ConfigError(f"model.ctx_gain_db={m.ctx_gain_db} must be finite and >= 0")
    if not (math.isfinite(m.pos_scale) and m.pos_scale >= 0):
        raise ConfigError(f"model.pos_scale={m.pos_scale} must be finite and >= 0")
    if m.clip_tokens_only and (m.target_layers > 1 or m.target_norm != "layer" or m.clip_loss_weight > 0):
        raise ConfigError("model.clip_tokens_only=true needs model.target_layers=1, model.target_norm=layer and "
                          "model.clip_loss_weight=0 (the targets of the last layer only)")
    if m.sigreg_projections < 1:
        raise ConfigError(f"model.sigreg_projections={m.sigreg_projections} must be >= 1")
    if a.frontend not in FRONTENDS:
        raise ConfigError(f"audio.frontend={_short(a.frontend)}; choose one of {FRONTENDS}")
    if k.mode not in MASK_MODES:
        raise ConfigError(f"masks.mode={_short(k.mode)}; choose one of {MASK_MODES}")
    _check_range("masks.context_scale", k.context_scale, 0.0, 1.0)
    _check_range("masks.target_scale", k.target_scale, 0.0, 1.0)
    _check_range("masks.tf_scale", k.tf_scale, 0.0, 1.0)
    _check_range("masks.target_aspect", k.target_aspect, 0.0, math.inf)
    if k.num_targets < 1 or k.tf_num_targets < 1:
        raise ConfigError("masks.num_targets and masks.tf_num_targets must be >= 1")
    if not 0.0 <= k.tf_time_share <= 1.0:
        raise ConfigError(f"masks.tf_time_share={k.tf_time_share} must be in [0, 1]")
    if not 0.0 <= k.curriculum_c0 <= 1.0:
        raise ConfigError(f"masks.curriculum_c0={k.curriculum_c0} must be in [0, 1]")
    n = cfg.num_patches
    if n > MAX_PATCHES:
        raise ConfigError(f"audio.target_frames x audio.num_mel_bins / patch area = {n} patches; at most "
                          f"{MAX_PATCHES} fit one attention sequence")
    if k.min_keep < 1:
        raise ConfigError(f"masks.min_keep={k.min_keep} must be >= 1")
    # The sampler redraws a target set that leaves fewer than min_keep context patches; settings
    # where most draws would (or all must) be redrawn are refused here.
    kinds = []
    if k.mode != "tf":
        kinds.append((False, k.num_targets, k.target_scale, k.target_aspect, "masks.num_targets/target_scale"))
    if k.mode != "multiblock":
        kinds.append((True, k.tf_num_targets, k.tf_scale, (1.0, 1.0), "masks.tf_num_targets/tf_scale"))
    for use_tf, num, scale, aspect, name in kinds:
        room = context_room(cfg.grid, use_tf, num, scale, aspect, k.min_keep, k.tf_time_share)
        if room < MIN_CONTEXT_ROOM:
            raise ConfigError(
                f"masks.min_keep={k.min_keep}: with {name}={num}/{scale} only {room:.0%} of target draws leave "
                f"min_keep of the {n} patches for the context; lower the target scales, their number or min_keep")
    _positive(optim__lr=o.lr)
    for name, value in (("min_lr", o.min_lr), ("warmup_steps", o.warmup_steps), ("grad_clip", o.grad_clip),
                        ("weight_decay", o.weight_decay), ("weight_decay_end", o.weight_decay_end)):
        if value < 0:
            raise ConfigError(f"optim.{name}={value} must be >= 0")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas}: each must be in [0, 1)")
    if not (0.0 <= o.ema_start <= o.ema_end <= 1.0):
        raise ConfigError(f"optim.ema_start={o.ema_start}, ema_end={o.ema_end}: need 0 <= start <= end <= 1")
    if t.impl not in IMPLS:
        raise ConfigError(f"train.impl={_short(t.impl)}; choose one of {IMPLS}")
    if t.steps < 1 or t.batch_size < 1 or t.log_every < 1 or t.ckpt_every < 1 or t.num_workers < -1:
        raise ConfigError("train.steps, batch_size, log_every, ckpt_every must be >= 1 and num_workers >= -1 "
                          "(-1: derived from the cores)")
    if t.keep_last < 0 or t.max_bad_steps < 1:
        raise ConfigError(f"train.keep_last={t.keep_last} must be >= 0 and train.max_bad_steps={t.max_bad_steps} >= 1")
    if t.parallel not in PARALLEL:
        raise ConfigError(f"train.parallel={_short(t.parallel)}; choose one of {PARALLEL}")
    if cfg.data.synth_clips < 1:
        raise ConfigError("data.synth_clips must be >= 1")
    return cfg


def check_world_size(cfg: Config, world: int) -> None:
    """train.batch_size is the global batch: it must split evenly over `world` ranks."""
    if cfg.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible by the "
            f"world size {world}; choose a multiple of {world}"
        )
