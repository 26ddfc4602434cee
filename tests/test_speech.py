"""The espeak-ng + sox speech benchmark: the plan always; the synthesis where the tools are installed."""

import hashlib
import json

import numpy as np
import pytest

from ajepa.cli import main
from ajepa.speech import (
    PRETRAIN_VARIANTS,
    PROBE_VARIANTS,
    PROBE_WORDS,
    VOCABULARY,
    missing_tools,
    plan,
    write_probe_manifest,
)


def test_plan_is_deterministic_and_keeps_probe_words_and_voices_apart():
    a, b, c = plan(0, 50, 3), plan(0, 50, 3), plan(1, 50, 3)
    assert a == b and a != c
    pre = [x for x in a if x.label is None]
    probe = [x for x in a if x.label is not None]
    assert len(pre) == 50 and len(probe) == 3 * len(PROBE_WORDS)
    assert set(PROBE_VARIANTS).isdisjoint(PRETRAIN_VARIANTS)
    assert {x.voice.split("+")[1] for x in pre} <= set(PRETRAIN_VARIANTS)
    assert {x.voice.split("+")[1] for x in probe} <= set(PROBE_VARIANTS)
    spoken = {w for x in pre for w in x.text.split()}
    assert spoken <= set(VOCABULARY) and spoken.isdisjoint(PROBE_WORDS)
    assert all(2 <= len(x.text.split()) <= 5 for x in pre)
    assert all(x.path == f"probe/{x.label}/{x.path.rsplit('/', 1)[1]}" for x in probe)
    assert len({x.path for x in a}) == len(a)
    with pytest.raises(ValueError, match="vocabulary"):
        plan(0, 5, 1, words=("yes", "the"))


def test_probe_manifest_names_each_clips_speaker(tmp_path):
    from ajepa.data import read_manifest
    from ajepa.eval.probe import manifest_column

    clips = plan(2, 7, 4)
    path = write_probe_manifest(tmp_path, clips)
    probe = [c for c in clips if c.label is not None]
    paths, labels = read_manifest(path)
    assert paths == [tmp_path / c.path for c in probe] and labels == [c.label for c in probe]
    speakers = manifest_column(path, "speaker")
    assert speakers.tolist() == [c.voice.split("+")[1] for c in probe] and set(speakers) <= set(PROBE_VARIANTS)
    assert [f"{a}+{b}" for a, b in zip(manifest_column(path, "accent"), speakers)] == [c.voice for c in probe]


@pytest.mark.skipif(bool(missing_tools()),
                    reason=f"needs {' and '.join(missing_tools())} (apt-get install -y espeak-ng sox)")
def test_speech_benchmark_synthesizes_a_probe_ready_folder(tmp_path):
    import soundfile as sf

    out = tmp_path / "speech"
    assert main(["speech", "--out", str(out), "--pretrain-clips", "4", "--per-word", "2", "--seed", "3",
                 "--no-progress"]) == 0
    meta = json.loads((out / "speech.json").read_text())
    assert len(meta["clips"]) == 4 + 2 * len(PROBE_WORDS)
    pre = sorted((out / "pretrain").glob("*.wav"))
    assert len(pre) == 4 and sorted(p.name for p in (out / "probe").iterdir()) == sorted(PROBE_WORDS)
    digests = {}
    for clip in meta["clips"]:
        path = out / clip["path"]
        wave, sr = sf.read(path)
        assert sr == 16000 and wave.ndim == 1, path
        assert 0.2 < len(wave) / sr < 4.0, path
        assert np.abs(wave).max() > 0.05, path  # speech, not silence
        digests[clip["path"]] = hashlib.sha256(path.read_bytes()).hexdigest()
    # Same seed, same bytes.
    again = tmp_path / "again"
    assert main(["speech", "--out", str(again), "--pretrain-clips", "4", "--per-word", "2", "--seed", "3",
                 "--no-progress"]) == 0
    assert all(hashlib.sha256((again / p).read_bytes()).hexdigest() == d for p, d in digests.items())
    # The probe folder is what `ajepa probe --data` reads: labels by folder.
    from ajepa.config import DataConfig, get_preset
    from ajepa.data import build_dataset

    ds = build_dataset(DataConfig(path=str(out / "probe")), get_preset("tiny").audio)
    assert ds.classes == tuple(sorted(PROBE_WORDS)) and len(ds) == 20
    assert build_dataset(DataConfig(path=str(out / "pretrain")), get_preset("tiny").audio).labels == [-1] * 4
    # probe.csv lists the same clips with their speakers, for `ajepa probe --group-by speaker`.
    listed = build_dataset(DataConfig(path=str(out / "probe.csv")), get_preset("tiny").audio)
    assert sorted(listed.paths) == sorted(ds.paths) and listed.classes == ds.classes
