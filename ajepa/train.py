"""The A-JEPA training loop: AdamW, warmup + cosine LR, cosine weight decay, EMA schedule, AMP,
atomic checkpoints with exact resume, JSONL metrics (and TensorBoard where installed)."""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ajepa.checkpoint import load_checkpoint, save_checkpoint
from ajepa.config import Config, save_config, to_dict
from ajepa.data import build_dataset, make_loader
from ajepa.masks import MaskSampler
from ajepa.model import AJEPA

CHECKPOINT_NAME = "checkpoint.pt"


# ---------------------------------------------------------------------------- schedules


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at train.steps."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def wd_at(step: int, cfg: Config) -> float:
    """Cosine from optim.weight_decay to optim.weight_decay_end (I-JEPA: 0.04 -> 0.4)."""
    o = cfg.optim
    progress = min(step / max(1, cfg.train.steps), 1.0)
    return o.weight_decay_end + 0.5 * (o.weight_decay - o.weight_decay_end) * (1 + math.cos(math.pi * progress))


def momentum_at(step: int, cfg: Config) -> float:
    """EMA momentum, linear from optim.ema_start to optim.ema_end over the run."""
    o = cfg.optim
    return o.ema_start + (o.ema_end - o.ema_start) * min(step / max(1, cfg.train.steps), 1.0)


def param_groups(model: AJEPA) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the mask token (all 1-D) get none."""
    decay, no_decay = [], []
    for p in model.trainable_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA GPU is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class MetricsLog:
    """Append-only JSONL metrics, mirrored to TensorBoard when it is installed."""

    def __init__(self, out: Path):
        self.path = out / "metrics.jsonl"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[tuple[int, float]]  # (step, loss) at each logged step
    seconds: float


# ---------------------------------------------------------------------------- training


def build(cfg: Config, device: torch.device) -> tuple[AJEPA, torch.optim.Optimizer]:
    model = AJEPA(cfg, impl=cfg.train.impl).to(device)
    opt = torch.optim.AdamW(param_groups(model), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    return model, opt


def checkpoint_state(model: AJEPA, opt, step: int, cfg: Config) -> dict:
    return {
        "step": step,
        "config": to_dict(cfg),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }


def train(cfg: Config, out: str | Path, resume: bool = False, progress: bool = True, max_steps: int | None = None) -> TrainResult:
    """Train `cfg` into folder `out`. `resume` continues from out/checkpoint.pt; `max_steps` stops
    early (the schedules still span train.steps), as a kill would."""
    from tqdm import tqdm

    out = Path(out)
    device = resolve_device(cfg.train.device)
    dataset = build_dataset(cfg.data, cfg.audio, cfg.train.seed)  # fails on bad --data before anything is written
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    model, opt = build(cfg, device)
    start = 0
    ckpt_path = out / CHECKPOINT_NAME
    if resume:
        state = load_checkpoint(ckpt_path)
        if state["config"]["model"] != to_dict(cfg)["model"] or state["config"]["audio"] != to_dict(cfg)["audio"]:
            raise ValueError(f"{ckpt_path}: the checkpoint's model/audio config differs from this run's; cannot resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        start = int(state["step"])
    elif ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    save_config(cfg, out / "config.yaml")

    sampler = MaskSampler(cfg.masks, cfg.grid, cfg.train.steps, cfg.train.seed)
    end = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)
    loader = make_loader(dataset, sampler, cfg.train.batch_size, end, cfg.train.seed, start,
                         cfg.train.num_workers, pin_memory=device.type == "cuda")
    forward = torch.compile(model) if cfg.train.compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and cfg.train.amp) else nullcontext()
    log = MetricsLog(out)
    losses: list[tuple[int, float]] = []
    t_start = time.perf_counter()
    t_log, n_log = t_start, 0
    loss_sum = torch.zeros((), device=device)
    bar = tqdm(total=end, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
    step = start
    try:
        for batch in loader:
            step = batch.step
            batch = batch.to(device, non_blocking=True)
            lr, wd, tau = lr_at(step, cfg), wd_at(step, cfg), momentum_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
                if g["apply_wd"]:
                    g["weight_decay"] = wd
            with amp:
                loss = forward(batch.spec, batch.masks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(model.trainable_parameters()), cfg.optim.grad_clip)
            opt.step()
            model.update_target(tau)
            loss_sum += loss.detach()
            n_log += 1
            bar.update(1)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == end:  # the only host sync in the loop
                now = time.perf_counter()
                mean_loss = float(loss_sum) / n_log
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"non-finite loss {mean_loss} at step {step}; last good checkpoint: {ckpt_path}")
                sps = n_log * cfg.train.batch_size / (now - t_log)
                row = {"step": done, "loss": mean_loss, "lr": lr, "wd": wd, "momentum": tau,
                       "samples_per_s": sps, "tf_masks": batch.masks.use_tf}
                log.write(row)
                losses.append((done, mean_loss))
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", m=f"{tau:.4f}", sps=f"{sps:.1f}")
                loss_sum.zero_()
                t_log, n_log = now, 0
            if done % cfg.train.ckpt_every == 0 or done == end:
                save_checkpoint(checkpoint_state(model, opt, done, cfg), ckpt_path)
    finally:
        bar.close()
        log.close()
    return TrainResult(out, end, losses, time.perf_counter() - t_start)
