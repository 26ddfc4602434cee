"""What pretraining buys: a small pretrained encoder against --random-init on the built-in corpus.

The fixture is a 48-wide, 2-deep target encoder pretrained for 1000 steps by `ajepa train` and
exported by `ajepa export` (tests/fixtures/make_probe_encoder.sh rebuilds it). The probe runs on
clips of corpus seed 1, which pretraining (seed 0) never saw.
"""

import json
from pathlib import Path

import numpy as np
import torch

from ajepa.cli import main
from ajepa.data import SyntheticDataset
from ajepa.eval.embed import dataset_features, load_encoder, random_encoder
from ajepa.eval.probe import linear_probe, stratified_split

FIXTURE = Path(__file__).parent / "fixtures" / "probe_encoder.safetensors"
CLIPS = 210  # 30 per class; 63 test clips per split


def test_fixture_is_small_and_loads():
    assert FIXTURE.stat().st_size < 2_000_000
    enc = load_encoder(FIXTURE)
    assert enc.dim == 48 and len(enc.vit.blocks) == 2 and enc.cfg.masks.mode == "multiblock"


def test_pretrained_encoder_beats_random_init():
    pretrained = load_encoder(FIXTURE)
    cfg = pretrained.cfg
    ds = SyntheticDataset(CLIPS, cfg.audio, seed=1)
    y = np.asarray(ds.labels)
    feats = {"pretrained": dataset_features(pretrained, ds)}
    for seed in (0, 1):  # two random draws of the same shape, so one lucky init cannot decide it
        feats[f"random{seed}"] = dataset_features(random_encoder(cfg, seed), ds)
    acc = {name: [] for name in feats}
    for split in range(3):
        tr, te = stratified_split(y, 0.3, seed=split)
        for name, x in feats.items():
            acc[name].append(linear_probe(x[tr], y[tr], x[te], y[te], seed=split).metrics["accuracy"])
    pre = np.array(acc["pretrained"])
    best_random = np.maximum(acc["random0"], acc["random1"])
    # Measured: pretrained 0.65-0.68 per split, random 0.46-0.59 (chance is 1/7).
    assert (pre > best_random).all(), acc
    assert pre.mean() >= best_random.mean() + 0.07, acc
    assert pre.mean() >= 0.6, acc


def test_probe_cli_reports_both(tmp_path, capsys):
    common = ["--clips", "70", "--no-progress", "--device", "cpu"]
    assert main(["probe", "--checkpoint", str(FIXTURE), "--report", str(tmp_path / "p.json"), *common]) == 0
    assert (
        main(["probe", "--random-init", "--checkpoint", str(FIXTURE), "--report", str(tmp_path / "r.json"), *common])
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert "accuracy" in out[0] and "random-init" in out[1]
    p, r = json.loads((tmp_path / "p.json").read_text()), json.loads((tmp_path / "r.json").read_text())
    assert p["n_test"] == r["n_test"] == 21 and p["n_train"] == 49 and p["feature_dim"] == r["feature_dim"] == 48
    assert "random-init" in r["source"] and str(FIXTURE) in p["source"]
    assert 0.0 <= p["metrics"]["accuracy"] <= 1.0 and set(p["val_scores"]) == {
        str(v) for v in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    }


def test_probe_baseline_mel_puts_three_side_by_side(tmp_path, capsys):
    from ajepa.eval.embed import load_encoder
    from ajepa.eval.probe import logmel_features, stratified_split

    report = tmp_path / "b.json"
    assert main(["probe", "--checkpoint", str(FIXTURE), "--report", str(report), "--baseline", "mel",
                 "--clips", "70", "--no-progress", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "this encoder" in line and "random init (seed 0)" in line and "log-mel mean+std" in line
    rep = json.loads(report.read_text())
    rnd, mel = rep["baselines"]["random_init"], rep["baselines"]["mel"]
    # Same splits for all three; the log-mel baseline is 2 x 128 mel bins wide.
    assert rep["n_test"] == rnd["n_test"] == mel["n_test"] == 21 and mel["n_train"] == 49
    assert mel["feature_dim"] == 256 and rnd["feature_dim"] == rep["feature_dim"] == 48
    for r in (rep, rnd, mel):
        assert f"{r['metrics']['accuracy']:.3f}" in line
    # The figure is the probe of exactly those features on that split.
    enc = load_encoder(FIXTURE)
    from ajepa.config import DataConfig
    from ajepa.data import build_dataset

    ds = build_dataset(DataConfig(synth_clips=70, random_crop=False), enc.cfg.audio, seed=1)
    x, y = logmel_features(ds, enc.cfg.audio), np.asarray(ds.labels)
    tr, te = stratified_split(y, 0.3, 0)
    assert linear_probe(x[tr], y[tr], x[te], y[te], seed=0).metrics["accuracy"] == mel["metrics"]["accuracy"]
    # RankMe of the clip embeddings, every probed clip: the encoder's and the random encoder's, printed too;
    # the log-mel row has none (raw log-mel statistics are not zero-centred features of a network).
    from ajepa.model.health import rankme

    for r, e in ((rep, enc), (rnd, random_encoder(enc.cfg, 0))):
        assert r["rankme"] == round(rankme(dataset_features(e, ds)), 4), r["rankme"]
        assert f"{r['rankme']:.1f}" in line.split("RankMe")[1]
    assert "rankme" not in mel and rep["rankme"] != rnd["rankme"]


def test_logmel_features_use_only_the_clips_own_frames():
    from ajepa.config import get_preset
    from ajepa.eval.probe import logmel_features

    audio = get_preset("tiny").audio

    class Clips:
        def __init__(self, fbanks):
            self.fbanks = fbanks

        def __len__(self):
            return len(self.fbanks)

        def raw_fbank(self, i):
            return self.fbanks[i]

    g = torch.Generator().manual_seed(0)
    short = torch.randn(40, 128, generator=g)
    long = torch.randn(audio.target_frames + 100, 128, generator=g)
    x = logmel_features(Clips([short, long]), audio)
    assert x.shape == (2, 256)
    assert torch.allclose(x[0, :128], short.mean(0)) and torch.allclose(x[0, 128:], short.std(0, unbiased=False))
    assert torch.allclose(x[1, :128], long[: audio.target_frames].mean(0))


def test_probe_val_folds_reach_every_probe_of_the_report(tmp_path, capsys):
    from ajepa.config import DataConfig
    from ajepa.data import build_dataset
    from ajepa.eval.probe import logmel_features

    report = tmp_path / "k.json"
    common = ["--clips", "70", "--no-progress", "--device", "cpu", "--report", str(report)]
    assert main(["probe", "--checkpoint", str(FIXTURE), "--baseline", "mel", "--val-folds", "3", *common]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    rep = json.loads(report.read_text())
    assert "by 3-fold cross-validation" in line
    assert rep["val_folds"] == rep["baselines"]["random_init"]["val_folds"] == rep["baselines"]["mel"]["val_folds"] == 3
    # The log-mel figure is the 3-fold probe of those features on that split.
    ds = build_dataset(DataConfig(synth_clips=70, random_crop=False), load_encoder(FIXTURE).cfg.audio, seed=1)
    x, y = logmel_features(ds, load_encoder(FIXTURE).cfg.audio), np.asarray(ds.labels)
    tr, te = stratified_split(y, 0.3, 0)
    mel = rep["baselines"]["mel"]
    hand = linear_probe(x[tr], y[tr], x[te], y[te], seed=0, val_folds=3)
    assert hand.metrics == mel["metrics"] and hand.val_scores == mel["val_scores"] and hand.l2 == mel["l2"]
    # A bad count: one line, before any clip is embedded, nothing written.
    report.unlink()
    assert main(["probe", "--checkpoint", str(FIXTURE), "--val-folds", "0", *common]) == 2
    err = capsys.readouterr().err
    assert "--val-folds must be at least 1" in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["probe", "--checkpoint", str(FIXTURE), "--val-folds", "50", *common]) == 2  # 49 training clips
    err = capsys.readouterr().err
    assert "--val-folds 50 needs at least 50 training clips, got 49" in err and err.count("\n") == 1
    assert not report.exists()
