import json

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import micro_config

import ajepa
from ajepa.cli import main
from ajepa.data import write_synth_corpus
from ajepa.eval.embed import load_encoder, read_checkpoint
from ajepa.eval.probe import (
    _score,
    average_precision,
    cv_folds,
    fit_logreg,
    linear_probe,
    manifest_label_sets,
    mean_average_precision,
    standardize,
    stratified_split,
)
from ajepa.train import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(micro_config(**{"train.steps": 2, "optim.ema_start": 0.5, "optim.ema_end": 0.5}), run, progress=False)
    return run / "checkpoint.pt"


def _wave(seconds=1.3, sr=22050, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def test_embed_shapes_determinism_and_frozen(ckpt):
    enc = ajepa.load_encoder(ckpt)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    waves = torch.from_numpy(np.stack([_wave(seed=s) for s in range(3)]))
    one = enc.embed(waves[0], 22050)
    assert one.shape == (1, enc.dim) and one.dtype == torch.float32 and not one.requires_grad
    batch = enc.embed(waves, 22050)
    assert batch.shape == (3, enc.dim)
    torch.testing.assert_close(batch[:1], one, rtol=1e-5, atol=1e-6)
    assert torch.equal(enc.embed(waves, 22050), batch)
    tokens = enc.embed(waves, 22050, pooling="none")
    assert tokens.shape == (3, enc.cfg.num_patches, enc.dim)
    torch.testing.assert_close(tokens.mean(1), enc.embed(waves, 22050, pooling="mean_all"))
    # 1.3 s clips in the window: the default mean leaves out the padding rows past their end.
    rows = -(-(1 + (int(1.3 * 16000) - 400) // 160) // enc.cfg.model.patch_size) * enc.cfg.grid[1]
    torch.testing.assert_close(tokens[:, :rows].mean(1), batch)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="pooling"):
        enc.embed(waves, 22050, pooling="max")
    with pytest.raises(ValueError, match="waveform"):
        enc.embed(torch.zeros(2, 3, 4), 16000)


def test_embed_files_matches_embed(ckpt, tmp_path):
    enc = load_encoder(ckpt)
    paths = []
    for s in range(3):
        paths.append(tmp_path / f"{s}.wav")
        sf.write(str(paths[-1]), _wave(sr=16000, seed=s), 16000, subtype="FLOAT")
    feats = enc.embed_files(paths, batch_size=2)
    ref = enc.embed(torch.from_numpy(np.stack([_wave(sr=16000, seed=s) for s in range(3)])), 16000)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="nope.wav"):
        enc.embed_files([tmp_path / "nope.wav"])


def test_target_is_default_and_context_differs(ckpt):
    state = read_checkpoint(ckpt)["model"]
    target, context = load_encoder(ckpt), load_encoder(ckpt, which="context")
    w = "blocks.0.attn.qkv.weight"
    assert torch.equal(target.vit.state_dict()[w], state[f"target_encoder.{w}"])
    assert torch.equal(context.vit.state_dict()[w], state[f"encoder.{w}"])
    assert not torch.equal(state[f"target_encoder.{w}"], state[f"encoder.{w}"])
    with pytest.raises(ValueError, match="which"):
        load_encoder(ckpt, which="predictor")


def _edited(ckpt, tmp_path, edit):
    state = torch.load(ckpt, weights_only=False)
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


def test_loading_fails_clearly(ckpt, tmp_path):
    newer = _edited(ckpt, tmp_path, lambda s: s.update(format_version=99))
    with pytest.raises(ValueError, match="format 99 is newer"):
        load_encoder(newer)

    def keys(s):
        s["model"].pop("target_encoder.norm.weight")
        s["model"]["target_encoder.extra.bias"] = torch.zeros(3)

    with pytest.raises(ValueError, match=r"missing keys: norm\.weight.*unexpected keys: extra\.bias"):
        load_encoder(_edited(ckpt, tmp_path, keys))
    with pytest.raises(ValueError, match="unknown config key model.future_knob"):
        load_encoder(_edited(ckpt, tmp_path, lambda s: s["config"]["model"].update(future_knob=1)))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_encoder(tmp_path / "missing.pt")


def test_weights_only_loading_refuses_code(ckpt, tmp_path):
    # A pickled callable would run arbitrary code under weights_only=False.
    path = _edited(ckpt, tmp_path, lambda s: s.update(hook=print))
    with pytest.raises(ValueError, match="not a readable ajepa checkpoint"):
        load_encoder(path)


def test_an_older_config_without_new_keys_loads(ckpt, tmp_path):
    path = _edited(ckpt, tmp_path, lambda s: s["config"]["masks"].pop("curriculum_c0"))
    enc = load_encoder(path)
    assert enc.cfg.masks.curriculum_c0 == 0.01


def test_safetensors_export_roundtrip(ckpt, tmp_path):
    out = tmp_path / "enc.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:
        assert fh.metadata()["kind"] == "ajepa-encoder" and "vit.norm.weight" in fh.keys()
    a, b = load_encoder(ckpt), load_encoder(out)
    wave = torch.from_numpy(_wave())
    assert torch.equal(a.embed(wave, 22050), b.embed(wave, 22050))


def test_embed_cli_writes_npz_with_labels(ckpt, tmp_path):
    corpus = tmp_path / "corpus"
    write_synth_corpus(corpus, 9, micro_config().audio, seed=2, progress=False)
    out = tmp_path / "feats.npz"
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(corpus), "--out", str(out), "--no-progress"]) == 0
    z = np.load(out)
    assert z["embeddings"].shape == (9, 48) and len(z["paths"]) == 9
    assert sorted(z["classes"]) == sorted(p.name for p in corpus.iterdir())
    for path, label in zip(z["paths"], z["labels"]):
        assert z["classes"][label] in path


def test_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    assert main(["probe", "--checkpoint", str(tmp_path / "gone.pt"), "--no-progress"]) == 2
    assert main(["probe", "--preset", "tiny", "--no-progress"]) == 2
    assert main(["embed", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.csv")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert "gone.pt" in lines[0] and "--random-init" in lines[1] and ".npz" in lines[2]


# ---------------------------------------------------------------------------- the probe itself


def test_stratified_split_keeps_every_class_on_both_sides():
    y = np.repeat(np.arange(5), [2, 3, 10, 10, 40])
    tr, te = stratified_split(y, 0.3, seed=1)
    assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == y.size
    assert set(y[tr]) == set(y[te]) == set(range(5))
    assert abs(te.size / y.size - 0.3) < 0.05


def test_linear_probe_separable_vs_random_labels():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(200) % 4
    x = means[y] + torch.randn(200, 16, generator=g) + 50.0  # an offset that standardization removes
    tr, te = stratified_split(y.numpy(), 0.3)
    res = linear_probe(x[tr], y[tr].numpy(), x[te], y[te].numpy())
    assert res.metrics["accuracy"] == 1.0 and res.n_test == te.size and res.feature_dim == 16
    shuffled = y[torch.randperm(200, generator=g)].numpy()
    noise = linear_probe(x[tr], shuffled[tr], x[te], shuffled[te])
    assert noise.metrics["accuracy"] < 0.5


def test_cv_folds_validate_every_clip_once_and_spread_each_class():
    y = np.repeat(np.arange(4), [3, 7, 10, 13])
    folds = cv_folds(y, 5, seed=2)
    assert len(folds) == 5
    val = np.concatenate([v for _, v in folds])
    assert np.array_equal(np.sort(val), np.arange(y.size))  # every clip validated exactly once
    for fit, v in folds:
        assert np.intersect1d(fit, v).size == 0 and fit.size + v.size == y.size
    for c in range(4):  # each class dealt round-robin: its count per fold differs by at most one
        counts = [int((y[v] == c).sum()) for _, v in folds]
        assert max(counts) - min(counts) <= 1
    sizes = [v.size for _, v in folds]
    assert max(sizes) - min(sizes) <= 1  # the deal continues across classes: no fold collects the remainders
    assert [v.tolist() for _, v in cv_folds(y, 5, seed=2)] == [v.tolist() for _, v in folds]
    assert [v.tolist() for _, v in cv_folds(y, 5, seed=3)] != [v.tolist() for _, v in folds]
    ml = cv_folds(np.zeros((11, 3)), 4, seed=0, multilabel=True)
    assert sorted(int(v.size) for _, v in ml) == [2, 3, 3, 3]
    assert np.array_equal(np.sort(np.concatenate([v for _, v in ml])), np.arange(11))


def _hand_val_score(x, y, fit, val, l2, num_classes):
    xf, xv = standardize(x[fit], x[val])
    w, b = fit_logreg(xf, torch.as_tensor(y[fit]), num_classes, l2, False)
    return _score(xv @ w + b, y[val], False)["accuracy"]


def test_linear_probe_val_folds_choose_l2_by_the_mean_over_folds():
    g = torch.Generator().manual_seed(1)
    y = (torch.arange(40) % 3).numpy()
    x = (torch.randn(3, 6, generator=g) * 0.6)[y] + torch.randn(40, 6, generator=g)
    xt, yt = x[:30].double(), y[:30]
    grid = (1e-3, 1.0)
    # One fold: the validation score is the held-out quarter's, exactly as the probe always chose it.
    one = linear_probe(xt, yt, x[30:], y[30:], l2_grid=grid, seed=4)
    fit, val = stratified_split(yt, 0.25, 4)
    assert one.val_folds == 1
    assert one.val_scores == {str(l2): _hand_val_score(xt, yt, fit, val, l2, 3) for l2 in grid}
    # k folds: each L2's score is the clip-weighted mean over the k folds of cv_folds; the best one is refit.
    res = linear_probe(xt, yt, x[30:], y[30:], l2_grid=grid, seed=4, val_folds=4)
    want = {}
    for l2 in grid:
        parts = [(_hand_val_score(xt, yt, f, v, l2, 3), v.size) for f, v in cv_folds(yt, 4, seed=4)]
        want[str(l2)] = sum(s * n for s, n in parts) / 30
    assert res.val_folds == 4 and res.val_scores == pytest.approx(want, abs=1e-12)
    assert res.l2 == max(grid, key=lambda l2: (want[str(l2)], l2))


@pytest.mark.parametrize("bad, says", [(0, "val_folds must be"), (True, "val_folds must be"),
                                        (2.5, "val_folds must be"), (31, "at least 31 training clips")])
def test_linear_probe_refuses_bad_val_folds(bad, says):
    x, y = torch.randn(40, 4), np.arange(40) % 2
    with pytest.raises(ValueError, match=says):
        linear_probe(x[:30], y[:30], x[30:], y[30:], val_folds=bad)


def test_average_precision_hand_values():
    # ranks of the positives: 1 and 3 -> (1/1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    y = np.array([[1, 0], [0, 1], [1, 1]])
    # class 0: positives ranked 1, 2 -> AP 1; class 1: positives ranked 1, 3 -> AP 5/6
    assert mean_average_precision(np.array([[0.9, 0.6], [0.2, 0.8], [0.5, 0.3]]), y) == pytest.approx((1 + 5 / 6) / 2)


def test_multilabel_manifest_gives_map(ckpt, tmp_path):
    corpus = tmp_path / "ml"
    paths = write_synth_corpus(corpus, 28, micro_config().audio, seed=3, progress=False)
    rows = []
    for i, p in enumerate(paths):
        labels = [p.parent.name] + (["loud"] if i % 2 else [])
        rows.append({"path": str(p.relative_to(corpus)), "label": labels})
    manifest = corpus / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert manifest_label_sets(manifest)[1] == [paths[1].parent.name, "loud"]
    report = tmp_path / "ml.json"
    assert (
        main(["probe", "--checkpoint", str(ckpt), "--data", str(manifest), "--report", str(report), "--no-progress"])
        == 0
    )
    got = json.loads(report.read_text())
    assert got["multilabel"] and "loud" in got["classes"] and 0.0 < got["metrics"]["mAP"] <= 1.0


def test_probe_with_given_test_set_maps_labels_by_name(ckpt, tmp_path, capsys):
    import shutil

    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    write_synth_corpus(train_dir, 21, micro_config().audio, seed=4, progress=False)
    # The test set: the training clips themselves, minus two classes, so its own class ids differ.
    shutil.copytree(train_dir, test_dir, ignore=shutil.ignore_patterns("tone", "chirp"))
    report = tmp_path / "given.json"
    args = ["probe", "--checkpoint", str(ckpt), "--data", str(train_dir), "--report", str(report), "--no-progress"]
    assert main([*args, "--test-data", str(test_dir)]) == 0
    got = json.loads(report.read_text())
    assert got["n_train"] == 21 and got["n_test"] == 15 and len(got["classes"]) == 7
    # The same clip gets the same class id and features on both sides.
    from ajepa.cli import build_parser
    from ajepa.cli.eval import _encoder, _probe_split

    parsed = build_parser().parse_args([*args, "--test-data", str(test_dir)])
    x_tr, y_tr, x_te, y_te, _ = _probe_split(parsed, _encoder(parsed))
    train_files = sorted(p.relative_to(train_dir) for p in train_dir.rglob("*.wav"))
    test_files = sorted(p.relative_to(test_dir) for p in test_dir.rglob("*.wav"))
    rows = [train_files.index(f) for f in test_files]
    assert y_te.tolist() == y_tr[rows].tolist() and set(y_te.tolist()) == {0, 2, 3, 4, 5}
    torch.testing.assert_close(x_te, x_tr[rows])
    (test_dir / "unknown_kind").mkdir()
    sf.write(str(test_dir / "unknown_kind" / "x.wav"), _wave(sr=16000), 16000)
    assert main([*args, "--test-data", str(test_dir)]) == 2
    assert "unknown_kind" in capsys.readouterr().err


@pytest.mark.parametrize("patch_frames", [0, 8])
def test_mean_pooling_ignores_padding_and_mean_all_keeps_the_old_behaviour(patch_frames):
    from ajepa.config import apply_overrides, get_preset
    from ajepa.eval.embed import audio_token_mask, random_encoder

    cfg = apply_overrides(get_preset("tiny"), [f"model.patch_frames={patch_frames}"])
    enc = random_encoder(cfg, seed=0)
    sr = cfg.audio.sample_rate
    g = torch.Generator().manual_seed(0)
    short = 0.3 * torch.randn(int(0.7 * sr), generator=g)  # 0.7 s of a 2.56 s window: 70 frames of 256
    full = 0.3 * torch.randn(3 * sr, generator=g)
    from ajepa.audio import waveform_to_spec

    spec = torch.stack([waveform_to_spec(short, sr, cfg.audio), waveform_to_spec(full, sr, cfg.audio)]).unsqueeze(1)
    keep = audio_token_mask(spec, cfg)
    gt, gf = cfg.grid
    rows = keep.view(2, gt, gf)
    real = 1 + (int(0.7 * sr) - 400) // 160  # kaldi frames of the short clip
    assert rows[0, :, 0].sum() == -(-real // (patch_frames or cfg.model.patch_size)) and rows[1].all()
    assert (rows == rows[:, :, :1]).all()  # whole time rows
    tokens = enc.embed_spec(spec, pooling="none")
    mean, mean_all = enc.embed_spec(spec, pooling="mean"), enc.embed_spec(spec, pooling="mean_all")
    n = int(keep[0].sum())
    assert torch.allclose(mean[0], tokens[0, :n].mean(0), atol=1e-6)
    assert torch.allclose(mean_all, tokens.mean(1), atol=1e-6)
    assert torch.allclose(mean[1], mean_all[1], atol=1e-6)  # a clip that fills the window: no change
    assert not torch.allclose(mean[0], mean_all[0], atol=1e-3)
    # embed() on waveforms pools the same way; an all-padding spectrogram keeps every token.
    assert torch.allclose(enc.embed(short, sr), mean[:1], atol=1e-5)
    pad = torch.full_like(spec[:1], float(spec[0, 0, -1, 0]))
    assert audio_token_mask(pad, cfg).all()


def test_group_split_holds_out_whole_groups():
    from ajepa.eval.probe import group_split

    groups = np.repeat(list("abcdefghij"), [10, 12, 8, 10, 11, 9, 10, 10, 10, 10])
    held = []
    for seed in range(6):
        tr, te = group_split(groups, 0.3, seed)
        assert sorted(np.concatenate([tr, te]).tolist()) == list(range(groups.size))
        assert set(groups[tr]).isdisjoint(groups[te])
        assert len(set(groups[te])) == 3 and 26 <= te.size <= 33  # the count nearest 30 of 100 clips
        assert np.array_equal(group_split(groups, 0.3, seed)[1], te)  # a pure function of the seed
        held.append(frozenset(groups[te]))
    assert len(set(held)) > 1
    # At least one group on each side, however small or large the fraction.
    small = np.array(["a", "b", "b", "b"])
    for frac in (0.01, 0.99):
        tr, te = group_split(small, frac, 0)
        assert tr.size and te.size and set(small[tr]).isdisjoint(small[te])
    with pytest.raises(ValueError, match="at least 2 groups"):
        group_split(np.array(["a", "a"]), 0.3, 0)


def test_probe_group_by_tests_on_unseen_speakers_and_refuses_what_cannot_work(ckpt, tmp_path, capsys):
    corpus = tmp_path / "spk"
    paths = write_synth_corpus(corpus, 42, micro_config().audio, seed=5, progress=False)
    speakers = [f"s{i % 6}" for i in range(len(paths))]
    manifest = corpus / "m.csv"
    manifest.write_text("path,label,speaker\n" + "".join(
        f"{p.relative_to(corpus)},{p.parent.name},{s}\n" for p, s in zip(paths, speakers)))
    report = tmp_path / "g.json"
    args = ["probe", "--checkpoint", str(ckpt), "--data", str(manifest), "--report", str(report), "--no-progress"]
    assert main([*args, "--group-by", "speaker", "--baseline", "mel"]) == 0
    got = json.loads(report.read_text())
    assert got["group_by"] == "speaker" and got["n_train"] + got["n_test"] == 42 and got["n_test"] == 14
    assert got["baselines"]["mel"]["n_test"] == 14 and "never trained on" in capsys.readouterr().out
    # The split the probe used: whole speakers on the test side, none of them in training.
    from ajepa.cli import build_parser
    from ajepa.cli.eval import _encoder, _probe_split

    parsed = build_parser().parse_args([*args, "--group-by", "speaker"])
    x_tr, _, x_te, _, _ = _probe_split(parsed, _encoder(parsed))
    x_all, _, _, _, _ = _probe_split(build_parser().parse_args([*args, "--test-data", str(manifest)]),
                                     _encoder(parsed))
    spk = np.array(speakers)
    rows_te = [int(torch.cdist(x[None], x_all).argmin()) for x in x_te]
    rows_tr = [int(torch.cdist(x[None], x_all).argmin()) for x in x_tr]
    assert set(spk[rows_te]).isdisjoint(spk[rows_tr]) and len(set(spk[rows_te])) == 2
    # Refused in one line before any clip is embedded, nothing written.
    report.unlink()
    for extra, says in ((["--group-by", "room"], "no 'room' column"),
                        (["--group-by", "speaker", "--test-data", str(manifest)], "--test-data")):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and err.count("\n") == 1
        assert not report.exists()
    one = corpus / "one.csv"
    one.write_text("path,label,speaker\n" + "".join(f"{p.relative_to(corpus)},{p.parent.name},x\n" for p in paths))
    assert main(["probe", "--checkpoint", str(ckpt), "--data", str(one), "--group-by", "speaker", "--no-progress"]) == 2
    assert "only one group" in capsys.readouterr().err
    assert main(["probe", "--checkpoint", str(ckpt), "--data", str(corpus), "--group-by", "speaker",
                 "--no-progress"]) == 2
    assert ".csv or .jsonl manifest" in capsys.readouterr().err
    holes = corpus / "holes.csv"
    holes.write_text("path,label,speaker\n" + "".join(
        f"{p.relative_to(corpus)},{p.parent.name},{'' if i == 3 else 's'}\n" for i, p in enumerate(paths)))
    assert main(["probe", "--checkpoint", str(ckpt), "--data", str(holes), "--group-by", "speaker",
                 "--no-progress"]) == 2
    assert "row 4" in capsys.readouterr().err
