"""The A-JEPA training run: setup, the loop over `TrainStep`, and the log / checkpoint sync.

    result = train(cfg, "runs/x")                 # or: ajepa train ... / torchrun -m ajepa.train ...

`Trainer.setup` builds everything (model, optional resume, DDP/FSDP2 wrapping, the step, the loader,
the metrics log); `Trainer.fit` feeds batches to the step; `Trainer.sync` runs only at log and
checkpoint steps, reads the device counters, logs and saves. Around them: warmup + cosine LR, cosine
weight decay, the EMA schedule, AMP, atomic keep-last-K checkpoints with exact resume at any world
size, non-finite step skipping, SIGTERM/SIGINT save-and-exit, JSONL metrics (and TensorBoard).
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ajepa.audio import batch_fbank
from ajepa.checkpoint import CheckpointDir
from ajepa.config import Config, check_world_size, save_config, to_dict
from ajepa.data import Batch, ClipRows, build_dataset, default_workers, make_loader
from ajepa.distributed import (
    DistInfo,
    allreduce,
    checkpoint_state,
    init_distributed,
    load_optimizer_state,
    wrap_model,
)
from ajepa.masks import MaskSampler
from ajepa.model import AJEPA
from ajepa.model.health import CollapseWatch, health_stats
from ajepa.runfolder import CheckpointWriteError, MetricsLog, RunLock, StopSignals
from ajepa.stats import resolve_auto_norm
from ajepa.step import DeviceCounters, StepStats, TrainStep, weights_finite

log = logging.getLogger("ajepa")
INPUT_BOUND = 0.10  # warn once when the step waits for data more than this share of the time


class NonFiniteLossError(FloatingPointError):
    """train.max_bad_steps consecutive steps had a non-finite loss or gradient, or the weights hold NaN/Inf."""


@dataclass
class TrainResult:
    out: Path
    steps: int  # the step the run reached
    losses: list[tuple[int, float]]  # (step, loss) at each logged step; NaN where every step was skipped
    seconds: float
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early
    counters: dict = field(default_factory=dict)  # skipped_steps, bad_samples, bad_files
    model: AJEPA | None = None  # the trained model (this rank's shards under FSDP)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: Config, out: str | Path, resume: bool = False, progress: bool = True,
          max_steps: int | None = None) -> TrainResult:
    """Train `cfg` into folder `out`. `resume` continues from the newest checkpoint in `out`;
    `max_steps` stops early (the schedules still span train.steps), as a kill would.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: train.batch_size is the global batch,
    split evenly; rank 0 alone writes checkpoints, metrics and config, and holds the folder's lock.
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
        out = Path(out)
        check_world_size(cfg, info.world)
        dataset = build_dataset(cfg.data, cfg.audio, cfg.train.seed)  # bad --data fails before any write,
        cfg, dataset = _auto_norm(cfg, dataset, announce=progress and info.is_main)  # unreadable or silent too
        if not info.is_main:
            return Trainer(cfg, out, info, device, dataset, resume, progress, max_steps).fit()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(exc.errno, f"--out {out}: cannot create the run folder ({exc.strerror})") from None
        with RunLock(out):
            return Trainer(cfg, out, info, device, dataset, resume, progress, max_steps).fit()
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        if info.owned:
            dist.destroy_process_group()


def _auto_norm(cfg: Config, dataset, announce: bool):
    """With audio.auto_norm: cfg with the data's own fbank statistics (measured on `dataset`; every rank
    measures the same clips) and the dataset rebuilt to normalize with them. Otherwise (cfg, dataset)."""
    resolved, stats = resolve_auto_norm(cfg, dataset=dataset)
    if stats is None:
        return cfg, dataset
    if announce:
        print(f"audio.auto_norm: norm_mean={resolved.audio.norm_mean:.4f} norm_std={resolved.audio.norm_std:.4f} "
              f"measured on {stats.frames} frames of the data", file=sys.stderr)
    return resolved, build_dataset(resolved.data, resolved.audio, resolved.train.seed)


class Trainer:
    """One training run in folder `out` (see the module docstring). Construct, then `fit()`."""

    def __init__(self, cfg: Config, out: Path, info: DistInfo, device: torch.device, dataset,
                 resume: bool = False, progress: bool = True, max_steps: int | None = None):
        self.cfg, self.out, self.info, self.device = cfg, out, info, device
        self.progress = progress
        self.end = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)
        self.counters = {"skipped_steps": 0, "bad_samples": 0, "bad_files": 0}
        self.start = 0
        self.last_good: tuple[Path | None, int] = (None, 0)
        self.setup(dataset, resume)

    # ------------------------------------------------------------------ setup

    def setup(self, dataset, resume: bool) -> None:
        cfg, info = self.cfg, self.info
        self.ckpts = CheckpointDir(self.out, cfg.train.keep_last)
        seed_everything(cfg.train.seed)
        self.model = AJEPA(cfg, impl=cfg.train.impl).to(self.device)
        state = self._restore() if resume else None
        if not resume and self.ckpts.exists():
            raise FileExistsError(
                f"{self.out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
        if info.is_main:
            for stale in self.ckpts.remove_partial():
                log.warning("removed %s, left by a save that was interrupted", stale)
            save_config(cfg, self.out / "config.yaml")
        wrapped = wrap_model(self.model, cfg, info, self.device)
        self.step_fn = TrainStep(self.model, cfg, self.device, info, wrapped)
        if state is not None:
            load_optimizer_state(self.model, self.step_fn.opt, state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            np.random.set_state(state["rng"]["numpy"])
            random.setstate(state["rng"]["python"])
        sampler = MaskSampler(cfg.masks, cfg.grid, cfg.train.steps, cfg.train.seed, rank=info.rank)
        frontend = cfg.audio.frontend
        self.device_fbank = frontend == "gpu" or (frontend == "auto" and self.device.type == "cuda")
        workers = cfg.train.num_workers
        if workers < 0:
            workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.workers = workers
        clip_rows = ClipRows(cfg.audio, cfg.patch_shape[0]) if cfg.model.clip_tokens_only else None
        self.loader = make_loader(dataset, sampler, cfg.train.batch_size // info.world, self.end, cfg.train.seed,
                                  self.start, workers, info.rank, info.world,
                                  pin_memory=self.device.type == "cuda", strict=cfg.data.strict,
                                  waves=self.device_fbank, clip_rows=clip_rows)
        self.metrics = MetricsLog(self.out, fresh=not resume) if info.is_main else None
        if self.metrics is not None and resume:
            self.metrics.truncate(self.start)
        self.device_counters = DeviceCounters(self.device)
        self.skipped_before = self.counters["skipped_steps"]

    def _restore(self) -> dict | None:
        """Load the newest checkpoint into the model; returns its state (None: nothing to resume)."""
        found = self.ckpts.load_latest()
        if found is None:
            if self.info.is_main:
                log.warning("--resume: %s holds no checkpoint yet; starting from step 0", self.out)
            return None
        state, path = found
        saved = state["config"] if isinstance(state["config"], dict) else {}
        if saved.get("model") != to_dict(self.cfg)["model"] or saved.get("audio") != to_dict(self.cfg)["audio"]:
            raise ValueError(f"{path}: the checkpoint's model/audio config differs from this run's; cannot resume")
        self.model.load_state_dict(state["model"])
        self.start = int(state["step"])
        self.counters.update(state.get("counters", {}))
        self.last_good = (path, self.start)
        return state

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        from tqdm import tqdm

        self.losses: list[tuple[int, float]] = []
        self.seen_bad: set[str] = set()
        self.window_bad_samples = 0
        self.t_start = self.t_log = time.perf_counter()
        self.n_log, self.stopped_by, step = 0, None, self.start
        self.data_wait, self.warned_input_bound = 0.0, False
        self.loader_s, self.loader_clips = 0.0, 0  # loader work in this log window (see Batch.load_s)
        self.watch = CollapseWatch()
        bar = tqdm(total=self.end, initial=self.start, desc="train", dynamic_ncols=True,
                   disable=not (self.progress and self.info.is_main))
        try:
            with StopSignals() as signals:
                # The loader draws its workers' base seed from the global RNG when its iterator starts; a
                # fork keeps that draw out of the stream the model uses (SIGReg's projections), so a
                # resumed run repeats the uninterrupted one.
                with torch.random.fork_rng(devices=[]):
                    batches = iter(self.loader)
                while (batch := self._next_batch(batches)) is not None:
                    step = self._note_bad_audio(batch).step
                    self.loader_s += batch.load_s
                    self.loader_clips += batch.labels.numel()
                    batch = self._on_device(batch)
                    stats = self.step_fn(batch.spec, batch.masks, step, batch.target_count)
                    self.device_counters.add(stats)
                    self.n_log += 1
                    bar.update(1)
                    if self.sync(step + 1, batch, stats, signals, bar):
                        break
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        self.counters["skipped_steps"] = self.skipped_before + int(float(self.device_counters.bad_total))
        reached = step + 1 if self.stopped_by else self.end
        return TrainResult(self.out, reached, self.losses, time.perf_counter() - self.t_start, self.stopped_by,
                           self.counters, self.model)

    def _next_batch(self, batches) -> Batch | None:
        """The next batch, timing how long the step waited for it (the data-wait metric)."""
        t0 = time.perf_counter()
        batch = next(batches, None)
        self.data_wait += time.perf_counter() - t0
        return batch

    def _on_device(self, batch: Batch) -> Batch:
        """The batch on the training device, its waveforms turned into spectrograms there when the
        fbank runs on the device (audio.frontend)."""
        batch = batch.to(self.device, non_blocking=True)
        if batch.lengths is not None:
            batch.spec = batch_fbank(batch.spec, batch.lengths, self.cfg.audio, validate=False).unsqueeze(1)
            batch.lengths = None
        return batch

    def _note_bad_audio(self, batch: Batch) -> Batch:
        if batch.error is not None:  # raised in a loader worker: its one-line message, no traceback
            raise batch.error
        for name, reason in batch.bad:  # empty unless a clip was bad: no per-sample work
            if name not in self.seen_bad:
                self.seen_bad.add(name)
                log.warning("skipping bad audio %s: %s", name, reason)
        self.window_bad_samples += batch.skipped
        return batch

    # ------------------------------------------------------------------ log / checkpoint sync

    def sync(self, done: int, batch: Batch, stats: StepStats, signals: StopSignals, bar) -> bool:
        """At log and checkpoint steps (or on a signal): read the counters, reduce them across ranks,
        log, save. Returns True when the run should stop (a signal)."""
        t = self.cfg.train
        is_log = done % t.log_every == 0 or done == self.end
        # One process checks for a signal every step; ranks agree at log/checkpoint steps.
        is_ckpt = done % t.ckpt_every == 0 or done == self.end or (self.info.world == 1 and bool(signals.received))
        if not (is_log or is_ckpt):
            return False
        c = self.device_counters
        sums = [float(c.loss_sum), float(self.window_bad_samples), float(len(self.seen_bad))]
        flags = [float(c.worst), float(signals.received is not None), float(not weights_finite(self.step_fn.params))]
        if self.info.world > 1:
            sums = allreduce(sums, self.device, dist.ReduceOp.SUM)
            flags = allreduce(flags, self.device, dist.ReduceOp.MAX)
        self.counters["skipped_steps"] = self.skipped_before + int(float(c.bad_total))
        self.counters["bad_samples"] += int(sums[1])
        self.counters["bad_files"] = max(self.counters["bad_files"], int(sums[2]))
        self.window_bad_samples = 0
        if flags[0] >= t.max_bad_steps:
            raise NonFiniteLossError(
                f"{int(flags[0])} consecutive steps up to step {done} had a non-finite loss or gradient "
                f"(train.max_bad_steps={t.max_bad_steps}); stopping. Last good checkpoint: {self._last_good()}")
        if flags[2]:  # a NaN/Inf weight (an overflow the step skip missed): never saved as good
            raise NonFiniteLossError(
                f"the weights hold NaN or Inf at step {done}; not saving them. Last good checkpoint: "
                f"{self._last_good()}")
        if is_log:
            with torch.no_grad(), self.step_fn.amp():  # every rank: a collective under FSDP
                health = health_stats(self.model.target_tokens(batch.spec, batch.masks))
            warning = self.watch.check(done, health)
            if warning and self.info.is_main:
                log.warning("%s", warning)
            self._log(done, sums[0], batch, stats, bar, health)
        c.next_window(logged=is_log)
        if flags[1]:
            self.stopped_by = signals.received or "a signal on another rank"
        if is_ckpt or self.stopped_by:
            self.save(done)
        if self.stopped_by and self.info.is_main:
            log.warning("%s: saved the checkpoint at step %d and stopped; continue with --resume",
                        self.stopped_by, done)
        return self.stopped_by is not None

    def _last_good(self) -> str:
        path, step = self.last_good
        return f"{path} (step {step})" if path else "none was written yet"

    def _log(self, done: int, loss_sum: float, batch: Batch, stats: StepStats, bar, health: dict) -> None:
        now = time.perf_counter()
        n_good = float(self.device_counters.good)
        mean_loss = loss_sum / n_good if n_good > 0 else math.nan
        sps = self.n_log * self.cfg.train.batch_size / (now - self.t_log)
        wait = min(1.0, self.data_wait / max(now - self.t_log, 1e-9))  # share of wall time spent waiting for data
        # What this rank's loader could deliver: clips per second of worker time, times the workers that run
        # in parallel. Below the step's appetite (samples_per_s / world) the run is input-bound.
        per_worker = self.loader_clips / self.loader_s if self.loader_s > 0 else math.nan
        loader = per_worker * max(1, self.workers)
        self.losses.append((done, mean_loss))
        if self.metrics is not None:
            c = self.counters
            self.metrics.write({
                "step": done, "loss": mean_loss if n_good > 0 else None, "lr": stats.lr, "wd": stats.wd,
                "momentum": stats.tau, "samples_per_s": sps, "tf_masks": batch.masks.use_tf,
                "skipped_steps": c["skipped_steps"], "bad_samples": c["bad_samples"], "bad_files": c["bad_files"],
                "data_wait": wait, "loader_clips_per_s": loader, "loader_clips_per_s_worker": per_worker, **health,
            })
        bar.set_postfix(loss=f"{mean_loss:.4f}", rankme=f"{health['rankme']:.1f}", std=f"{health['feat_std']:.2f}",
                        pos=f"{health['pos_share']:.2f}", lr=f"{stats.lr:.2e}", m=f"{stats.tau:.4f}",
                        sps=f"{sps:.1f}", wait=f"{wait:.0%}", load=f"{loader:.0f}/s")
        if wait > INPUT_BOUND and done > self.cfg.train.log_every and not self.warned_input_bound and self.info.is_main:
            self.warned_input_bound = True
            log.warning("input-bound: the step waited for data %.0f%% of the time up to step %d: the loader delivers "
                        "about %.0f clips/s (%d workers x %.0f) and the step takes %.0f; more loader workers "
                        "(--workers), shards from `ajepa prepare` or the device fbank (audio.frontend=gpu) would "
                        "speed this run up", 100 * wait, done, loader, max(1, self.workers), per_worker,
                        sps / self.info.world)
        self.t_log, self.n_log, self.data_wait = now, 0, 0.0
        self.loader_s, self.loader_clips = 0.0, 0

    def save(self, done: int) -> None:
        """Write the step-`done` checkpoint (rank 0; a collective under FSDP, so every rank calls it)."""
        state = checkpoint_state(self.model, self.step_fn.opt, done, self.cfg, self.info, self.counters)
        if self.info.is_main:
            try:
                self.ckpts.save(state, done)
            except OSError as exc:
                raise CheckpointWriteError(
                    exc.errno, f"could not write the step-{done} checkpoint in {self.out} ({exc.strerror or exc}); "
                    f"the last complete checkpoint is intact: {self._last_good()}") from None
        self.last_good = (self.ckpts.step_path(done), done)
