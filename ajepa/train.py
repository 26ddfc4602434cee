"""The A-JEPA training loop: AdamW, warmup + cosine LR, cosine weight decay, EMA schedule, AMP,
torchrun DDP or FSDP2, atomic keep-last-K checkpoints with exact resume at any world size,
non-finite step skipping, SIGTERM/SIGINT save-and-exit, JSONL metrics (and TensorBoard where installed).

    torchrun --nproc_per_node=8 -m ajepa.train --preset base --data /audio --out runs/b
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import kernels
from ajepa.checkpoint import CheckpointDir
from ajepa.config import Config, check_world_size, save_config, to_dict
from ajepa.data import build_dataset, make_loader
from ajepa.masks import MaskSampler
from ajepa.model import AJEPA
from ajepa.model.health import CollapseWatch, health_stats

CHECKPOINT_NAME = "checkpoint.pt"
log = logging.getLogger("ajepa")


class NonFiniteLossError(FloatingPointError):
    """train.max_bad_steps consecutive steps had a non-finite loss or gradient."""


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

    def truncate(self, step: int) -> None:
        """Drop rows after `step` (written by a run that died before its next checkpoint)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

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
    steps: int  # the step the run reached
    losses: list[tuple[int, float]]  # (step, loss) at each logged step; NaN where every step was skipped
    seconds: float
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early
    counters: dict = field(default_factory=dict)  # skipped_steps, bad_samples, bad_files
    model: AJEPA | None = None  # the trained model (this rank's shards under FSDP)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this module created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: Config) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group (WORLD_SIZE > 1): NCCL for CUDA tensors, gloo for CPU ones.

    An already initialized group is used as it is; without torchrun this is one process.
    """
    device = resolve_device(cfg.train.device)
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        info = DistInfo(dist.get_rank(), dist.get_world_size(), local, owned=True)
    else:
        return DistInfo(), device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return info, device


def wrap_model(model: AJEPA, cfg: Config, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 with online and target encoders sharded alike, so the EMA runs on local shards.

    Encoders run through forward_packed / forward_dense rather than __call__, so each of their
    submodules that holds parameters gets its own fully_shard unit (FSDP2 hooks fire on __call__).
    """
    if info.world == 1:
        return model
    if cfg.train.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (info.world,))
        for enc in (model.encoder, model.target_encoder):
            for blk in enc.blocks:
                fully_shard(blk, mesh=mesh)
            fully_shard(enc.patch_embed, mesh=mesh)
            fully_shard(enc.norm, mesh=mesh)
        for blk in model.predictor.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(model.predictor, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # No buffer sync per forward: the only buffers are fixed sin-cos tables, equal on every rank.
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{no_sync: False})


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


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


def make_optimizer(model: AJEPA, cfg: Config) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW, fused where PyTorch has the fused kernel (CUDA and CPU). Returns (optimizer, fused)."""
    kw = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    try:
        return torch.optim.AdamW(param_groups(model), fused=True, **kw), True
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(param_groups(model), **kw), False


def _state_options(info: DistInfo):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=info.world > 1)


def checkpoint_state(model: AJEPA, opt, step: int, cfg: Config, info: DistInfo, counters: dict) -> dict:
    """Full (unsharded) weights and optimizer state keyed by parameter name, so a checkpoint loads
    at any world size, with or without FSDP. A collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _state_options(info)
    return {
        "step": step,
        "config": to_dict(cfg),
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, opt, options=options),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "counters": dict(counters),
        "world_size": info.world,
    }


def load_optimizer_state(model: AJEPA, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(k, int) for k in state["state"]):  # an older checkpoint: torch's own layout
        opt.load_state_dict(state)
        return
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


class StopSignals:
    """SIGTERM / SIGINT ask the run to stop: it saves a checkpoint at the end of the step and
    returns. A second signal stops at once (KeyboardInterrupt). Only the main thread can install
    handlers; elsewhere this does nothing."""

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt(f"second {self.NAMES.get(signum, signum)}")
        self.received = self.NAMES.get(signum, str(signum))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.NAMES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _allreduce(values: list[float], device: torch.device, op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


# ---------------------------------------------------------------------------- training


def train(cfg: Config, out: str | Path, resume: bool = False, progress: bool = True,
          max_steps: int | None = None) -> TrainResult:
    """Train `cfg` into folder `out`. `resume` continues from the newest checkpoint in `out`;
    `max_steps` stops early (the schedules still span train.steps), as a kill would.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: train.batch_size is the global batch,
    split evenly; rank 0 alone writes checkpoints, metrics and config.
    """
    info, device = init_distributed(cfg)
    # On the CPU, the default backward of advanced indexing (index_put_ with accumulate, used by
    # the reference gathers) sums duplicate rows in an order that can change from run to run;
    # PyTorch's deterministic mode sorts first, so a resumed run repeats the uninterrupted one
    # bit for bit. The CUDA path keeps its own (deterministic Triton) kernels and settings.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cpu" and not was_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(cfg, Path(out), resume, progress, max_steps, info, device)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        if info.owned:
            dist.destroy_process_group()


def _train(cfg: Config, out: Path, resume: bool, progress: bool, max_steps: int | None,
           info: DistInfo, device: torch.device) -> TrainResult:
    from tqdm import tqdm

    check_world_size(cfg, info.world)
    dataset = build_dataset(cfg.data, cfg.audio, cfg.train.seed)  # fails on bad --data before anything is written
    ckpts = CheckpointDir(out, cfg.train.keep_last)
    seed_everything(cfg.train.seed)
    model = AJEPA(cfg, impl=cfg.train.impl).to(device)
    start, state = 0, None
    counters = {"skipped_steps": 0, "bad_samples": 0, "bad_files": 0}
    if resume:
        found = ckpts.load_latest()
        if found is None:
            if info.is_main:
                log.warning("--resume: %s holds no checkpoint yet; starting from step 0", out)
        else:
            state, path = found
            if state["config"]["model"] != to_dict(cfg)["model"] or state["config"]["audio"] != to_dict(cfg)["audio"]:
                raise ValueError(f"{path}: the checkpoint's model/audio config differs from this run's; cannot resume")
            model.load_state_dict(state["model"])
            start = int(state["step"])
            counters.update(state.get("counters", {}))
    elif ckpts.exists():
        raise FileExistsError(
            f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ckpts.remove_partial():
            log.warning("removed %s, left by a save that was interrupted", stale)
        save_config(cfg, out / "config.yaml")

    wrapped = wrap_model(model, cfg, info, device)
    sharded = info.world > 1 and is_sharded(model)
    opt, fused = make_optimizer(model, cfg)
    if state is not None:
        load_optimizer_state(model, opt, state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
    last_good = (path, start) if state is not None else (None, 0)

    per_rank = cfg.train.batch_size // info.world
    sampler = MaskSampler(cfg.masks, cfg.grid, cfg.train.steps, cfg.train.seed, rank=info.rank)
    end = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)
    loader = make_loader(dataset, sampler, per_rank, end, cfg.train.seed, start, cfg.train.num_workers,
                         info.rank, info.world, pin_memory=device.type == "cuda", strict=cfg.data.strict)
    forward = torch.compile(wrapped) if cfg.train.compile else wrapped
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and cfg.train.amp) else nullcontext()
    params = list(model.trainable_parameters())
    log_file = MetricsLog(out) if info.is_main else None
    if log_file is not None and resume:
        log_file.truncate(start)

    # Device-side counters: a non-finite step is detected, skipped and counted without a host
    # sync; they are read only at log and checkpoint steps.
    zero = torch.zeros((), device=device)
    loss_sum, good, bad_total, streak, worst = (zero.clone() for _ in range(5))
    skipped_before = counters["skipped_steps"]
    seen_bad: set[str] = set()
    window_bad_samples = 0
    losses: list[tuple[int, float]] = []
    t_start = time.perf_counter()
    t_log, n_log = t_start, 0
    stopped_by = None
    watch = CollapseWatch()
    step = start
    bar = tqdm(total=end, initial=start, desc="train", disable=not (progress and info.is_main), dynamic_ncols=True)
    # The loader draws its workers' base seed from the global RNG when its iterator starts; a fork
    # keeps that draw out of the stream the model uses (SIGReg's projections), so a resumed run
    # repeats the uninterrupted one.
    with torch.random.fork_rng(devices=[]):
        batches = iter(loader)
    try:
        with StopSignals() as signals:
            for batch in batches:
                step = batch.step
                for name, reason in batch.bad:  # empty unless a clip was bad: no per-sample work
                    if name not in seen_bad:
                        seen_bad.add(name)
                        log.warning("skipping bad audio %s: %s", name, reason)
                window_bad_samples += batch.skipped
                batch = batch.to(device, non_blocking=True)
                lr, wd, tau = lr_at(step, cfg), wd_at(step, cfg), momentum_at(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                    if g["apply_wd"]:
                        g["weight_decay"] = wd
                with amp:
                    loss = forward(batch.spec, batch.masks)
                if info.world > 1:
                    # Weight each rank by its share of the step's target tokens: DDP/FSDP average
                    # gradients over ranks, so this gives the gradient of the global token mean,
                    # the same loss as one process with the whole batch.
                    total = batch.target_count.clone()
                    dist.all_reduce(total)
                    part = loss * (batch.target_count / total)
                    (part * info.world).backward()
                    part = part.detach()
                else:
                    loss.backward()
                    part = loss.detach()
                loss_ok = torch.isfinite(loss.detach())
                if cfg.optim.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                else:
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                if hasattr(norm, "full_tensor"):
                    norm = norm.full_tensor()
                bad = (~(torch.isfinite(norm) & loss_ok)).float()
                if info.world > 1:  # every rank skips the same steps
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                if fused:
                    # The fused AdamW kernel skips the whole update (and the step count) on the
                    # device when found_inf is 1: the torch.amp.GradScaler protocol, no host sync.
                    opt.found_inf, opt.grad_scale = bad, None
                    opt.step()
                elif not bool(bad):  # no fused AdamW on this device: a host check instead
                    opt.step()
                opt.zero_grad(set_to_none=True)
                # The EMA runs on skipped steps too: the online weights did not move, so the target
                # only moves toward the last good weights (skipping it would need a host sync).
                update_target(model, tau, sharded)
                loss_sum += torch.where(bad > 0, zero, part)
                good += 1 - bad
                bad_total += bad
                streak.mul_(bad).add_(bad)
                torch.maximum(worst, streak, out=worst)
                n_log += 1
                bar.update(1)
                done = step + 1
                is_log = done % cfg.train.log_every == 0 or done == end
                is_ckpt = done % cfg.train.ckpt_every == 0 or done == end
                # One process checks for a signal every step; ranks agree at log/checkpoint steps.
                if info.world == 1 and signals.received:
                    is_ckpt = True
                if not (is_log or is_ckpt):
                    continue
                # ---- a sync point: read the counters, reduce across ranks
                stop = signals.received is not None
                sums = [float(loss_sum), float(window_bad_samples), float(len(seen_bad))]
                flags = [float(worst), float(stop)]
                if info.world > 1:
                    sums = _allreduce(sums, device, dist.ReduceOp.SUM)
                    flags = _allreduce(flags, device, dist.ReduceOp.MAX)
                n_good = float(good)
                counters["skipped_steps"] = skipped_before + int(float(bad_total))
                counters["bad_samples"] += int(sums[1])
                counters["bad_files"] = max(counters["bad_files"], int(sums[2]))
                if flags[0] >= cfg.train.max_bad_steps:
                    where = f"{last_good[0]} (step {last_good[1]})" if last_good[0] else "none was written yet"
                    raise NonFiniteLossError(
                        f"{int(flags[0])} consecutive steps up to step {done} had a non-finite loss or gradient "
                        f"(train.max_bad_steps={cfg.train.max_bad_steps}); stopping. Last good checkpoint: {where}"
                    )
                worst.copy_(streak)
                if is_log:
                    with torch.no_grad(), amp:  # every rank: a collective under FSDP
                        health = health_stats(model.target_encoder.forward_dense(batch.spec))
                    warning = watch.check(done, health)
                    if warning and info.is_main:
                        log.warning("%s", warning)
                    now = time.perf_counter()
                    mean_loss = sums[0] / n_good if n_good > 0 else math.nan
                    sps = n_log * cfg.train.batch_size / (now - t_log)
                    losses.append((done, mean_loss))
                    if log_file is not None:
                        log_file.write({
                            "step": done, "loss": mean_loss if n_good > 0 else None, "lr": lr, "wd": wd,
                            "momentum": tau, "samples_per_s": sps, "tf_masks": batch.masks.use_tf,
                            "skipped_steps": counters["skipped_steps"], "bad_samples": counters["bad_samples"],
                            "bad_files": counters["bad_files"], **health,
                        })
                    bar.set_postfix(loss=f"{mean_loss:.4f}", rankme=f"{health['rankme']:.1f}",
                                    std=f"{health['feat_std']:.2f}", pos=f"{health['pos_share']:.2f}",
                                    lr=f"{lr:.2e}", m=f"{tau:.4f}", sps=f"{sps:.1f}")
                    loss_sum.zero_()
                    good.zero_()
                    t_log, n_log = now, 0
                window_bad_samples = 0
                if flags[1]:
                    stopped_by = signals.received or "a signal on another rank"
                    is_ckpt = True
                if is_ckpt:
                    ckpt = checkpoint_state(model, opt, done, cfg, info, counters)
                    if info.is_main:
                        ckpts.save(ckpt, done)
                    last_good = (ckpts.latest_path, done)
                if stopped_by:
                    if info.is_main:
                        log.warning("%s: saved the checkpoint at step %d and stopped; continue with --resume",
                                    stopped_by, done)
                    break
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    counters["skipped_steps"] = skipped_before + int(float(bad_total))
    reached = step + 1 if stopped_by else end
    return TrainResult(out, reached, losses, time.perf_counter() - t_start, stopped_by, counters, model)


def main(argv: list[str] | None = None) -> int:
    """`python -m ajepa.train ...` (also under torchrun): the options of `ajepa train`."""
    from ajepa.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
