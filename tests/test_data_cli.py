import json
import subprocess
import sys

import numpy as np
import soundfile as sf
import torch

from ajepa.cli import build_parser, main
from ajepa.config import AudioConfig, DataConfig
from ajepa.data import SYNTH_CLASSES, StepBatchSampler, SyntheticDataset, build_dataset, synth_clip


def test_synth_corpus_deterministic_labelled_and_varied():
    a, la = synth_clip(3, 1.0)
    b, lb = synth_clip(3, 1.0)
    assert np.array_equal(a, b) and la == lb == 3
    assert np.abs(a).max() <= 1.0 and a.std() > 0
    ds = SyntheticDataset(len(SYNTH_CLASSES) * 2, AudioConfig(target_frames=64))
    specs = torch.stack([ds[i] for i in range(len(ds))])
    assert specs.shape == (14, 1, 64, 128) and torch.isfinite(specs).all()
    assert sorted(set(ds.labels)) == list(range(len(SYNTH_CLASSES)))
    # different classes make different spectrograms
    assert (specs[0] - specs[1]).abs().mean() > 0.05


def test_step_batches_cover_epoch_and_split_ranks():
    s = StepBatchSampler(10, 5, steps=4, seed=0)
    first_epoch = s.indices(0) + s.indices(1)
    assert sorted(first_epoch) == list(range(10))
    r0 = StepBatchSampler(10, 2, steps=4, seed=0, rank=0, world=2)
    r1 = StepBatchSampler(10, 2, steps=4, seed=0, rank=1, world=2)
    assert not set(r0.indices(0)) & set(r1.indices(0))
    resumed = StepBatchSampler(10, 5, steps=4, seed=0, start_step=2)
    assert [b for b in resumed] == [list(zip([2] * 5, s.indices(2))), list(zip([3] * 5, s.indices(3)))]


def _write_clips(root, n=4):
    for i in range(n):
        wave, label = synth_clip(i, 0.7)
        path = root / SYNTH_CLASSES[label] / f"{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wave, 16000)


def test_folder_and_manifests(tmp_path):
    _write_clips(tmp_path / "audio")
    audio = AudioConfig(target_frames=64)
    ds = build_dataset(DataConfig(path=str(tmp_path / "audio")), audio)
    assert len(ds) == 4 and ds.classes == tuple(sorted(SYNTH_CLASSES[:4]))
    files = sorted((tmp_path / "audio").rglob("*.wav"))
    rows = "".join(f"{f.relative_to(tmp_path)},{f.parent.name}\n" for f in files)
    (tmp_path / "m.csv").write_text("path,label\n" + rows)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": str(f)}) + "\n" for f in files))
    csv_ds = build_dataset(DataConfig(path=str(tmp_path / "m.csv")), audio)
    jsonl_ds = build_dataset(DataConfig(path=str(tmp_path / "m.jsonl")), audio)
    assert csv_ds.labels == ds.labels and jsonl_ds.labels == [-1] * 4
    assert csv_ds[0].shape == (1, 64, 128)


def test_data_errors_say_what_was_looked_for(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        build_dataset(DataConfig(path=str(tmp_path / "nope")), AudioConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        build_dataset(DataConfig(path=str(tmp_path / "empty")), AudioConfig())
    (tmp_path / "m.csv").write_text("file\nx.wav\n")
    with pytest.raises(ValueError, match="'path' column"):
        build_dataset(DataConfig(path=str(tmp_path / "m.csv")), AudioConfig())
    (tmp_path / "m2.csv").write_text("path\nmissing.wav\n")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        build_dataset(DataConfig(path=str(tmp_path / "m2.csv")), AudioConfig())


def test_train_help_documents_every_option():
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in sub._actions:
        assert action.help, f"option {action.option_strings} has no help"
    out = subprocess.run([sys.executable, "-m", "ajepa.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "--impl" in out.stdout


def test_cli_train_synth_stats(tmp_path, capsys):
    args = ["--steps", "3", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-progress",
            "--set", "model.depth=1", "--set", "model.pred_depth=1", "--set", "data.synth_clips=4"]
    assert main(["train", "--out", str(tmp_path / "run"), *args]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["synth", "--out", str(tmp_path / "synth"), "--clips", "3", "--no-progress"]) == 0
    assert len(list((tmp_path / "synth").rglob("*.wav"))) == 3
    capsys.readouterr()
    assert main(["stats", "--data", str(tmp_path / "synth"), "--no-progress"]) == 0
    stats = json.loads(capsys.readouterr().out.splitlines()[0])
    assert stats["frames"] > 0 and stats["norm_std"] > 0 and -30 < stats["norm_mean"] < 10


def test_cli_reports_bad_arguments_cleanly(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "train.stepz=3"]) == 2
    assert "unknown config key train.stepz" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_python_m_ajepa_train_parses_the_train_options():
    out = subprocess.run([sys.executable, "-m", "ajepa.train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--strict", "--parallel", "--keep-last", "--resume", "torchrun"):
        assert option in out.stdout
