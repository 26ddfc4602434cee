"""A run survives bad audio, non-finite losses, kill -9 (also mid-save) and SIGTERM/SIGINT, and
resumes exactly from its last complete checkpoint."""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import micro_config

import ajepa.step as step_mod
from ajepa.audio import AudioError
from ajepa.checkpoint import CheckpointDir, load_checkpoint
from ajepa.cli import main
from ajepa.config import save_config
from ajepa.data import synth_clip
from ajepa.model import AJEPA
from ajepa.train import train

ROOT = Path(__file__).resolve().parents[1]
RUN = {"train.ckpt_every": 2, "train.keep_last": 2}  # micro: 12 steps of 4 samples, a row per step
TIMEOUT = 120


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (its first 10 of 12 steps): {step: loss}."""
    result = train(micro_config(**RUN), tmp_path_factory.mktemp("ref") / "run", progress=False, max_steps=10)
    return dict(result.losses)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _online(state: dict) -> dict:
    return {k: v for k, v in state["model"].items() if k.startswith(("encoder.", "predictor."))}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _python(code: str, cwd: Path) -> subprocess.Popen:
    # the same thread count as this process: CPU kernels split their work by it, and the resumed
    # run (here) must repeat the killed one (there) bit for bit
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _args(tmp_path: Path, out: Path) -> list[str]:
    """`python -m ajepa.train` options for the config saved at tmp_path/c.yaml."""
    return ["--config", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress"]


def _resume_matches(out: Path, reference: dict, until: int) -> list[tuple[int, float]]:
    """Resume `out` up to step `until`; its losses must equal the uninterrupted run's exactly."""
    from ajepa.config import load_config

    rest = train(load_config(out / "config.yaml"), out, resume=True, progress=False, max_steps=until)
    assert rest.losses and all(loss == reference[step] for step, loss in rest.losses), (rest.losses, reference)
    steps = [r["step"] for r in _rows(out)]
    assert steps == list(range(1, until + 1)), "metrics rows after the checkpoint should be replaced, not doubled"
    return rest.losses


# ---------------------------------------------------------------------------- bad audio

BAD = {  # file -> what its one log line must say
    "corrupt.wav": "cannot decode",
    "empty.wav": "empty file",
    "silent.wav": "empty waveform",
    "nan.wav": "NaN or Inf",
    "score.mid": "unsupported",
}


def _corpus(root: Path, good: int = 4, bad: bool = True) -> Path:
    root.mkdir()
    names = []
    for i in range(good):
        sf.write(str(root / f"good{i}.wav"), synth_clip(i, 0.7)[0], 16000)
        names.append(f"good{i}.wav")
    if bad:
        (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt not really a wav file at all")
        (root / "empty.wav").write_bytes(b"")
        sf.write(str(root / "silent.wav"), np.zeros(0, np.float32), 16000)
        sf.write(str(root / "nan.wav"), np.full(8000, np.nan, np.float32), 16000, subtype="FLOAT")
        (root / "score.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x00\x60MTrk")
        names += list(BAD)
    (root / "list.csv").write_text("path\n" + "".join(f"{n}\n" for n in names))
    return root / "list.csv"


def test_bad_audio_is_skipped_logged_once_counted_and_deterministic(tmp_path, caplog):
    manifest = _corpus(tmp_path / "audio")
    cfg = micro_config(**{"data.path": str(manifest), "train.steps": 6, "train.ckpt_every": 6})
    with caplog.at_level(logging.WARNING, logger="ajepa"):
        result = train(cfg, tmp_path / "a", progress=False)
    lines = [r.getMessage() for r in caplog.records if "bad audio" in r.getMessage()]
    assert len(lines) == len(BAD)  # 24 samples over 9 files: each bad file is met twice or more, logged once
    for name, reason in BAD.items():
        (line,) = [line for line in lines if f"{name}:" in line]
        assert reason in line, line
    assert result.steps == 6 and all(np.isfinite(loss) for _, loss in result.losses)
    assert result.counters["bad_files"] == len(BAD) and result.counters["bad_samples"] >= 2 * len(BAD)
    last = _rows(tmp_path / "a")[-1]
    assert last["bad_files"] == len(BAD) and last["bad_samples"] == result.counters["bad_samples"]
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")["counters"]["bad_samples"] == last["bad_samples"]
    # substitutes are drawn from (seed, step, index): a second run is the same run
    again = train(cfg, tmp_path / "b", progress=False)
    assert again.losses == result.losses


def test_strict_makes_the_first_bad_file_fatal(tmp_path, capsys):
    save_config(micro_config(**{"data.path": str(_corpus(tmp_path / "audio"))}), tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"), "--strict",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--strict" in err and any(name in err for name in BAD), err
    assert not CheckpointDir(tmp_path / "r").exists()


def test_all_bad_audio_fails_clearly_instead_of_looping(tmp_path):
    manifest = _corpus(tmp_path / "audio", good=0)
    with pytest.raises(AudioError, match="no readable audio: all 5 files failed to load"):
        train(micro_config(**{"data.path": str(manifest)}), tmp_path / "r", progress=False)


# ---------------------------------------------------------------------------- non-finite loss


def _nan_on(monkeypatch, bad_step) -> None:
    """Make the model's loss NaN at the (0-based) steps where bad_step(step) is true."""
    calls = {"n": 0}
    forward = AJEPA.forward

    def poisoned(self, spec, masks):
        loss = forward(self, spec, masks)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return loss * float("nan") if bad_step(step) else loss

    monkeypatch.setattr(AJEPA, "forward", poisoned)


def test_nan_loss_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _nan_on(monkeypatch, lambda s: s == 2)  # step 3
    cfg = micro_config(**{"train.steps": 5, "train.ckpt_every": 1, "train.keep_last": 0})
    result = train(cfg, tmp_path / "r", progress=False)
    assert result.steps == 5 and result.counters["skipped_steps"] == 1
    rows = _rows(tmp_path / "r")
    assert [r["loss"] is None for r in rows] == [False, False, True, False, False]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert CheckpointDir(tmp_path / "r").steps() == [1, 2, 3, 4, 5]  # keep_last=0 keeps every one
    ck = {s: load_checkpoint(tmp_path / "r" / f"checkpoint-{s:08d}.pt") for s in (2, 3, 4)}
    # the skipped step changed no online weight and no optimizer state ...
    assert all(torch.equal(ck[2]["model"][k], v) for k, v in _online(ck[3]).items())
    before, after = ck[2]["optimizer"]["state"], ck[3]["optimizer"]["state"]
    assert before.keys() == after.keys() and all(
        torch.equal(after[k][n], before[k][n]) for k in before for n in before[k])
    # ... and the next good step trains again, with finite weights everywhere
    assert not all(torch.equal(ck[3]["model"][k], v) for k, v in _online(ck[4]).items())
    assert all(torch.isfinite(v).all() for v in ck[4]["model"].values())


def test_consecutive_nan_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _nan_on(monkeypatch, lambda s: s >= 4)  # every step from step 5 on
    save_config(micro_config(**RUN, **{"train.max_bad_steps": 3}), tmp_path / "c.yaml")
    out = tmp_path / "r"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "3 consecutive steps up to step 7" in err and "Last good checkpoint" in err and "step 6" in err, err
    latest = load_checkpoint(out / "checkpoint.pt")
    assert latest["step"] == 6 and latest["counters"]["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in latest["model"].values())
    before = load_checkpoint(out / "checkpoint-00000004.pt")  # the last step that trained
    assert all(torch.equal(before["model"][k], v) for k, v in _online(latest).items())
    assert CheckpointDir(out).steps() == [4, 6]


# ---------------------------------------------------------------------------- crashes and signals


def test_sigint_saves_stops_and_resumes_exactly(tmp_path, monkeypatch, reference):
    ema, calls = step_mod.update_target, {"n": 0}

    def interrupted(*args):
        ema(*args)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(step_mod, "update_target", interrupted)
    out = tmp_path / "r"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not the default, when pytest runs in a background job
    result = train(micro_config(**RUN), out, progress=False)
    assert result.stopped_by == "SIGINT" and result.steps == 5
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5  # saved at the signal, between the every-2 saves
    # keep-last-2: the older numbered checkpoint went; checkpoint.pt is the newest
    assert CheckpointDir(out).steps() == [4, 5] and not list(out.glob("*.tmp"))
    assert os.path.samefile(out / "checkpoint.pt", out / "checkpoint-00000005.pt")
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    monkeypatch.setattr(step_mod, "update_target", ema)
    _resume_matches(out, reference, until=8)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    save_config(micro_config(**{"train.steps": 400, "train.ckpt_every": 100}), tmp_path / "c.yaml")
    out = tmp_path / "r"
    proc = _python(f"import sys; from ajepa.train import main; sys.exit(main({_args(tmp_path, out)!r}))", tmp_path)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((out / "metrics.jsonl").is_file() and len(_rows(out)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the signal"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM: stopped at step" in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert 2 <= state["step"] < 100 and state["step"] == _rows(out)[-1]["step"]


def _kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)


def test_kill9_mid_run_resumes_from_last_complete_checkpoint(tmp_path, reference):
    save_config(micro_config(**RUN), tmp_path / "c.yaml")
    out = tmp_path / "r"
    # each step is slowed down so that the kill lands mid-run, whatever the machine's speed
    proc = _python(
        "import sys, time; import ajepa.step as s, ajepa.train as t; ema = s.update_target\n"
        "s.update_target = lambda *a: (ema(*a), time.sleep(0.2))\n"
        f"sys.exit(t.main({_args(tmp_path, out)!r}))", tmp_path)
    try:
        _kill_when(proc, lambda: (out / "checkpoint-00000004.pt").exists())
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpts = CheckpointDir(out)
    state, path = ckpts.load_latest()
    assert state["step"] >= 4 and state["step"] == ckpts.steps()[-1] < 12 and len(ckpts.steps()) == 2
    assert all(load_checkpoint(ckpts.step_path(s))["step"] == s for s in ckpts.steps())
    _resume_matches(out, reference, until=state["step"] + 2)


def test_kill9_mid_save_damages_no_checkpoint(tmp_path, reference):
    save_config(micro_config(**{**RUN, "train.keep_last": 3}), tmp_path / "c.yaml")
    out = tmp_path / "r"
    # the third save (step 6) writes part of its file, records the other files' hashes, and is killed
    proc = _python(
        "import hashlib, json, os, signal, sys, torch; import ajepa.checkpoint as c; import ajepa.train as t\n"
        "save, n = torch.save, [0]\n"
        "def dying(obj, fh):\n"
        "    n[0] += 1\n"
        "    if n[0] < 3: return save(obj, fh)\n"
        "    fh.write(b'half a checkpoint'); fh.flush()\n"
        f"    out = {str(out)!r}\n"
        "    h = {p: hashlib.sha256(open(os.path.join(out, p), 'rb').read()).hexdigest() for p in os.listdir(out)"
        " if p.endswith('.pt')}\n"
        "    json.dump(h, open(os.path.join(out, '..', 'hashes.json'), 'w'))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.torch.save = dying\n"
        f"sys.exit(t.main({_args(tmp_path, out)!r}))", tmp_path)
    try:
        _kill_when(proc, lambda: proc.poll() is not None)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.communicate()[1][-3000:]
    hashes = json.loads((tmp_path / "hashes.json").read_text())
    assert set(hashes) == {"checkpoint.pt", "checkpoint-00000002.pt", "checkpoint-00000004.pt"}
    assert {p: _sha(out / p) for p in hashes} == hashes  # nothing that existed was touched
    assert len(list(out.glob(".checkpoint-00000006.pt.*.tmp"))) == 1 and not (out / "checkpoint-00000006.pt").exists()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    _resume_matches(out, reference, until=6)
    assert not list(out.glob("*.tmp")) and load_checkpoint(out / "checkpoint.pt")["step"] == 6
