"""One training step, the one `ajepa train`, the step benchmark and any profiler run.

    step = TrainStep(model, cfg, device)          # AdamW (fused where PyTorch has it), autocast, EMA
    stats = step(spec, masks, step=s)             # schedules at s, forward, backward, clip, AdamW, EMA

A step whose loss or gradient norm is NaN/Inf is skipped on the device (fused AdamW's `found_inf`,
no host sync); `StepStats` holds device tensors, read only at log steps.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

import kernels
from ajepa.config import Config
from ajepa.distributed import DistInfo, is_sharded
from ajepa.masks import PackedMasks
from ajepa.model import AJEPA

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


def make_optimizer(model: AJEPA, cfg: Config) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW, fused where PyTorch has the fused kernel (CUDA and CPU). Returns (optimizer, fused)."""
    kw = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    try:
        return torch.optim.AdamW(param_groups(model), fused=True, **kw), True
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(param_groups(model), **kw), False


def update_target(model: AJEPA, tau: float, sharded: bool) -> None:
    """The EMA. Under FSDP2 each rank updates its own shards: target and online are sharded the
    same way, so the local pieces pair up (the update is elementwise) and no gather is needed."""
    if not sharded:
        model.update_target(tau)
        return
    with torch.no_grad():
        targets = [p.to_local() for p in model.target_encoder.parameters()]
        onlines = [p.to_local() for p in model.encoder.parameters()]
        kernels.ema_update(targets, onlines, tau, impl=model.impl)


def weights_finite(params: list[torch.Tensor]) -> bool:
    """True when every weight is finite: one reduction on the device and one sync (log steps only)."""
    with torch.no_grad():
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP: this rank's shards
        return bool(torch.stack([torch.isfinite(p).all() for p in local]).all())


# ---------------------------------------------------------------------------- the step


@dataclass
class StepStats:
    """What one step leaves behind, as device tensors (no host sync) plus its schedule values."""

    loss: torch.Tensor  # this rank's part of the step's global mean loss; 0 when the step was skipped
    bad: torch.Tensor  # 1.0 when the step was skipped (non-finite loss or gradient norm on any rank)
    lr: float
    wd: float
    tau: float


class TrainStep:
    """The training step: schedules, forward under bf16 autocast (CUDA), backward, gradient clipping,
    AdamW with the non-finite skip, and the EMA of the target encoder.

    `model` is the bare AJEPA (its optimizer groups, EMA and checkpoints use it); `wrapped` is what
    runs forward (DDP or the FSDP2-sharded model; the model itself in one process).
    """

    def __init__(self, model: AJEPA, cfg: Config, device: torch.device, info: DistInfo | None = None,
                 wrapped: torch.nn.Module | None = None):
        info = DistInfo() if info is None else info
        self.model, self.cfg, self.info = model, cfg, info
        self.sharded = info.world > 1 and is_sharded(model)
        self.opt, self.fused = make_optimizer(model, cfg)
        self.params = list(model.trainable_parameters())
        wrapped = model if wrapped is None else wrapped
        # train.compile: one graph serves every step's token counts (PackedMasks.mark_dynamic below). It
        # compiles at most three times: once, then once more as each max sequence length (a Python int)
        # first changes and becomes symbolic; never again after that.
        self.compiled = cfg.train.compile
        self.forward = torch.compile(wrapped) if self.compiled else wrapped
        cuda_amp = device.type == "cuda" and cfg.train.amp
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda_amp else nullcontext
        self.zero = torch.zeros((), device=device)

    def schedules(self, step: int) -> tuple[float, float, float]:
        """Set this step's learning rate and weight decay; returns (lr, wd, EMA momentum)."""
        lr, wd, tau = lr_at(step, self.cfg), wd_at(step, self.cfg), momentum_at(step, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
            if g["apply_wd"]:
                g["weight_decay"] = wd
        return lr, wd, tau

    def forward_backward_step(self, spec: torch.Tensor, masks: PackedMasks,
                              target_count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradients. Returns (this rank's part of the loss, detached; loss-is-finite flag)."""
        if self.compiled:
            masks.mark_dynamic()
        with self.amp():
            loss = self.forward(spec, masks)
        if self.info.world > 1:
            # Weight each rank by its share of the step's target tokens: DDP/FSDP average gradients
            # over ranks, so this gives the gradient of the global token mean, the same loss as one
            # process with the whole batch.
            total = target_count.clone()
            dist.all_reduce(total)
            part = loss * (target_count / total)
            (part * self.info.world).backward()
        else:
            loss.backward()
            part = loss
        return part.detach(), torch.isfinite(loss.detach())

    def __call__(self, spec: torch.Tensor, masks: PackedMasks, step: int,
                 target_count: torch.Tensor | None = None) -> StepStats:
        lr, wd, tau = self.schedules(step)
        part, loss_ok = self.forward_backward_step(spec, masks, target_count)
        if self.cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        bad = (~(torch.isfinite(norm) & loss_ok)).float()
        if self.info.world > 1:  # every rank skips the same steps
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if self.fused:
            # The fused AdamW kernel skips the whole update (and the step count) on the device when
            # found_inf is 1: the torch.amp.GradScaler protocol, no host sync.
            self.opt.found_inf, self.opt.grad_scale = bad, None
            self.opt.step()
        elif not bool(bad):  # no fused AdamW on this device: a host check instead
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        # The EMA runs on skipped steps too: the online weights did not move, so the target only
        # moves toward the last good weights (skipping it would need a host sync).
        update_target(self.model, tau, self.sharded)
        return StepStats(torch.where(bad > 0, self.zero, part), bad, lr, wd, tau)


class DeviceCounters:
    """Per-step sums kept on the device between log steps, so no step waits on the host."""

    def __init__(self, device: torch.device):
        zero = torch.zeros((), device=device)
        self.loss_sum, self.good, self.bad_total, self.streak, self.worst = (zero.clone() for _ in range(5))

    def add(self, stats: StepStats) -> None:
        self.loss_sum += stats.loss
        self.good += 1 - stats.bad
        self.bad_total += stats.bad
        self.streak.mul_(stats.bad).add_(stats.bad)  # consecutive skipped steps
        torch.maximum(self.worst, self.streak, out=self.worst)

    def next_window(self, logged: bool) -> None:
        """After a sync the longest streak restarts from the current one; after a log step the loss
        mean restarts too."""
        self.worst.copy_(self.streak)
        if logged:
            self.loss_sum.zero_()
            self.good.zero_()
