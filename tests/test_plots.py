import json

import numpy as np
import pytest

from ajepa.cli import main
from ajepa.config import get_preset
from ajepa.plots import plot_masks, plot_run


def _image(path):
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 20_000
    img = matplotlib.image.imread(str(path))
    return img[..., :3]


def _write_metrics(run, steps=30):
    run.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "loss": 1.0 / s,
            "lr": 1e-3 * min(1.0, s / 10),
            "wd": 0.04,
            "momentum": 0.996 + s * 1e-4,
            "samples_per_s": 20.0 + (s % 3),
            "loader_clips_per_s": 60.0 - (s % 5),
            "data_wait": 0.01 * (s % 4),
            "rankme": 30.0 - s / 2,
            "feat_std": 0.5 / s,
            "pos_share": 0.7 + s / 200,
        }
        for s in range(1, steps + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_masks_png_is_written_and_shows_masks(tmp_path):
    out = plot_masks(get_preset("tiny"), tmp_path / "masks.png", seed=3)
    img = _image(out)
    assert img.shape[0] > 500 and img.shape[1] > 800
    assert img.std() > 0.1  # a picture, not a blank canvas
    # The target outlines use saturated colors absent from the magma colormap: cyan appears.
    cyan = (img[..., 0] < 0.1) & (img[..., 1] > 0.8) & (img[..., 2] > 0.9)
    assert cyan.sum() > 100


def test_masks_cli_and_bad_suffix(tmp_path, capsys):
    assert main(["masks", "--preset", "tiny", "--examples", "1", "--out", str(tmp_path / "m.png")]) == 0
    assert _image(tmp_path / "m.png").std() > 0.1
    assert main(["masks", "--out", str(tmp_path / "m.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "m.jpg" in err and ".png" in err


def test_plot_run_draws_every_curve(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run)
    out = plot_run(run)
    assert out == run / "training.png"
    img = _image(out)
    blue = np.abs(img - np.array([0.12, 0.47, 0.71])).sum(-1) < 0.1  # matplotlib's C0 line color
    h, w = blue.shape
    rows = 4  # eight panels, two per row
    panels = [blue[r * h // rows : (r + 1) * h // rows, c * w // 2 : (c + 1) * w // 2]
              for r in range(rows) for c in (0, 1)]
    assert all(p.sum() > 200 for p in panels)
    orange = np.abs(img - np.array([1.0, 0.50, 0.05])).sum(-1) < 0.1  # C1: the loader's clips/s beside samples/s
    assert orange[h // rows : 2 * h // rows, w // 2 :].sum() > 200
    assert orange.sum() - orange[h // rows : 2 * h // rows, w // 2 :].sum() < 50  # on that panel only


def test_plot_cli_tolerates_a_half_written_last_line(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, steps=5)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "loss"')
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert _image(tmp_path / "curves.png").std() > 0.05


def test_plot_errors_name_the_path(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "empty")


def _plot_learning():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "plot_learning.py"
    spec = importlib.util.spec_from_file_location("plot_learning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_learning_draws_the_committed_runs(tmp_path, capsys):
    pl = _plot_learning()
    rows = pl.read_runs(pl.ROOT / "docs" / "learning_runs.csv")
    assert len({r["row"] for r in rows}) == len(rows) and sum(r["default"] for r in rows) >= 3
    sweep = pl.read_sweep(pl.ROOT / "docs" / "learning_pos_scale.csv")
    assert {r["encoder"] for r in sweep} == {"random", "pretrained"} and 1.0 in {r["pos_scale"] for r in sweep}
    speakers = pl.read_speakers(pl.ROOT / "docs" / "learning_speakers.csv")
    kinds = {r["encoder"] for r in speakers}
    assert any(r["seed"] is None for r in speakers) and len(kinds) >= 3
    assert all(0.0 < r[k] <= 1.0 for r in speakers for k in ("stratified", "unseen"))
    out, sweep_out, speakers_out = tmp_path / "learning.png", tmp_path / "pos.png", tmp_path / "speakers.png"
    assert pl.main(["--out", str(out), "--sweep-out", str(sweep_out), "--speakers-out", str(speakers_out)]) == 0
    for path in (out, sweep_out, speakers_out):
        assert _image(path).std() > 0.05  # something is drawn, not a blank canvas
    said = capsys.readouterr().out
    assert f"({len(rows)} runs)" in said and f"({len(sweep)} encoders)" in said
    assert f"({len(speakers)} encoders)" in said


def test_plot_learning_bad_csv_is_one_line(tmp_path, capsys):
    pl = _plot_learning()
    bad = tmp_path / "runs.csv"
    bad.write_text("pass,row,label,default,margin\n5,a,b,0,1.0\n")
    assert pl.main(["--csv", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "clip_rankme_x" in err and "\n" not in err
    bad.write_text("pass,row,label,default,margin,clip_rankme_x\n5,a,b,0,lots,2\n")
    assert pl.main(["--csv", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert pl.main(["--csv", str(tmp_path / "none.csv")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_learning_bad_sweep_csv_is_one_line_and_draws_nothing(tmp_path, capsys):
    pl = _plot_learning()
    bad, out, sweep_out = tmp_path / "sweep.csv", tmp_path / "x.png", tmp_path / "y.png"
    for text, says in (("pos_scale,encoder,seed\n1,random,0\n", "probe"),
                       ("pos_scale,encoder,seed,probe\n1,trained,0,0.7\n", "encoder 'trained'"),
                       ("pos_scale,encoder,seed,probe\n1,random,0,high\n", "line 2")):
        bad.write_text(text)
        assert pl.main(["--sweep-csv", str(bad), "--out", str(out), "--sweep-out", str(sweep_out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and says in err and "\n" not in err
    assert not out.exists() and not sweep_out.exists()


def test_plot_learning_bad_speakers_csv_is_one_line_and_draws_nothing(tmp_path, capsys):
    pl = _plot_learning()
    bad, outs = tmp_path / "speakers.csv", [tmp_path / f"{n}.png" for n in "xyz"]
    for text, says in (("encoder,seed,stratified\nmel,,0.9\n", "unseen"),
                       ("encoder,seed,stratified,unseen\n,0,0.9,0.7\n", "encoder is empty"),
                       ("encoder,seed,stratified,unseen\nmel,one,0.9,0.7\n", "line 2"),
                       ("encoder,seed,stratified,unseen\nmel,,0.9\n", "must be numbers")):
        bad.write_text(text)
        assert pl.main(["--speakers-csv", str(bad), "--out", str(outs[0]), "--sweep-out", str(outs[1]),
                        "--speakers-out", str(outs[2])]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and says in err and "\n" not in err
    assert not any(o.exists() for o in outs)


def test_plot_learning_speakers_bars_are_the_mean_over_seeds(tmp_path, monkeypatch):
    pl = _plot_learning()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [{"encoder": "a", "seed": 0, "stratified": 0.6, "unseen": 0.5},
            {"encoder": "a", "seed": 1, "stratified": 0.8, "unseen": 0.7},
            {"encoder": "mel", "seed": None, "stratified": 0.9, "unseen": 0.4}]
    seen = {}
    real_barh = plt.Axes.barh

    def spy(self, y, width, *args, **kwargs):
        seen[(round(float(y), 3))] = width
        return real_barh(self, y, width, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "barh", spy)
    pl.draw_speakers(rows, tmp_path / "s.png")
    # kind "a" is drawn on top (y = 1), "mel" below (y = 0); stratified above unseen within a kind
    assert seen == {1.19: pytest.approx(0.7), 0.81: pytest.approx(0.6), 0.19: 0.9, -0.19: 0.4}
