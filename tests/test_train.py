import json

import pytest
import torch
from helpers import micro_config

from ajepa.config import apply_overrides
from ajepa.train import lr_at, momentum_at, train, wd_at


def test_schedules():
    cfg = micro_config(**{"train.steps": 100, "optim.warmup_steps": 10, "optim.lr": 1e-3, "optim.min_lr": 1e-5})
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-5)
    assert lr_at(55, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert wd_at(0, cfg) == pytest.approx(0.04) and wd_at(100, cfg) == pytest.approx(0.4)
    assert momentum_at(0, cfg) == pytest.approx(0.996) and momentum_at(100, cfg) == pytest.approx(1.0)
    assert momentum_at(50, cfg) == pytest.approx(0.998)


def test_tiny_training_loss_falls(tmp_path):
    cfg = micro_config(**{"train.steps": 30, "train.log_every": 5, "optim.lr": 2e-3})
    result = train(cfg, tmp_path / "run", progress=False)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert {"loss", "lr", "wd", "momentum", "samples_per_s"} <= set(rows[0])
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "config.yaml").is_file()


def test_resume_reproduces_uninterrupted_run(tmp_path):
    cfg = micro_config()
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, max_steps=4)  # killed after the step-4 checkpoint
    assert [s for s, _ in part.losses] == [1, 2, 3, 4]
    rest = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert [s for s, _ in rest.losses] == list(range(5, 13))
    assert rest.losses == full.losses[4:]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = micro_config(**{"train.steps": 1})
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)


def test_data_wait_is_measured_and_an_input_bound_run_is_warned_once(tmp_path, monkeypatch, caplog):
    import logging
    import time

    from ajepa.data import SyntheticDataset

    cfg = micro_config(**{"train.steps": 4, "train.log_every": 2})
    clip = torch.zeros(1, cfg.audio.target_frames, cfg.audio.num_mel_bins)

    def run(name: str, seconds_per_clip: float) -> list[float]:
        def load(self, i, generator=None):
            time.sleep(seconds_per_clip)
            return clip

        monkeypatch.setattr(SyntheticDataset, "spectrogram", load)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ajepa"):
            train(cfg, tmp_path / name, progress=False)
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    slow_rows = run("slow", 0.5)  # 2 s of loading per step of a 48-wide model
    slow = [r["data_wait"] for r in slow_rows]
    assert all(0.2 < w <= 1.0 for w in slow), slow
    # the loader's own rate: 0.5 s of sleep per clip caps it at 2 clips/s per worker (one loader: the main process)
    assert all(1.5 < r["loader_clips_per_s_worker"] <= 2.0 for r in slow_rows), slow_rows
    assert all(r["loader_clips_per_s"] == r["loader_clips_per_s_worker"] for r in slow_rows)
    warnings = [r.getMessage() for r in caplog.records if "input-bound" in r.getMessage()]
    assert len(warnings) == 1 and "--workers" in warnings[0] and "clips/s" in warnings[0]
    fast_rows = run("fast", 0.0)
    fast = [r["data_wait"] for r in fast_rows]
    assert max(fast) < min(slow) and max(fast) < 0.2, (fast, slow)
    assert min(r["loader_clips_per_s_worker"] for r in fast_rows) > 50
    assert not [r for r in caplog.records if "input-bound" in r.getMessage()]


def test_the_device_frontend_trains_like_the_per_clip_one(tmp_path):
    """audio.frontend=gpu: loader workers hand over cropped waveforms and the fbank runs batched on the
    training device (here the CPU); the run matches the per-clip frontend's to float rounding."""
    cfg = micro_config(**{"train.steps": 4})
    per_clip = train(apply_overrides(cfg, ["audio.frontend=cpu"]), tmp_path / "cpu", progress=False)
    batched = train(apply_overrides(cfg, ["audio.frontend=gpu"]), tmp_path / "gpu", progress=False)
    torch.testing.assert_close([v for _, v in batched.losses], [v for _, v in per_clip.losses], rtol=1e-4, atol=0)


@pytest.mark.parametrize("cores,local_world,workers", [(2, 1, 1), (16, 1, 8), (16, 2, 7), (16, 8, 1), (64, 4, 8)])
def test_default_worker_count_follows_the_cores_per_rank(monkeypatch, cores, local_world, workers):
    import os

    from ajepa.data import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_workers(local_world) == workers
