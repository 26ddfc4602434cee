"""Draw the speech ablation of docs/learning.md as three pictures: every run's probe margin over its best
random-init seed with the RankMe of its clip embeddings against random init's, beside issue #14's bars; the
probe of random-init and pretrained encoders against the amplitude of their positions (`model.pos_scale`); and
each encoder's probe on stratified splits beside its probe on speakers the probe never trained on.

    python scripts/plot_learning.py          # docs/learning_runs.csv -> docs/learning.png,
                                             # docs/learning_pos_scale.csv -> docs/learning_pos_scale.png,
                                             # docs/learning_speakers.csv -> docs/learning_speakers.png
    python scripts/plot_learning.py --csv runs.csv --out fig.png --sweep-csv sweep.csv --sweep-out sweep.png \
        --speakers-csv speakers.csv --speakers-out speakers.png

learning_runs.csv has one row per scored training run (the tables of docs/learning.md, passes five on; every row
was measured by `scripts/learn_eval.py` as described there) with the columns
    pass, row, label, default, margin, clip_rankme_x
pass: the ablation pass (an integer); row: the run's name in docs/learning.md; label: what changed, short;
default: 1 for a run of the default recipe itself (its seeds set the shaded band), else 0; margin: the
target encoder's probe accuracy (split 0) minus the best of three random-init seeds', in points;
clip_rankme_x: the RankMe of its clip embeddings divided by the highest random-init seed's.

learning_pos_scale.csv has one row per scored encoder of the tenth pass's sweep, with the columns
    pos_scale, encoder, seed, probe
encoder: "random" (untrained) or "pretrained" (the `tiny` default trained 600 steps at that scale); seed: its
init or training seed; probe: linear-probe accuracy of its mean-pooled clip embeddings, split 0.

learning_speakers.csv has one row per scored encoder of the eleventh pass, with the columns
    encoder, seed, stratified, unseen
encoder: the kind of features (rows of one kind share a bar, drawn in the order the kinds first appear); seed:
its init or training seed, empty for features without one (log-mel statistics); stratified: the probe's mean
accuracy over three stratified splits (split seeds 0-2, every speaker on both sides); unseen: its mean accuracy
over five splits that hold out whole speakers (`learn_eval.py --group-by speaker`).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("pass", "row", "label", "default", "margin", "clip_rankme_x")
PROBE_BAR = 15.0  # issue #14: at least 15 points above the best of three random-init seeds
RANKME_BAR = 2.0  # issue #14: RankMe at least twice random init's
SWEEP_COLUMNS = ("pos_scale", "encoder", "seed", "probe")
ENCODERS = ("random", "pretrained")
SPEAKER_COLUMNS = ("encoder", "seed", "stratified", "unseen")
SPLITS = (("stratified", "stratified splits (every speaker seen)"),
          ("unseen", "unseen speakers (held out whole)"))
LOGMEL = 0.940  # `ajepa probe --baseline mel` on the speech probe set, split 0 (`learn_eval.py --mel`: 0.927)


def read_table(path: Path, columns: tuple[str, ...], typed) -> list[dict]:
    """The CSV's rows, each passed through typed(row) (which raises ValueError naming what is wrong); a missing
    file, column or malformed value is a one-line ValueError."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
            rows = []
            for line, r in enumerate(reader, start=2):
                try:
                    rows.append(typed(r))
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{path}, line {line}: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _run(r: dict) -> dict:
    try:
        return dict(r, **{"pass": int(r["pass"]), "default": r["default"] == "1", "margin": float(r["margin"]),
                          "clip_rankme_x": float(r["clip_rankme_x"])})
    except (TypeError, ValueError):
        raise ValueError("pass, margin and clip_rankme_x must be numbers") from None


def _encoder(r: dict) -> dict:
    if r["encoder"] not in ENCODERS:
        raise ValueError(f"encoder {r['encoder']!r}; choose {' or '.join(ENCODERS)}")
    try:
        return {"pos_scale": float(r["pos_scale"]), "encoder": r["encoder"], "seed": int(r["seed"]),
                "probe": float(r["probe"])}
    except (TypeError, ValueError):
        raise ValueError("pos_scale, seed and probe must be numbers") from None


def _speaker_row(r: dict) -> dict:
    if not r["encoder"].strip():
        raise ValueError("encoder is empty")
    try:
        return {"encoder": r["encoder"].strip(), "seed": int(r["seed"]) if r["seed"].strip() else None,
                "stratified": float(r["stratified"]), "unseen": float(r["unseen"])}
    except (AttributeError, TypeError, ValueError):
        raise ValueError("seed (or empty), stratified and unseen must be numbers") from None


def read_runs(path: Path) -> list[dict]:
    return read_table(path, COLUMNS, _run)


def read_sweep(path: Path) -> list[dict]:
    return read_table(path, SWEEP_COLUMNS, _encoder)


def read_speakers(path: Path) -> list[dict]:
    return read_table(path, SPEAKER_COLUMNS, _speaker_row)


def draw(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (not r["default"], r["pass"], r["row"]))
    defaults = [r for r in rows if r["default"]]
    y = list(range(len(rows)))[::-1]
    colors = {p: c for p, c in zip(sorted({r["pass"] for r in rows}), plt.get_cmap("tab10").colors)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.26 * len(rows) + 1.6), sharey=True,
                             gridspec_kw={"width_ratios": [3, 2]})
    for ax, key, bar, title in (
        (axes[0], "margin", PROBE_BAR, "probe margin over the best random-init seed (points, split 0)"),
        (axes[1], "clip_rankme_x", RANKME_BAR, "RankMe of the clip embeddings / random init's"),
    ):
        if defaults:
            lo, hi = min(r[key] for r in defaults), max(r[key] for r in defaults)
            ax.axvspan(lo, hi, color="0.88", zorder=0, label=f"the default's {len(defaults)} training seeds")
            ax.axvline(sum(r[key] for r in defaults) / len(defaults), color="black", lw=1, ls=":",
                       label="their mean")
        ax.axvline(bar, color="crimson", lw=1.2, ls="--", label="issue #14's bar")
        ax.axvline(0.0, color="0.4", lw=0.8)
        for yi, r in zip(y, rows):
            ax.plot(r[key], yi, "o", ms=5, color="black" if r["default"] else colors[r["pass"]])
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [f"{r['label']}  [{r['row']}]" for r in rows], fontsize=7)
    axes[0].set_ylim(-0.8, len(rows) - 0.2)
    handles = [plt.Line2D([], [], ls="", marker="o", color="black", label="the default")]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=f"pass {p}") for p, c in colors.items()]
    axes[0].legend(handles=handles + axes[0].get_legend_handles_labels()[0], fontsize=7, loc="upper left")
    fig.suptitle("The tiny recipe on the speech benchmark: every scored run (docs/learning.md)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw_sweep(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    # Random init: the best seed at each scale (issue #14's baseline); pretrained: the mean over its seeds.
    for enc, color, marker, pick, what in (("random", "0.45", "o", max, "the best seed"),
                                           ("pretrained", "tab:blue", "s", lambda v: sum(v) / len(v), "the mean")):
        pts = [r for r in rows if r["encoder"] == enc]
        if not pts:
            continue
        scales = sorted({r["pos_scale"] for r in pts})
        line = [pick([r["probe"] for r in pts if r["pos_scale"] == s]) for s in scales]
        ax.plot([r["pos_scale"] for r in pts], [r["probe"] for r in pts], marker, color=color, ms=5, alpha=0.8,
                ls="", label=f"{enc}: each seed")
        ax.plot(scales, line, "-", color=color, lw=1.2, label=f"{enc}: {what} at each scale")
    ax.axhline(LOGMEL, color="crimson", lw=1.2, ls="--", label="log-mel mean + std (no network)")
    ax.axvline(1.0, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("model.pos_scale (the encoders' sin-cos positions times this; 1 = the default)")
    ax.set_ylabel("speech probe accuracy (split 0)")
    ax.set_title("The margin over random init is set by the positions' amplitude", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw_speakers(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["encoder"] for r in rows))
    fig, ax = plt.subplots(figsize=(7.6, 0.62 * len(kinds) + 1.6))
    height = 0.38
    for k, (key, what), color in zip((1, -1), SPLITS, ("0.72", "tab:blue")):
        for i, kind in enumerate(kinds):
            vals = [r[key] for r in rows if r["encoder"] == kind]
            yi = len(kinds) - 1 - i + k * height / 2
            ax.barh(yi, sum(vals) / len(vals), height=height, color=color, label=what if i == 0 else None)
            ax.plot(vals, [yi] * len(vals), "o", ms=3.5, color="black", alpha=0.7,
                    label="each seed" if i == 0 and k == -1 else None)
            ax.text(max(vals) + 0.006, yi, f"{sum(vals) / len(vals):.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(kinds))[::-1], kinds, fontsize=8)
    lo = min(min(r["stratified"], r["unseen"]) for r in rows)
    ax.set_xlim(max(0.0, lo - 0.08), 1.0)
    ax.set_xlabel("speech probe accuracy (bar: the mean over seeds)")
    ax.set_title("Who wins depends on whose voices the probe has heard", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=ROOT / "docs" / "learning_runs.csv")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "learning.png")
    p.add_argument("--sweep-csv", type=Path, default=ROOT / "docs" / "learning_pos_scale.csv")
    p.add_argument("--sweep-out", type=Path, default=ROOT / "docs" / "learning_pos_scale.png")
    p.add_argument("--speakers-csv", type=Path, default=ROOT / "docs" / "learning_speakers.csv")
    p.add_argument("--speakers-out", type=Path, default=ROOT / "docs" / "learning_speakers.png")
    args = p.parse_args(argv)
    try:  # every table is read before anything is drawn: a bad one writes nothing
        rows, sweep, speakers = read_runs(args.csv), read_sweep(args.sweep_csv), read_speakers(args.speakers_csv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    draw(rows, args.out)
    draw_sweep(sweep, args.sweep_out)
    draw_speakers(speakers, args.speakers_out)
    print(f"wrote {args.out} ({len(rows)} runs), {args.sweep_out} ({len(sweep)} encoders) and "
          f"{args.speakers_out} ({len(speakers)} encoders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
