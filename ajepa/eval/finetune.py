"""Fine-tuning: the encoder + mean pooling + a linear head, trained end to end.

Layer-wise learning-rate decay (head and final norm at `lr`, block i at lr * decay^(depth - i),
the patch embedding at lr * decay^(depth + 1)), SpecAugment-style time/frequency masking, optional
mixup, and A-JEPA's regularized masking: in every layer a fresh random fraction of tokens is barred
as attention keys (no token draws any attention weight from them) while they stay in the sequence as
queries, so their own representations are still computed, updated and pooled. The best epoch on the
validation split is kept (best.pt and best.safetensors).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ajepa.audio import audio_rows
from ajepa.checkpoint import FORMAT_VERSION, save_checkpoint
from ajepa.config import Config, to_dict
from ajepa.eval.embed import row_token_mask
from ajepa.eval.probe import stratified_split
from ajepa.masks import clip_min_rows
from ajepa.model.vit import ViTEncoder


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FinetuneOptions:
    """Fine-tuning settings; `ajepa finetune` makes one flag per field (help from the metadata)."""

    epochs: int = _opt(10, "epochs")
    batch_size: int = _opt(16, "clips per step")
    lr: float = _opt(1e-3, "head learning rate; block i of depth L gets lr * layer_decay^(L - i)")
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine decay")
    weight_decay: float = _opt(0.05, "AdamW weight decay on matrices")
    layer_decay: float = _opt(0.75, "layer-wise LR decay: block i of depth L gets lr * decay^(L - i)")
    warmup_epochs: float = _opt(1.0, "linear warmup, in epochs")
    time_masks: int = _opt(2, "SpecAugment time masks per clip")
    time_mask_width: int = _opt(24, "largest time mask, in frames")
    freq_masks: int = _opt(2, "SpecAugment frequency masks per clip")
    freq_mask_width: int = _opt(16, "largest frequency mask, in mel bins")
    mixup: float = _opt(0.0, "mixup Beta(alpha, alpha); 0 disables")
    reg_mask: float = _opt(0.0, "A-JEPA regularized masking: fraction of tokens per layer barred as attention keys "
                                "(still queries); A-JEPA uses 0.1; 0 is off")
    val_fraction: float = _opt(0.2, "validation share, stratified")
    pooling: str = _opt("mean", "mean: over the tokens that hold the clip's own audio (not the padding past a short "
                                "clip's end); mean_all: over every token (the behaviour before)")
    seed: int = _opt(0, "split, shuffling and augmentation seed")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = _opt(True, "bf16 autocast on CUDA")

    def validate(self) -> FinetuneOptions:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("lr must be > 0; min lr, weight decay and warmup must be >= 0")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.reg_mask < 1.0:
            raise ValueError(f"regularized masking fraction must be in [0, 1), got {self.reg_mask}")
        if self.mixup < 0:
            raise ValueError(f"mixup alpha must be >= 0, got {self.mixup}")
        if min(self.time_masks, self.time_mask_width, self.freq_masks, self.freq_mask_width) < 0:
            raise ValueError("SpecAugment mask counts and widths must be >= 0")
        if self.pooling not in ("mean", "mean_all"):
            raise ValueError(f"pooling={self.pooling!r}; choose mean or mean_all")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        return self


class Classifier(nn.Module):
    """ViT encoder -> mean over tokens -> linear head.

    With a `cfg` and pooling "mean", the mean runs over the tokens that hold the clip's own audio (as
    Encoder.embed_spec pools), and an encoder trained with model.clip_tokens_only attends only to them;
    without a cfg, or with "mean_all", over every token."""

    def __init__(self, vit: ViTEncoder, num_classes: int, cfg: Config | None = None, pooling: str = "mean"):
        super().__init__()
        self.vit = vit.requires_grad_(True)  # trained end to end (a loaded Encoder arrives frozen)
        self.head = nn.Linear(vit.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.cfg, self.pooling = cfg, pooling

    def audio_rows(self, spec: torch.Tensor) -> torch.Tensor | None:
        """int64 [B]: the patch rows of clean (not augmented) normalized spec that hold audio; None when
        this classifier pools every token."""
        if self.cfg is None or self.pooling == "mean_all":
            return None
        return audio_rows(spec, self.cfg.audio, self.cfg.patch_shape[0])

    def forward(self, spec: torch.Tensor, reg_mask: float = 0.0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`rows`: audio_rows of the clips before augmentation (SpecAugment's zeroed mel bands hide
        the padding); measured on `spec` itself when not given."""
        vit = self.vit
        x = vit.patch_embed(spec)
        x = x + vit.pos_embed.to(x.dtype)
        B, N, _ = x.shape
        if rows is None:
            rows = self.audio_rows(spec)
        pool = keys = None
        if rows is not None:
            rows = rows.to(x.device)
            pool = row_token_mask(rows, self.cfg.grid)
            if self.cfg.model.clip_tokens_only:
                floor = clip_min_rows(self.cfg.masks, self.cfg.grid)
                keys = row_token_mask(rows.clamp_min(floor), self.cfg.grid)[:, None, None, :]
        for blk in vit.blocks:
            mask = keys
            if reg_mask > 0 and self.training:
                barred = regularized_key_mask(B, N, reg_mask, x.device)
                mask = barred if keys is None else barred & keys
            x = blk(x, attn_mask=mask)
        x = vit.norm(x)
        if pool is None:
            return self.head(x.mean(dim=1))
        w = pool.to(x.dtype)[..., None]
        return self.head((x * w).sum(dim=1) / w.sum(dim=1))


def regularized_key_mask(batch: int, tokens: int, fraction: float, device) -> torch.Tensor:
    """Boolean [B, 1, 1, N] attention mask, False at round(fraction * N) random key tokens per sample."""
    barred = int(round(fraction * tokens))
    keep = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    if barred:
        idx = torch.rand(batch, tokens, device=device).argsort(dim=1)[:, : min(barred, tokens - 1)]
        keep.scatter_(1, idx, False)
    return keep[:, None, None, :]


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Param groups with lr_scale = layer_decay ** (depth + 1 - layer id); no decay on 1-D params."""
    depth = len(model.vit.blocks)

    def layer_id(name: str) -> int:
        if name.startswith("vit.patch_embed"):
            return 0
        if name.startswith("vit.blocks."):
            return int(name.split(".")[2]) + 1
        return depth + 1  # vit.norm, head

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, decay = layer_id(name), p.ndim >= 2
        g = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "lr_scale": layer_decay ** (depth + 1 - lid),
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * layer_decay ** (depth + 1 - lid),
                "layer": lid,
            },
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def spec_augment(spec: torch.Tensor, opts: FinetuneOptions, gen: torch.Generator) -> torch.Tensor:
    """Zero random time stripes and mel bands per clip (the normalized mean is about 0). spec [B, 1, T, F]."""
    B, _, T, Fm = spec.shape
    keep = torch.ones(B, T, Fm, dtype=torch.bool)
    for count, width, size, dim in (
        (opts.time_masks, opts.time_mask_width, T, 1),
        (opts.freq_masks, opts.freq_mask_width, Fm, 2),
    ):
        pos = torch.arange(size)
        for _ in range(count):
            w = torch.randint(0, min(width, size) + 1, (B, 1), generator=gen)
            start = (torch.rand(B, 1, generator=gen) * (size - w + 1)).long()
            hit = (pos[None] >= start) & (pos[None] < start + w)  # [B, size]
            keep &= ~(hit[:, :, None] if dim == 1 else hit[:, None, :])
    return spec * keep[:, None].to(spec.device, spec.dtype)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: Classifier, specs: torch.Tensor, labels: torch.Tensor, batch_size: int, device, amp_ctx) -> dict:
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(specs), batch_size):
        x, y = specs[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        with amp_ctx():
            logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return {"accuracy": correct / len(specs), "loss": loss_sum / len(specs)}


@dataclass
class FinetuneResult:
    best_accuracy: float
    best_epoch: int
    history: list[dict]
    out: str
    seconds: float


def finetune(
    cfg: Config,
    vit: ViTEncoder,
    dataset,
    out: str | Path,
    opts: FinetuneOptions = FinetuneOptions(),
    progress: bool = True,
    source: str = "",
) -> FinetuneResult:
    """Fine-tune `vit` (trained in place) on the labelled clips of `dataset`; write best.pt,
    best.safetensors and finetune.json into `out`."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from ajepa.device import resolve_device

    opts = opts.validate()
    out = Path(out)
    labels = np.asarray(dataset.labels)
    labelled = np.flatnonzero(labels >= 0)
    num_classes = len(dataset.classes)
    if num_classes < 2 or labelled.size < 4:
        raise ValueError(
            f"fine-tuning needs labelled data with at least 2 classes and 4 clips; got "
            f"{num_classes} classes and {labelled.size} labelled clips"
        )
    train_rel, val_rel = stratified_split(labels[labelled], opts.val_fraction, opts.seed)
    train_idx, val_idx = labelled[train_rel], labelled[val_rel]
    if val_idx.size == 0:
        raise ValueError("the validation split is empty: use more clips per class or a larger --val-fraction")
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)

    def load(idx, desc):
        return torch.stack(
            [dataset.spectrogram(int(i)) for i in tqdm(idx, desc=desc, disable=not progress, leave=False)]
        )

    x_train, x_val = load(train_idx, "spectrograms (train)"), load(val_idx, "spectrograms (val)")
    y_train, y_val = torch.as_tensor(labels[train_idx]), torch.as_tensor(labels[val_idx])

    model = Classifier(vit, num_classes, cfg, opts.pooling).to(device)
    opt = torch.optim.AdamW(layer_decay_groups(model, opts.lr, opts.weight_decay, opts.layer_decay), lr=opts.lr)
    steps_per_epoch = math.ceil(len(train_idx) / opts.batch_size)
    total, warmup = opts.epochs * steps_per_epoch, int(opts.warmup_epochs * steps_per_epoch)

    def amp_ctx():
        if opts.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    out.mkdir(parents=True, exist_ok=True)
    history, best, best_epoch, step = [], -1.0, -1, 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="finetune", disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(opts.epochs):
            model.train()
            perm = torch.randperm(len(train_idx), generator=gen)
            loss_sum = 0.0
            for i in range(0, len(perm), opts.batch_size):
                sel = perm[i : i + opts.batch_size]
                rows = model.audio_rows(x_train[sel])  # before SpecAugment, which hides the padding
                x = spec_augment(x_train[sel], opts, gen).to(device)
                y = F.one_hot(y_train[sel], num_classes).float().to(device)
                if opts.mixup > 0:
                    lam = float(np.random.default_rng([opts.seed, step]).beta(opts.mixup, opts.mixup))
                    mix = torch.randperm(len(sel), generator=gen).to(device)
                    x, y = lam * x + (1 - lam) * x[mix], lam * y + (1 - lam) * y[mix]
                    if rows is not None:  # a mixed clip holds the audio of both
                        rows = torch.maximum(rows, rows[mix.cpu()])
                factor = lr_factor(step, total, warmup, opts.min_lr / opts.lr)
                for g in opt.param_groups:
                    g["lr"] = opts.lr * g["lr_scale"] * factor
                with amp_ctx():
                    logits = model(x, reg_mask=opts.reg_mask, rows=rows).float()
                loss = torch.sum(-y * F.log_softmax(logits, dim=1), dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(sel)
                step += 1
                bar.update(1)
            val = evaluate(model, x_val, y_val, opts.batch_size, device, amp_ctx)
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / len(train_idx),
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "lr": opts.lr * factor,
            }
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{val['accuracy']:.3f}")
            if val["accuracy"] > best:
                best, best_epoch = val["accuracy"], epoch + 1
                _save_best(model, cfg, dataset.classes, row, out, source)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    report = {
        "best_val_accuracy": best,
        "best_epoch": best_epoch,
        "history": history,
        "options": asdict(opts),
        "classes": list(dataset.classes),
        "n_train": int(train_idx.size),
        "n_val": int(val_idx.size),
        "source": source,
        "seconds": seconds,
    }
    (out / "finetune.json").write_text(json.dumps(report, indent=2))
    return FinetuneResult(best, best_epoch, history, str(out), seconds)


def _save_best(model: Classifier, cfg: Config, classes, row: dict, out: Path, source: str) -> None:
    from safetensors.torch import save_file

    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(
        {
            "kind": "ajepa-finetune",
            "config": to_dict(cfg),
            "classes": list(classes),
            "epoch": row["epoch"],
            "val_accuracy": row["val_accuracy"],
            "source": source,
            "model": weights,
        },
        out / "best.pt",
    )
    meta = {
        "kind": "ajepa-finetune",
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(to_dict(cfg)),
        "classes": json.dumps(list(classes)),
        "epoch": str(row["epoch"]),
        "val_accuracy": str(row["val_accuracy"]),
    }
    save_file(weights, str(out / "best.safetensors"), metadata=meta)
